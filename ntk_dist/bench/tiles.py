"""``ntk-dist bench tiles``: what tiles and stores cost, as ratios measured in one run.

On the demo's digits CNN (``ntk_dist.models:digits_cnn``, random 8x8x1 inputs),
an N x N NTK traced over the logits, JACOBIAN_CONTRACTION:

- **store ÷ one call**: ``compute_kernel`` into a fresh store, in one tile and
  in nb x nb tiles, against one jitted in-memory call on the same (x1, x2).
  ``compute_kernel`` compiles once per run, so it is compared with the call's
  first run (compilation included) and with its precompiled runs.
- **symmetric ÷ rectangular**: ``x2=None`` (upper triangle of blocks) against
  ``x2`` a copy of x1 (every block), both into stores; ideal (nb + 1) / (2 nb).
- **Jacobian evaluations ÷ N**: how often the executor computed each example's
  Jacobian for row and for column blocks (1 each when every block's Jacobians
  are computed once and reused across its tiles, see ``LocalExecutor``).
- **devices**: the rectangular store job on 4 devices ÷ on 1. Without 4 local
  devices this runs in a subprocess on 4 simulated CPU devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=4``), which share the
  host's cores: on a machine with fewer cores than devices no speed-up is possible.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from ntk_dist import models
from ntk_dist.bench import format_ratio_table, medians_in_turns, ratio_row
from ntk_dist.empirical import NtkImplementation, empirical_ntk_fn
from ntk_dist.engine import compute_kernel
from ntk_dist.executors import LocalExecutor

_DEVICES = 4


def _setup(n: int, seed: int) -> tuple[Callable, np.ndarray, np.ndarray, object]:
    """Kernel function, x1, a copy of x1 (so nothing can tell it is x1) and params."""
    f, params = models.digits_cnn(seed)
    ntk_fn = empirical_ntk_fn(
        f, trace_axes=(-1,), vmap_axes=0, implementation=NtkImplementation.JACOBIAN_CONTRACTION
    )
    x = np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype(np.float32)
    return ntk_fn, x, x.copy(), params


def _store_job(
    ntk_fn: Callable,
    x1: np.ndarray,
    x2: np.ndarray | None,
    params: object,
    block: int,
    folder: Path,
    executor: LocalExecutor | None = None,
) -> Callable[[], object]:
    """``compute_kernel`` into a fresh store under ``folder`` (it compiles once per run)."""

    def job() -> object:
        path = Path(tempfile.mkdtemp(dir=folder)) / "k.zarr"
        return compute_kernel(
            ntk_fn,
            x1,
            x2,
            params,
            store=str(path),
            block_size=block,
            executor=executor,
            progress=False,
        )

    return job


def device_scaling(n: int, block: int, repeats: int, seed: int = 0) -> dict:
    """Rectangular store time on 1 and on ``_DEVICES`` local devices (needs that many)."""
    ntk_fn, x1, x2, params = _setup(n, seed)
    devices = jax.local_devices()[:_DEVICES]
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {
            str(d): _store_job(ntk_fn, x1, x2, params, block, Path(tmp), LocalExecutor(devices[:d]))
            for d in (1, len(devices))
        }
        seconds = medians_in_turns(jobs, repeats)
    return {"seconds": seconds, "platform": devices[0].platform, "devices": len(devices)}


def _scaling_in_subprocess(n: int, block: int, repeats: int, seed: int) -> dict:
    """:func:`device_scaling` in a fresh interpreter with ``_DEVICES`` simulated CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_DEVICES}"
    ).strip()
    job = json.dumps({"n": n, "block": block, "repeats": repeats, "seed": seed})
    proc = subprocess.run(
        [sys.executable, "-m", "ntk_dist.bench.tiles", job],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the {_DEVICES}-device measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_tiles(n: int = 256, blocks: int = 4, repeats: int = 3, seed: int = 0) -> list[dict]:
    """Measure every ratio; one row each (fields: measure, setup, seconds,
    baseline_seconds, ratio, goal)."""
    if n % (blocks * _DEVICES):
        raise ValueError(
            f"n={n} must be a multiple of blocks x {_DEVICES} = {blocks * _DEVICES} so that "
            "every tile splits evenly over the devices; pick another --n or --blocks"
        )
    block = n // blocks
    ntk_fn, x1, x2, params = _setup(n, seed)
    precompiled = jax.jit(ntk_fn)
    jax.block_until_ready(precompiled(x1, x2, params))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seconds = medians_in_turns(
            {
                # a fresh function: traced and compiled again, as compute_kernel does
                "call_cold": lambda: jax.jit(lambda a, b, p: ntk_fn(a, b, p))(x1, x2, params),
                "call_warm": lambda: precompiled(x1, x2, params),
                "whole": _store_job(ntk_fn, x1, x2, params, n, folder),
                "tiled": _store_job(ntk_fn, x1, x2, params, block, folder),
                "symmetric": _store_job(ntk_fn, x1, None, params, block, folder),
            },
            repeats,
        )
    rows = []
    for tiles, key in (("1 tile", "whole"), (f"{blocks}x{blocks} tiles", "tiled")):
        for how, base in (("compiled in the run", "call_cold"), ("precompiled", "call_warm")):
            rows.append(
                ratio_row(
                    "store ÷ one call",
                    f"{n}x{n} NTK, {tiles}; call {how}",
                    seconds[key],
                    seconds[base],
                    "<= 1.15",
                )
            )
    ideal = (blocks + 1) / (2 * blocks)
    rows.append(
        ratio_row(
            "symmetric ÷ rectangular",
            f"{n}x{n} NTK, {blocks} block rows, both to stores",
            seconds["symmetric"],
            seconds["tiled"],
            f"~ {ideal:.3f} = (nb+1)/(2nb)",
        )
    )

    if jax.local_device_count() >= _DEVICES:
        scaling = device_scaling(n, block, repeats, seed)
        where = f"{_DEVICES} local {scaling['platform']} devices"
    else:
        scaling = _scaling_in_subprocess(n, block, repeats, seed)
        where = f"{_DEVICES} simulated CPU devices sharing {os.cpu_count()} cores"
    many = str(scaling["devices"])
    rows.append(
        ratio_row(
            f"{many} devices ÷ 1 device",
            f"{n}x{n} NTK, {blocks}x{blocks} tiles, {where}",
            scaling["seconds"][many],
            scaling["seconds"]["1"],
            f"~ {1 / _DEVICES:.2f} with {_DEVICES} independent devices",
        )
    )
    return rows


def reuse_factors(n: int = 256, blocks: int = 4, seed: int = 0) -> list[dict]:
    """Jacobian evaluations ÷ N of one in-memory ``compute_kernel`` per tiling (fields:
    setup, mode, rows, cols, total)."""
    ntk_fn, x1, x2, params = _setup(n, seed)
    out = []
    for setup, other, block in (
        ("1 tile", x2, n),
        (f"{blocks}x{blocks} tiles", x2, n // blocks),
        (f"{blocks} block rows, symmetric", None, n // blocks),
    ):
        executor = LocalExecutor()
        compute_kernel(
            ntk_fn, x1, other, params, block_size=block, executor=executor, progress=False
        )
        r = executor.reuse
        out.append(
            {"setup": setup, "mode": r.mode, "rows": r.rows, "cols": r.cols, "total": r.total}
        )
    return out


def format_reuse_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`reuse_factors` rows."""
    lines = [
        "| Jacobian evaluations ÷ N | mode | rows | columns | all ÷ distinct examples |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['mode']} | {r['rows']:.2f} | {r['cols']:.2f} | {r['total']:.2f} |"
        )
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ntk-dist bench tiles``."""
    parser = subparsers.add_parser(
        "tiles", help="store ÷ one call, symmetric ÷ rectangular, 4 devices ÷ 1"
    )
    parser.add_argument("--n", type=int, default=256, help="examples N of the N x N kernel")
    parser.add_argument("--blocks", type=int, default=4, help="block rows nb (block = N / nb)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing (median)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Run, print the table, optionally save the rows as JSON."""
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{os.cpu_count()} CPU cores"
    )
    rows = bench_tiles(n=args.n, blocks=args.blocks, repeats=args.repeats)
    print(format_ratio_table(rows))
    print()
    print(format_reuse_table(reuse_factors(n=args.n, blocks=args.blocks)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    print(json.dumps(device_scaling(**json.loads(sys.argv[1]))))
