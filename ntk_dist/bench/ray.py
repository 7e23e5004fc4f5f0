"""``ntk-dist bench ray``: RayExecutor throughput with 1 and 2 workers, and cost per tile.

A local Ray cluster (``ray.cluster_utils.Cluster``, one CPU per node) is started
with one node, then grown to two; with one worker per node this measures 1 and
2 workers on this machine. For each:

- *kernel*: an MLP's NTK (traced over the logits) of N examples, symmetric,
  written to a store in B x B tiles: wall time, time after the workers are up,
  and examples² per second;
- *empty tiles*: a kernel function that returns zeros, in 1 x 1 tiles, to
  measure what the scheduler (and the store) cost per tile.

Worker start-up (process start, JAX import, compilation) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist import models
from ntk_dist.empirical import empirical_ntk_fn
from ntk_dist.engine import compute_kernel
from ntk_dist.executors.ray import RayExecutor


def _zeros(x1, x2, params):
    return jnp.zeros((x1.shape[0], x2.shape[0]), x1.dtype)


def _timed(executor: RayExecutor, *args, **kwargs) -> dict:
    start = time.perf_counter()
    compute_kernel(*args, executor=executor, progress=False, **kwargs)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "startup_s": executor.startup_seconds,
        "after_startup_s": wall - executor.startup_seconds,
        "tiles": executor.tiles_computed,
    }


def bench_ray(
    n: int = 256, block: int = 64, width: int = 256, empty_n: int = 16, seed: int = 0
) -> list[dict]:
    """One row per worker count (1, then 2) on a local cluster of as many nodes."""
    import ray
    from ray.cluster_utils import Cluster

    f, params = models.mlp(jax.random.PRNGKey(seed), 32, [width, width, 10])
    ntk_fn = empirical_ntk_fn(f, trace_axes=(-1,))
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(seed + 1), (n, 32)), np.float32)
    e1 = np.zeros((empty_n, 1), np.float32)
    e2 = np.zeros((empty_n + 1, 1), np.float32)
    rows = []
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        for workers in (1, 2):
            if workers == 2:
                cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes(timeout=60)
            with tempfile.TemporaryDirectory() as tmp:
                kernel = _timed(
                    RayExecutor(), ntk_fn, x, None, params, block_size=block, store=f"{tmp}/k"
                )
                stored = _timed(RayExecutor(), _zeros, e1, e2, None, block_size=1, store=f"{tmp}/e")
            memory = _timed(RayExecutor(), _zeros, e1, e2, None, block_size=1)
            rows.append(
                {
                    "workers": workers,
                    "n": n,
                    "block": block,
                    "kernel": kernel,
                    "examples2_per_s": n * n / kernel["wall_s"],
                    "examples2_per_s_after_startup": n * n / kernel["after_startup_s"],
                    "empty_tile_ms_store": 1e3 * stored["after_startup_s"] / stored["tiles"],
                    "empty_tile_ms_memory": 1e3 * memory["after_startup_s"] / memory["tiles"],
                    "empty_tiles": memory["tiles"],
                }
            )
    finally:
        ray.shutdown()
        cluster.shutdown()
    base = rows[0]["examples2_per_s_after_startup"]
    for row in rows:
        row["speedup_after_startup"] = row["examples2_per_s_after_startup"] / base
    return rows


def format_ray_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`bench_ray` rows (the README shows it)."""
    lines = [
        "| Ray workers | N | block | wall s | start-up s | ex²/s (wall) | ex²/s (after start-up) "
        "| speed-up | empty tile ms (store) | empty tile ms (in memory) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = r["kernel"]
        lines.append(
            f"| {r['workers']} | {r['n']} | {r['block']} | {k['wall_s']:.1f} "
            f"| {k['startup_s']:.1f} | {r['examples2_per_s']:,.0f} "
            f"| {r['examples2_per_s_after_startup']:,.0f} | {r['speedup_after_startup']:.2f} "
            f"| {r['empty_tile_ms_store']:.1f} | {r['empty_tile_ms_memory']:.1f} |"
        )
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ntk-dist bench ray``."""
    parser = subparsers.add_parser(
        "ray", help="RayExecutor: throughput with 1 and 2 workers, scheduler cost per tile"
    )
    parser.add_argument("--n", type=int, default=256, help="examples N of the N x N kernel")
    parser.add_argument("--block", type=int, default=64, help="tile rows/cols for the kernel")
    parser.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    parser.add_argument("--empty-n", type=int, default=16, help="empty tiles: N x (N+1) of 1x1")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Run, print the table, optionally save the rows as JSON."""
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; one CPU per Ray node")
    rows = bench_ray(n=args.n, block=args.block, width=args.width, empty_n=args.empty_n)
    print(format_ray_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
