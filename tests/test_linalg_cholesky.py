"""Tiled and in-core Cholesky of stored kernels against numpy/scipy LAPACK."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.linalg
import zarr
from linalg_helpers import KILLED_CHOLESKY, ill_conditioned, ntk_train, rel, store_kernel, to_2d

from ntk_dist.linalg import NotPositiveDefiniteError, StoredKernelOperator
from ntk_dist.linalg.cholesky import PANELS
from ntk_dist.store import KernelStore, NonFiniteTileError


def tiled_bound(n2d, tile, itemsize=8):
    """A memory bound whose tiled Cholesky uses tiles of edge `tile` (and is not in core)."""
    return PANELS * n2d * itemsize * tile


def kernels():
    # A real untraced NTK (50 examples x 2 outputs) and an ill-conditioned traced one.
    return {"ntk": ntk_train(50), "ill": ill_conditioned(90, cond=1e10)}


@pytest.mark.parametrize("name", ["ntk", "ill"])
def test_tiled_cholesky_matches_lapack_with_ragged_tiles(tmp_path, name):
    k = kernels()[name]
    a = to_2d(k)
    n = len(a)
    store = store_kernel(tmp_path / "k", k, block=7)  # store blocks do not align with tiles
    progress = []
    op = StoredKernelOperator(
        store, memory_bound=tiled_bound(n, 23), progress=lambda d, t: progress.append((d, t))
    )
    factor = op.cholesky()
    lower = factor.to_dense()
    assert rel(lower @ lower.T, a) <= 1e-12
    np.testing.assert_allclose(lower, np.linalg.cholesky(a), rtol=0, atol=1e-10 * np.abs(a).max())
    nb = -(-n // 23)
    assert progress == [(j, nb) for j in range(1, nb + 1)]  # ragged: n is not a multiple of 23
    rhs = np.random.default_rng(0).standard_normal((n, 3))
    x = np.asarray(op.solve(rhs))  # backward error of the streamed triangular solves
    assert np.linalg.norm(a @ x - rhs) <= 1e-13 * np.linalg.norm(a, 2) * np.linalg.norm(x)
    expected = scipy.linalg.cho_solve((np.linalg.cholesky(a), True), rhs)
    cond = np.linalg.cond(a)
    assert rel(x, expected) <= 1e-14 * cond
    assert op.factorizations == {"cholesky": 1}


def test_factor_of_a_kernel_that_fits_the_bound_is_stored_and_reused(tmp_path):
    k = ntk_train(30)
    a = to_2d(k) + 0.5 * np.eye(60)
    store = store_kernel(tmp_path / "k", k, block=8)
    op = StoredKernelOperator(store).add_to_diagonal(0.5)
    lower = op.cholesky().to_dense()
    assert rel(lower @ lower.T, a) <= 1e-12 and op.factorizations == {"cholesky": 1}
    again = StoredKernelOperator(KernelStore.open(tmp_path / "k")).add_to_diagonal(0.5)
    np.testing.assert_array_equal(again.cholesky().to_dense(), lower)
    assert again.factorizations == {} and again.reused == {"cholesky": 1}
    other_shift = StoredKernelOperator(store).add_to_diagonal(0.25)
    other_shift.cholesky()
    assert other_shift.factorizations == {"cholesky": 1}


def test_float64_accumulation_of_a_float32_store(tmp_path):
    a = ill_conditioned(70, cond=1e4).astype(np.float32)
    store = store_kernel(tmp_path / "k", a, block=9, dtype=np.float32)
    op = StoredKernelOperator(store, dtype=np.float64, memory_bound=tiled_bound(70, 16))
    lower = op.cholesky().to_dense()
    assert lower.dtype == np.float64
    assert rel(lower @ lower.T, a.astype(np.float64)) <= 1e-12


@pytest.mark.parametrize("tiled", [True, False])  # small tiles, or K fits the bound
def test_not_positive_definite_names_the_pivot(tmp_path, tiled):
    a = ill_conditioned(60, cond=10)
    a[41, :] = a[:, 41] = 0.0
    a[41, 41] = -1.0  # LAPACK fails exactly at global pivot 41
    store = store_kernel(tmp_path / "k", a, block=8)
    op = StoredKernelOperator(store, memory_bound=tiled_bound(60, 16) if tiled else None)
    with pytest.raises(NotPositiveDefiniteError, match=r"pivot 41 .*diag_reg") as info:
        op.cholesky()
    assert info.value.pivot == 41


def test_nan_in_a_store_tile_is_reported_with_the_tile(tmp_path):
    a = ill_conditioned(30, cond=10)
    store_kernel(tmp_path / "k", a, block=7)
    zarr.open_array(str(tmp_path / "k"), mode="r+")[15, 3] = np.nan  # inside tile (2, 0)
    op = StoredKernelOperator(KernelStore.open(tmp_path / "k"), memory_bound=tiled_bound(30, 8))
    with pytest.raises(NonFiniteTileError, match=r"tile \(2, 0\) \(examples 14:21 x 0:7\)"):
        op.cholesky()
    assert not op.all_finite()


def test_killed_factorisation_resumes(tmp_path):
    a = ill_conditioned(100, cond=1e6)
    store_kernel(tmp_path / "k", a, block=9)
    bound = tiled_bound(100, 12)  # 9 block columns
    script = tmp_path / "run.py"
    script.write_text(KILLED_CHOLESKY)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "k"), str(bound), "auto"])
    assert proc.returncode == -9
    progress = []
    op = StoredKernelOperator(
        KernelStore.open(tmp_path / "k"),
        memory_bound=bound,
        progress=lambda d, t: progress.append(d),
    )
    lower = op.cholesky().to_dense()
    assert progress == list(range(4, 10))  # columns 1-3 came from the killed run
    assert rel(lower @ lower.T, a) <= 1e-12


FOUR_DEVICES = """
import sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from ntk_dist.linalg import StoredKernelOperator
from ntk_dist.store import KernelStore

store = KernelStore.open(sys.argv[1])
a = np.load(sys.argv[2])
op = StoredKernelOperator(store, memory_bound=int(sys.argv[3]))
lower = op.cholesky().to_dense()
res = np.linalg.norm(lower @ lower.T - a) / np.linalg.norm(a)
print(len(jax.local_devices()), res)
"""


def test_tiled_cholesky_on_four_cpu_devices(tmp_path):
    k = ntk_train(70)
    a = to_2d(k)
    store_kernel(tmp_path / "k", k, block=11)
    np.save(tmp_path / "a.npy", a)
    script = tmp_path / "run.py"
    script.write_text(FOUR_DEVICES)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "k"), str(tmp_path / "a.npy")]
        + [str(tiled_bound(140, 25))],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] == "4" and float(out[1]) <= 1e-12, textwrap.shorten(str(out), 200)
