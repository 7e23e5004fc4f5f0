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
