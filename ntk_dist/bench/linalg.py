"""``ntk-dist bench linalg``: stored Cholesky and eigh of a kernel ÷ numpy LAPACK, in one run.

For each N a float64 SPD kernel is written to a store in a temporary folder, then:
tiled (out-of-core) Cholesky under a memory bound of a quarter of the matrix ÷
``numpy.linalg.cholesky``; the stored eigh ÷ ``numpy.linalg.eigh`` (in core: the
distributed eigh is not implemented yet, see :mod:`ntk_dist.linalg.eigh`); and the
time of one more ``gradient_descent_mse`` prediction at a new t once the eigenbasis is
stored, ÷ the eigh itself.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from ntk_dist.linalg import StoredKernelOperator
from ntk_dist.predict import gradient_descent_mse
from ntk_dist.store import KernelStore
from ntk_dist.tiling import TilePlan


def _store(path: Path, n: int, block: int) -> KernelStore:
    g = np.random.default_rng(0).standard_normal((n, 64))
    k = g @ g.T / 64 + np.eye(n)
    plan = TilePlan(n, n, (block, block), symmetric=True)
    store = KernelStore.create(path, plan=plan, dtype=np.float64, fingerprint="bench")
    for t in plan:
        store.write_tile(t, k[t.rows, t.cols])
    return store


def _seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def bench_cholesky(n: int, folder: Path) -> dict:
    """Tiled Cholesky of a stored N x N kernel at a bound of matrix/4, ÷ numpy's."""
    store = _store(folder / f"chol{n}", n, 512)
    dense = store.to_numpy()
    lapack = _seconds(lambda: np.linalg.cholesky(dense))
    bound = n * n * 8 // 4
    tiled = _seconds(lambda: StoredKernelOperator(store, memory_bound=bound).cholesky())
    return {
        "n": n,
        "memory_bound": bound,
        "lapack_s": lapack,
        "tiled_s": tiled,
        "ratio": tiled / lapack,
    }


def bench_eigh(n: int, folder: Path) -> dict:
    """Stored (in-core) eigh ÷ numpy's, and one more prediction once the basis is stored."""
    store = _store(folder / f"eigh{n}", n, 512)
    dense = store.to_numpy()
    lapack = _seconds(lambda: np.linalg.eigh(dense))
    stored = _seconds(lambda: StoredKernelOperator(store).eigh().values)
    y = np.ones((n, 1))
    predict = gradient_descent_mse(store, y)
    again = _seconds(lambda: predict(3.0, 0.0))
    return {
        "n": n,
        "lapack_s": lapack,
        "stored_eigh_s": stored,
        "ratio": stored / lapack,
        "one_more_prediction_s": again,
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ntk-dist bench linalg``."""
    parser = subparsers.add_parser("linalg", help="stored Cholesky / eigh ÷ numpy LAPACK")
    parser.add_argument("--cholesky-n", type=int, nargs="*", default=[4096, 8192])
    parser.add_argument("--eigh-n", type=int, nargs="*", default=[2048, 4096])
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Run, print one JSON row per measurement, optionally save them."""
    jax.config.update("jax_enable_x64", True)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in args.cholesky_n:
            rows.append({"what": "cholesky", **bench_cholesky(n, Path(folder))})
            print(json.dumps(rows[-1]))
        for n in args.eigh_n:
            rows.append({"what": "eigh", **bench_eigh(n, Path(folder))})
            print(json.dumps(rows[-1]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
