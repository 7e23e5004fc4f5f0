"""Benchmarks (``ntk-dist bench KIND``): speed reported as ratios measured side by side.

Each module here benchmarks one concept and exposes ``register(subparsers)``,
which adds its ``ntk-dist bench KIND`` sub-command. Timing lives here, never in
the tests.
"""

import statistics
import time
from collections.abc import Callable

import jax

# Modules of this package that provide a ``bench`` sub-command, in the order shown by --help.
KINDS = ("kernels", "tiles", "ray", "linalg")


def time_call(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up (compilation) run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def medians_in_turns(
    jobs: dict[str, Callable[[], object]], repeats: int, first: dict[str, float] | None = None
) -> dict[str, float]:
    """Median wall time of each job, the jobs run in turns so that load drifts hit all alike.

    With ``first`` (a dict to fill), every job runs once before, timed into ``first`` and
    left out of the medians: what a process pays once (compilation, first-touch pages)."""
    if first is not None:
        for name, job in jobs.items():
            start = time.perf_counter()
            jax.block_until_ready(job())
            first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            start = time.perf_counter()
            jax.block_until_ready(job())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ratio_row(measure: str, setup: str, seconds: float, baseline: float, goal: str) -> dict:
    """One measured ratio (``seconds / baseline``) with what was measured and its goal."""
    return {
        "measure": measure,
        "setup": setup,
        "seconds": seconds,
        "baseline_seconds": baseline,
        "ratio": seconds / baseline,
        "goal": goal,
    }


def format_ratio_table(rows: list[dict], digits: int = 2) -> str:
    """A Markdown table of :func:`ratio_row` rows (the README shows them)."""
    lines = [
        "| measure | setup | time (s) | baseline (s) | ratio | goal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['measure']} | {r['setup']} | {r['seconds']:.{digits}f} | "
            f"{r['baseline_seconds']:.{digits}f} | {r['ratio']:.{digits}f} | {r['goal']} |"
        )
    return "\n".join(lines)
