"""``ntk-dist bench linalg``: stored Cholesky and eigh of a kernel ÷ numpy LAPACK, in one run.

For each N a float64 SPD kernel is written to a store in a temporary folder, then:

- **tiled Cholesky ÷ numpy.linalg.cholesky**, with a bound of three matrices (``K``
  fits; tiles of ``STREAM_TILE``) and out of core (a bound of a quarter of the matrix;
  its tile kernels on the host or on the devices, ``--tile-backend``); every run
  factorises afresh (the stored factor is deleted first); ``--progress`` prints the
  tiled factorisations' progress;
- **stored eigh ÷ numpy.linalg.eigh**, in core and out of core (a bound of half the
  matrix: :mod:`ntk_dist.linalg.qdwh`; with no gap, two-stage tridiagonalisation on
  the host, QDWH on accelerators), on a kernel with 64 outlying eigenvalues and on
  two whose spectra have no gap (see ``_store``); every job of this row runs once before
  the timed turns (what a process pays once: the two-stage path compiles its bulge
  chase per size), and that first out-of-core eigh is a row of its own;
- **one more prediction once the eigenbasis is stored**: a new ``gradient_descent_mse``
  on the store and one call at a new t (the stored eigenbasis is reused, not
  recomputed), in seconds and as a fraction of the eigh time;
- on the power-law kernel, out of core: **the eigenvalues alone ÷
  numpy.linalg.eigvalsh** (``eigvalsh()``, reduction to band form), and **one
  prediction with method="krylov" ÷ the out-of-core eigh** (no factorisation; a
  random ``y_train`` of 10 columns, ``t = 100`` at the learning rate of
  ``max_learning_rate``; the bound grows by room for a basis of 600 columns).

Each measurement and its baseline run in turns, ``--repeats`` times (medians), so that
a change in the machine's load hits both alike. ``--devices D`` runs the bench in a
subprocess on D simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=D``, set before JAX starts); they
share the host's cores, so on a machine with fewer cores than devices no speed-up is
possible.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from ntk_dist.bench import format_ratio_table, medians_in_turns, ratio_row
from ntk_dist.linalg import StoredKernelOperator
from ntk_dist.linalg.cholesky import TILE_BACKENDS, choose_tile_backend
from ntk_dist.predict import gradient_descent_mse, max_learning_rate
from ntk_dist.store import KernelStore
from ntk_dist.tiling import TilePlan

_FACTORS = "ntk_dist_linalg"  # the folder of a store that holds its factorisations


SPECTRA = {  # eigenvalues of the kernels with no gap, in a random orthogonal basis
    "spread": lambda n: np.linspace(1.0, 10.0, n),  # evenly over [1, 10]: the hardest
    "power law": lambda n: 1.0 / np.arange(1, n + 1) + 1e-4,  # as an NTK with diag_reg
}


def _store(path: Path, n: int, block: int, spectrum: str = "outliers") -> KernelStore:
    """A stored SPD kernel: ``I + G G^T / 64`` (``"outliers"``: 64 large eigenvalues over
    a flat bulk, as an NTK with fewer parameters than examples) or ``Q diag(λ) Q^T`` with
    ``λ`` from :data:`SPECTRA` (no gap anywhere: ``"spread"``, the hardest, and
    ``"power law"`` ``1/i + 1e-4``, as an NTK with more parameters than examples)."""
    rng = np.random.default_rng(0)
    if spectrum == "outliers":
        g = rng.standard_normal((n, 64))
        k = g @ g.T / 64 + np.eye(n)
    else:
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        k = (q * SPECTRA[spectrum](n)) @ q.T
        k = (k + k.T) / 2
    plan = TilePlan(n, n, (min(block, n), min(block, n)), symmetric=True)
    store = KernelStore.create(path, plan=plan, dtype=np.float64, fingerprint="bench")
    for t in plan:
        store.write_tile(t, k[t.rows, t.cols])
    return store


def _where() -> str:
    devices = jax.local_devices()
    return f"{len(devices)} {devices[0].platform} device(s), {os.cpu_count()} cores"


def bench_cholesky(
    path: Path, n: int, repeats: int, tile_backend: str = "auto", progress: bool = False
) -> list[dict]:
    """Tiled Cholesky of a stored N x N kernel ÷ numpy's, in core and at a bound of matrix/4."""
    store = _store(path, n, 512)
    dense = store.to_numpy()
    matrix = n * n * 8
    backend = choose_tile_backend(tile_backend, jax.local_devices())

    def factorise(bound: int) -> Callable[[], object]:
        def job() -> object:
            shutil.rmtree(path / _FACTORS, ignore_errors=True)
            op = StoredKernelOperator(
                store, memory_bound=bound, tile_backend=tile_backend, progress=progress
            )
            return op.cholesky()

        return job

    rows = []
    for label, bound in [
        ("K fits the bound", 3 * matrix),
        (f"out of core ({backend} tile kernels)", matrix // 4),
    ]:
        t = medians_in_turns(
            {"lapack": lambda: np.linalg.cholesky(dense), "ours": factorise(bound)}, repeats
        )
        setup = f"N={n} float64, {label}, bound {bound / 2**20:.0f} MiB, {_where()}"
        rows.append(
            ratio_row(
                "tiled Cholesky ÷ numpy.linalg.cholesky", setup, t["ours"], t["lapack"], "<= 1.5"
            )
        )
    return rows


def bench_eigh(path: Path, n: int, repeats: int) -> list[dict]:
    """Stored eigh ÷ numpy's (in core; out of core for both spectra of :func:`_store`),
    and one more prediction once the eigenbasis is stored."""
    store = _store(path, n, 512)
    gapless = {
        name: _store(path.with_name(f"{path.name}-{i}"), n, 512, name)
        for i, name in enumerate(SPECTRA)
    }
    dense = store.to_numpy()
    dense_gapless = {name: kernel.to_numpy() for name, kernel in gapless.items()}

    def stored_eigh(kernel: KernelStore, bound: int | None) -> Callable[[], object]:
        def run() -> object:
            shutil.rmtree(Path(kernel.path) / _FACTORS, ignore_errors=True)
            return StoredKernelOperator(kernel, memory_bound=bound).eigh().values

        return run

    out_of_core = n * n * 8 // 2  # below the matrix itself: the divide-and-conquer path
    jobs = {
        "lapack": lambda: np.linalg.eigh(dense),
        "ours": stored_eigh(store, None),
        "out_of_core": stored_eigh(store, out_of_core),
    }
    for name, kernel in gapless.items():
        jobs[f"lapack {name}"] = lambda a=dense_gapless[name]: np.linalg.eigh(a)
        jobs[f"out_of_core {name}"] = stored_eigh(kernel, out_of_core)
    first: dict[str, float] = {}  # the first runs: the chase compiles once per process and size
    t = medians_in_turns(jobs, repeats, first)
    setup = f"N={n} float64, {_where()}"
    bound = f"bound {out_of_core / 2**20:.0f} MiB"
    rows = [
        ratio_row(
            "stored eigh ÷ numpy.linalg.eigh",
            f"{setup}, 64 outliers, in core",
            t["ours"],
            t["lapack"],
            "<= 3",
        ),
        ratio_row(
            "stored eigh ÷ numpy.linalg.eigh",
            f"{setup}, 64 outliers, out of core (split by subspace iteration), {bound}",
            t["out_of_core"],
            t["lapack"],
            "<= 3",
        ),
    ]
    on_host = choose_tile_backend("auto", jax.local_devices()) == "host"
    method = "two-stage tridiagonalisation" if on_host else "QDWH divide and conquer"
    rows += [
        ratio_row(
            "stored eigh ÷ numpy.linalg.eigh",
            f"{setup}, {name} spectrum, out of core ({method}), {bound}",
            t[f"out_of_core {name}"],
            t[f"lapack {name}"],
            "<= 3",
        )
        for name in SPECTRA
    ]
    rows.append(
        ratio_row(
            "the first out-of-core eigh in a process ÷ numpy.linalg.eigh",
            f"{setup}, spread spectrum, {bound}, the chase compiled (left out of the rows above)",
            first["out_of_core spread"],
            t["lapack spread"],
            "-",
        )
    )
    power_law, dense_power_law = gapless["power law"], dense_gapless["power law"]

    def stored_eigvalsh() -> object:
        shutil.rmtree(Path(power_law.path) / _FACTORS, ignore_errors=True)
        return StoredKernelOperator(power_law, memory_bound=out_of_core).eigvalsh()

    y_classes = np.random.default_rng(1).standard_normal((n, 10))
    rate = max_learning_rate(dense_power_law, y_classes.size)
    basis = n * 8 * min(n, 600)  # room for a Krylov basis of 600 columns (K still streams)

    def krylov_prediction() -> object:
        op = StoredKernelOperator(power_law, memory_bound=out_of_core + basis)
        return gradient_descent_mse(op, y_classes, rate, method="krylov")(100.0, 0.0)

    t.update(
        medians_in_turns(
            {
                "eigvalsh": stored_eigvalsh,
                "lapack eigvalsh": lambda: np.linalg.eigvalsh(dense_power_law),
                "krylov": krylov_prediction,
            },
            repeats,
        )
    )
    rows += [
        ratio_row(
            "stored eigvalsh ÷ numpy.linalg.eigvalsh",
            f"{setup}, power law spectrum, out of core (band reduction), {bound}",
            t["eigvalsh"],
            t["lapack eigvalsh"],
            "-",
        ),
        ratio_row(
            "one prediction with method='krylov' ÷ the out-of-core eigh",
            f"{setup}, power law spectrum, {bound} + {basis / 2**20:.1f} MiB for the Krylov "
            "basis, 10 outputs, 100 steps of max_learning_rate",
            t["krylov"],
            t["out_of_core power law"],
            "≪ 1",
        ),
    ]
    y = np.ones((n, 1))
    gradient_descent_mse(store, y)(1.0, 0.0)  # the eigenbasis is stored (and jit compiled)
    times = iter(range(2, 2 + repeats))
    again = medians_in_turns(
        {"more": lambda: gradient_descent_mse(store, y)(float(next(times)), 0.0)}, repeats
    )
    rows.append(
        ratio_row(
            "one more prediction once the eigenbasis is stored ÷ the eigh",
            f"{setup}, new predictor at a new t",
            again["more"],
            t["ours"],
            "≪ 1",
        )
    )
    return rows


def bench_linalg(
    cholesky_n: list[int],
    eigh_n: list[int],
    repeats: int = 1,
    tile_backend: str = "auto",
    progress: bool = False,
) -> list[dict]:
    """Every measurement, sizes in turn; one row each (measure, setup, seconds, ratio...)."""
    jax.config.update("jax_enable_x64", True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in cholesky_n:
            rows += bench_cholesky(Path(folder) / f"chol{n}", n, repeats, tile_backend, progress)
        for n in eigh_n:
            rows += bench_eigh(Path(folder) / f"eigh{n}", n, repeats)
    return rows


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ntk-dist bench linalg``."""
    parser = subparsers.add_parser("linalg", help="stored Cholesky / eigh ÷ numpy LAPACK")
    parser.add_argument("--cholesky-n", type=int, nargs="*", default=[4096, 8192])
    parser.add_argument("--eigh-n", type=int, nargs="*", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=1, help="runs per timing (median)")
    parser.add_argument(
        "--tile-backend",
        choices=TILE_BACKENDS,
        default="auto",
        help="where the out-of-core Cholesky's tile kernels run (auto: host on CPU devices)",
    )
    parser.add_argument(
        "--progress", action="store_true", help="print the tiled factorisations' progress"
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="run on this many simulated CPU devices (a subprocess; they share the host's cores)",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.set_defaults(run=run)


def _in_subprocess(args: argparse.Namespace) -> int:
    """Run this bench again in a fresh interpreter with ``args.devices`` CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    argv = ["bench", "linalg", "--repeats", str(args.repeats), "--devices", str(args.devices)]
    argv += ["--cholesky-n", *map(str, args.cholesky_n), "--eigh-n", *map(str, args.eigh_n)]
    argv += ["--tile-backend", args.tile_backend] + (["--progress"] if args.progress else [])
    argv += ["--json", args.json] if args.json else []
    proc = subprocess.run([sys.executable, "-m", "ntk_dist.cli", *argv], env=env)
    return proc.returncode


def run(args: argparse.Namespace) -> int:
    """Run, print the table, optionally save the rows as JSON."""
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    if args.devices is not None and flag not in os.environ.get("XLA_FLAGS", ""):
        return _in_subprocess(args)
    print(f"jax {jax.__version__} on {_where()}")
    if args.devices is not None and args.devices > (os.cpu_count() or 1):
        print(f"note: {args.devices} simulated devices share {os.cpu_count()} cores")
    rows = bench_linalg(
        args.cholesky_n, args.eigh_n, args.repeats, args.tile_backend, args.progress
    )
    print(format_ratio_table(rows, digits=3))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0
