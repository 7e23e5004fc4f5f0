"""``ntk-dist bench kernels``: every NTK implementation and AUTO on the docs networks.

The two networks of neural-tangents' empirical-kernel docs, on random 32x32x3 inputs
(float32): a CNN of three 3x3x32 convolutions and an MLP 3072-1024-1024-10. For an
N x N train-train NTK traced over the logits (``x2=None``), rows are:

- **one call** of ``jax.jit(empirical_ntk_fn(..., implementation=i))`` for i = 1, 2, 3
  (when registered) and AUTO. A slow implementation is timed on fewer examples than N:
  each is run on 8 examples, then on 4 times as many while the last time, scaled per
  pair, stays within ``cell_seconds`` and the memory (cost model) within
  ``max_memory_gb``; the rate examples²/s is per pair, so the table says which N each
  rate comes from. AUTO runs on the largest N any implementation got, and is compared
  with those timed on that N. Its tuning happens while compiling, not timed.
- **tiles**: ``compute_kernel`` into memory with per-tile Jacobian contraction in blocks
  of ``tile_block`` (each tile computes its row and column blocks' Jacobians: the
  baseline of the issue; run on at most 4 block rows, its time scaled to N by the number
  of tiles, all alike), and with AUTO and ``block_size=None`` at N (implementation,
  panels and blocks tuned). One run each, compilation (and tuning) included.

Also reported: the recomputation factor (Jacobian evaluations ÷ N: the executor's
``reuse`` counters for tile runs; 1 for a one-call two-stage implementation, none for
NTK-vector products) and the fraction of this machine's float32 matmul rate (a
``gemm_n``-sized GEMM timed in the same run) that the kernel's FLOPs reach, the FLOPs being
XLA's cost analysis of the compiled one-call computation (loops, e.g. NTK-vector
products' chunks under ``lax.map``, are counted once by XLA, which undercounts them).
Timings of the one-call rows of a network are taken in turns (median of ``repeats``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist import models
from ntk_dist.bench import medians_in_turns, time_call
from ntk_dist.empirical import (
    NtkImplementation,
    choose_implementation,
    empirical_ntk_fn,
    estimate_costs,
    kernel_fns,
)
from ntk_dist.empirical.cost_model import flops_from_cost_analysis
from ntk_dist.engine import compute_kernel
from ntk_dist.executors import LocalExecutor
from ntk_dist.tiling import TilePlan

NETWORKS: dict[str, Callable] = {"docs CNN": models.docs_cnn, "docs MLP": models.docs_mlp}
AUTO = NtkImplementation.AUTO
JC = NtkImplementation.JACOBIAN_CONTRACTION
FIRST_N = 8
BASELINE_BLOCKS = 4  # the per-tile baseline runs on at most this many block rows


def _symmetric_plan(n: int, block: int) -> TilePlan:
    return TilePlan(n, n, (block, block), symmetric=True)


def implementations() -> list[NtkImplementation]:
    """Every registered implementation, then AUTO."""
    return [*sorted(kernel_fns._IMPLEMENTATIONS), AUTO]


def gemm_flops_per_s(n: int, repeats: int) -> float:
    """FLOP/s of an n x n x n float32 matrix product on the default device."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    product = jax.jit(lambda u, v: u @ v)
    return 2.0 * n**3 / time_call(lambda: product(a, a), repeats)


def _one_call(f: Callable, params: Any, x: np.ndarray, impl: NtkImplementation) -> tuple:
    """(run, XLA FLOPs) of one jitted kernel call on x; compiled (and AUTO tuned) here."""
    ntk_fn = empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation=impl)
    compiled = jax.jit(lambda a, p: ntk_fn(a, None, p)).lower(x, params).compile()
    return (lambda: compiled(x, params)), flops_from_cost_analysis(compiled.cost_analysis())


def _fits(f: Callable, params: Any, x: np.ndarray, impl: NtkImplementation, cap: float) -> bool:
    """Whether the cost model's memory for one call on x stays under ``cap`` bytes."""
    if impl == AUTO:
        return True  # AUTO drops what does not fit the device by itself
    estimate = estimate_costs(f, x, None, params, (-1,), (), 0)
    return estimate.peak_bytes.get(impl, 0.0) <= cap


def _sized_call(
    f: Callable,
    params: Any,
    x: np.ndarray,
    impl: NtkImplementation,
    cell_seconds: float,
    cap: float,
) -> tuple[int, Callable, float | None]:
    """(N, run, FLOPs) of ``impl`` on the largest N <= len(x) within the budgets.

    Timed on ``FIRST_N`` examples, then on 4 times as many while the last time, scaled
    per pair, stays within ``cell_seconds`` and the cost model's memory within ``cap``.
    """
    n = min(FIRST_N, len(x))
    run, flops = _one_call(f, params, x[:n], impl)
    while n < len(x):
        seconds = time_call(run, 1)
        m = min(4 * n, len(x))
        if seconds * (m / n) ** 2 > cell_seconds or not _fits(f, params, x[:m], impl, cap):
            break
        n = m
        run, flops = _one_call(f, params, x[:n], impl)
    return n, run, flops


def _at(f: Callable, params: Any, x: np.ndarray, impl: NtkImplementation) -> tuple:
    """(N, run, FLOPs) of ``impl`` on all of x."""
    return (len(x), *_one_call(f, params, x, impl))


def _note(message: str) -> None:
    print(f"[bench kernels] {message}", file=sys.stderr, flush=True)


def _per_tile(ntk_fn: Callable) -> Callable:
    """The same kernel without per-block features: the executor computes each tile whole."""

    def per_tile(x1: Any, x2: Any, params: Any, **kwargs: Any) -> Any:
        return ntk_fn(x1, x2, params, **kwargs)

    for name in ("kind", "trace_axes", "diagonal_axes", "implementation"):
        setattr(per_tile, name, getattr(ntk_fn, name))
    return per_tile


def _tiled(kernel_fn: Callable, x: np.ndarray, params: Any, block: int | None) -> dict:
    executor = LocalExecutor()
    start = time.perf_counter()
    compute_kernel(kernel_fn, x, None, params, executor=executor, block_size=block, progress=False)
    seconds = time.perf_counter() - start
    reuse = executor.reuse
    return {"seconds": seconds, "recompute": reuse.total, "mode": reuse.mode}


def _row(network: str, path: str, n: int, seconds: float, **extra: Any) -> dict:
    return {
        "network": network,
        "path": path,
        "n": n,
        "seconds": seconds,
        "examples2_per_s": n * n / seconds,
        **extra,
    }


def bench_network(
    name: str,
    n: int,
    repeats: int,
    seed: int,
    cell_seconds: float,
    tile_block: int,
    max_memory_gb: float,
    gemm_rate: float,
) -> list[dict]:
    """The rows of one network."""
    f, params = NETWORKS[name](jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((n, 32, 32, 3)).astype(np.float32)
    cap = max_memory_gb * 2**30
    sizes, runs, flops = {}, {}, {}
    for impl in implementations():
        if impl == AUTO:  # on as many examples as the most any implementation got
            largest = max(sizes.values())
            sized = _at(f, params, x[:largest], impl)
        else:
            sized = _sized_call(f, params, x, impl, cell_seconds, cap)
        sizes[impl], runs[impl.name], flops[impl.name] = sized
        _note(f"{name}: {impl.name} will be timed on N={sizes[impl]}")
    seconds = medians_in_turns(runs, repeats)
    auto_pick = _auto_pick(f, params, x[: sizes[AUTO]])
    rows = []
    for impl, m in sizes.items():
        ran = auto_pick if impl == AUTO else impl
        two_stage = ran != NtkImplementation.NTK_VECTOR_PRODUCTS  # features once per example
        fl = flops[impl.name]
        rows.append(
            _row(
                name,
                f"impl {int(impl)} {impl.name}, one call"
                if impl != AUTO
                else f"AUTO ({auto_pick.name}), one call",
                m,
                seconds[impl.name],
                recompute=1.0 if two_stage else None,
                flops=fl,
                fraction_of_gemm=None if fl is None else fl / seconds[impl.name] / gemm_rate,
            )
        )
    _note(f"{name}: one-call rows timed; now the tile runs at N={n}")
    ntk_jc = empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation=JC)
    block_x = x[: min(2 * tile_block, n)]
    jc_bytes = estimate_costs(f, block_x, None, params, (-1,), (), 0).peak_bytes[JC]
    n_base = min(n, BASELINE_BLOCKS * tile_block)
    path = f"per-tile JC, blocks of {tile_block} (baseline)"
    if n_base < n:
        path += f", timed at N={n_base}, scaled by tile count"
    if jc_bytes <= cap:
        tiled = _tiled(_per_tile(ntk_jc), x[:n_base], params, tile_block)
        scale = len(_symmetric_plan(n, tile_block)) / len(_symmetric_plan(n_base, tile_block))
        # each tile evaluates its row and column blocks: evaluations grow with the tiles
        recompute = tiled["recompute"] * scale * n_base / n
        rows.append(_row(name, path, n, tiled["seconds"] * scale, recompute=recompute))
    else:
        rows.append(
            {
                "network": name,
                "path": path,
                "n": n,
                "seconds": None,
                "note": f"not run: the Jacobians of two blocks take {jc_bytes / 2**30:.0f} GiB",
            }
        )
    ntk_auto = empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation=AUTO)
    tiled = _tiled(ntk_auto, x, params, None)
    rows.append(
        _row(
            name,
            f"AUTO tiles, block_size=None ({tiled['mode']})",
            n,
            tiled["seconds"],
            recompute=tiled["recompute"],
        )
    )
    return rows


def _auto_pick(f: Callable, params: Any, x: np.ndarray) -> NtkImplementation:
    """What AUTO runs for one call on x (from its cache: tuned while compiling)."""
    return choose_implementation(f, x, None, params, trace_axes=(-1,), vmap_axes=0)


def summarize(rows: list[dict]) -> list[dict]:
    """The issue's goals, as ratios of rates from ``rows`` (per network where they apply)."""
    out = []
    for network in dict.fromkeys(r["network"] for r in rows):
        mine = {r["path"]: r for r in rows if r["network"] == network and r["seconds"]}
        calls = {p: r for p, r in mine.items() if p.endswith("one call")}
        auto = next(r for p, r in calls.items() if p.startswith("AUTO"))
        impls = {p: r for p, r in calls.items() if not p.startswith("AUTO")}
        same_n = {p: r for p, r in impls.items() if r["n"] == auto["n"]} or impls
        best_path = max(same_n, key=lambda p: same_n[p]["examples2_per_s"])
        out.append(
            {
                "network": network,
                "measure": "AUTO one call ÷ best implementation (rate)",
                "value": auto["examples2_per_s"] / impls[best_path]["examples2_per_s"],
                "goal": ">= 0.9",
                "detail": f"best: {best_path} at N={impls[best_path]['n']}, AUTO at N={auto['n']}",
            }
        )
        by_impl = {p.split(" ")[1]: r for p, r in impls.items()}
        if network == "docs MLP" and "3" in by_impl and "1" in by_impl:
            out.append(
                {
                    "network": network,
                    "measure": "impl 3 ÷ impl 1 (rate)",
                    "value": by_impl["3"]["examples2_per_s"] / by_impl["1"]["examples2_per_s"],
                    "goal": ">= 50",
                    "detail": f"N={by_impl['3']['n']} vs N={by_impl['1']['n']}",
                }
            )
        baseline = next((r for p, r in mine.items() if p.startswith("per-tile")), None)
        if baseline is not None:
            best = max(mine.values(), key=lambda r: r["examples2_per_s"])
            out.append(
                {
                    "network": network,
                    "measure": "best path ÷ per-tile JC (rate)",
                    "value": best["examples2_per_s"] / baseline["examples2_per_s"],
                    "goal": ">= 2" if network == "docs CNN" else "",
                    "detail": f"best: {best['path']} at N={best['n']}",
                }
            )
    return out


def bench_kernels(
    n: int = 512,
    repeats: int = 3,
    seed: int = 0,
    cell_seconds: float = 8.0,
    tile_block: int = 64,
    max_memory_gb: float = 4.0,
    gemm_n: int = 2048,
) -> dict:
    """All rows, the goals' ratios and the GEMM rate they are compared with."""
    gemm = gemm_flops_per_s(gemm_n, repeats)
    rows = []
    for name in NETWORKS:
        rows += bench_network(name, n, repeats, seed, cell_seconds, tile_block, max_memory_gb, gemm)
    return {"gemm_n": gemm_n, "gemm_flops_per_s": gemm, "rows": rows, "goals": summarize(rows)}


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_kernels_table(result: dict) -> str:
    """Markdown tables of :func:`bench_kernels`' result (the README shows them)."""
    lines = [
        f"float32 GEMM {result['gemm_n']}: {result['gemm_flops_per_s'] / 1e9:,.1f} GFLOP/s",
        "",
        "| network | path | N | time (s) | ex²/s | Jacobian evals ÷ N | GFLOP (XLA) |"
        " of GEMM rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["seconds"] is None:
            lines.append(f"| {r['network']} | {r['path']} | {r['n']} | {r['note']} |||||")
            continue
        flops = r.get("flops")
        lines.append(
            f"| {r['network']} | {r['path']} | {r['n']} | {r['seconds']:.3f} "
            f"| {r['examples2_per_s']:,.0f} | {_fmt(r.get('recompute'), '.2f')} "
            f"| {_fmt(None if flops is None else flops / 1e9, ',.1f')} "
            f"| {_fmt(r.get('fraction_of_gemm'), '.1%')} |"
        )
    lines += ["", "| network | measure | value | goal | detail |", "|---|---|---|---|---|"]
    for g in result["goals"]:
        lines.append(
            f"| {g['network']} | {g['measure']} | {g['value']:.2f} | {g['goal']} | {g['detail']} |"
        )
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ntk-dist bench kernels``."""
    parser = subparsers.add_parser(
        "kernels", help="NTK implementations and AUTO on neural-tangents' docs CNN and MLP"
    )
    parser.add_argument("--n", type=int, default=512, help="examples N of the N x N kernel")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing (median)")
    parser.add_argument(
        "--cell-seconds",
        type=float,
        default=8.0,
        help="time one call of a slow implementation may take (sets its N)",
    )
    parser.add_argument("--tile-block", type=int, default=64, help="block of the per-tile row")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=4.0,
        help="memory one call may take (cost model; sets a slow one's N)",
    )
    parser.add_argument("--gemm-n", type=int, default=2048, help="size of the reference GEMM")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Run, print the tables, optionally save the result as JSON."""
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}")
    result = bench_kernels(
        n=args.n,
        repeats=args.repeats,
        cell_seconds=args.cell_seconds,
        tile_block=args.tile_block,
        max_memory_gb=args.max_memory_gb,
        gemm_n=args.gemm_n,
    )
    print(format_kernels_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
