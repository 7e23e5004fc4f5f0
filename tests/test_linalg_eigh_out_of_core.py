"""Out-of-core eigh (spectral divide and conquer, tiled QDWH) against numpy LAPACK."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from linalg_helpers import (
    ill_conditioned,
    mlp,
    mlp_params,
    ntk,
    ntk_train,
    rel,
    store_kernel,
    to_2d,
)

from ntk_dist.linalg import StoredKernelOperator, qdwh
from ntk_dist.linalg.eigh import IN_CORE_COPIES, StoredEigendecomposition
from ntk_dist.linalg.qdwh import divide_and_conquer_eigh
from ntk_dist.predict import gradient_descent_mse
from ntk_dist.store import KernelStore


def in_core_up_to(m):
    """A memory bound that holds the in-core eigh of an m x m block and no larger one
    (JAX's; the host's in 1.5 copies holds ~1.6 m, so stores bigger than that go out of
    core)."""
    return IN_CORE_COPIES * m * m * 8


def clustered(n, values, seed=0):
    """Symmetric matrix with the given (repeated) eigenvalues in a random basis."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (q * np.asarray(values)) @ q.T


def check(a, w, v):
    norm = np.linalg.norm(a, 2)
    n = len(a)
    assert np.linalg.norm(a @ v - v * w) / norm <= 1e-10
    assert np.linalg.norm(v.T @ v - np.eye(n)) <= 1e-10
    np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * norm)


@pytest.mark.parametrize("name", ["ntk", "ill"])
def test_out_of_core_eigh_of_a_store_matches_lapack_and_is_reused(tmp_path, name):
    k = ntk_train(150) if name == "ntk" else ill_conditioned(200, cond=1e10)
    a = to_2d(k)
    n = len(a)
    bound = in_core_up_to(n // 2)  # ragged tiles, as are the store's blocks of 64
    store = store_kernel(tmp_path / "k", k, block=64)
    op = StoredKernelOperator(store, memory_bound=bound)
    eig = op.eigh()
    assert isinstance(eig, StoredEigendecomposition)
    assert op.factorizations == {"eigh": 1}
    check(a, np.asarray(eig.values), eig.vectors_dense())
    assert not (
        tmp_path / "k" / "ntk_dist_linalg" / f"{op.factor_name('eigenvectors')}-scratch"
    ).exists()
    again = StoredKernelOperator(KernelStore.open(tmp_path / "k"), memory_bound=bound)
    again.eigh()
    assert again.factorizations == {} and again.reused == {"eigh": 1}


@pytest.mark.parametrize(
    "bulk, at, outliers, in_core, method, basis, splits",
    [
        ((0.5, 1.0), 50, 6, 60, "reflector", "subspace iteration", 2),
        ((0.8, 0.0), 50, 6, 60, "reflector", "subspace iteration", 1),
        ((0.6, 0.4), 2, 12, 74, "reflector", "polar factor", 1),
        ((0.5, 1.0), 50, 60, 60, "bases", "polar factor", 1),
    ],
)
def test_every_split_method_matches_lapack(
    tmp_path, bulk, at, outliers, in_core, method, basis, splits
):
    # 6 outliers far from a bulk (uniform over [start, start + width]): found by subspace
    # iteration, split by one block reflector (the larger child splits again, or is
    # 0.8 I); 12 outliers close to a narrow bulk (too slow for subspace iteration) and a
    # bound whose leaves (1.5 copies on the host) hold the other 118: QDWH's polar
    # factor at the gap, then a reflector; 60 of 130: the n x s arrays do not fit the
    # bound, so bases of both sides
    rng = np.random.default_rng(3)
    n = 130
    body = bulk[0] + bulk[1] * rng.random(n - outliers)
    a = clustered(n, np.concatenate([body, at + rng.random(outliers)]), seed=4)
    scratch, methods = tmp_path / "scratch", []

    def seen(key):
        if key.startswith("split_"):
            with open(scratch / "ledger" / f"{key}.json") as f:
                info = json.load(f)
            methods.append((key, info["method"], info["basis"]))

    w, v = divide_and_conquer_eigh(
        lambda r, c: a[r, c],
        n,
        np.float64,
        40,
        in_core_up_to(in_core),
        scratch_dir=str(scratch),
        progress=seen,
        two_stage_blocks=False,  # QDWH's splits all the way down, as on devices
    )
    check(a, w, v)
    assert methods[0] == ("split_r", method, basis)
    assert len(methods) >= splits  # 124 random eigenvalues do not fit in core: split again


def test_repeated_eigenvalues_and_a_multiple_of_the_identity_block():
    # 120 equal eigenvalues: the block above the first split is 2 I, bigger than in-core.
    a = clustered(150, [1.0] * 30 + [2.0] * 120)
    w, v = divide_and_conquer_eigh(lambda r, c: a[r, c], 150, np.float64, 40, in_core_up_to(60))
    check(a, w, v)
    # three clusters of width 1e-9: a two-level recursion
    values = np.repeat([0.5, 1.0, 3.0], [50, 50, 40]) + 1e-9 * np.random.default_rng(1).random(140)
    a = clustered(140, values, seed=2)
    w, v = divide_and_conquer_eigh(lambda r, c: a[r, c], 140, np.float64, 30, in_core_up_to(40))
    check(a, w, v)


def test_mse_predictions_at_finite_t_on_an_out_of_core_store(tmp_path):
    params = mlp_params()
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (70, 3)))
    x_train, x_test = x[:60], x[60:]
    k, kt = ntk(x_train, x_train, params, False), ntk(x_test, x_train, params, False)
    y = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (60, 2)))
    f0, ft0 = np.asarray(mlp(params, x_train)), np.asarray(mlp(params, x_test))
    op = StoredKernelOperator(store_kernel(tmp_path / "k", k, 24), memory_bound=in_core_up_to(70))
    kw = {"learning_rate": 0.5, "diag_reg": 1e-4, "trace_axes": ()}
    stored, memory = gradient_descent_mse(op, y, **kw), gradient_descent_mse(k, y, **kw)
    for t in [3.0, np.array([0.5, 40.0])]:
        for got, want in zip(stored(t, f0, ft0, kt), memory(t, f0, ft0, kt), strict=True):
            assert rel(got, want) <= 1e-9
    assert stored.kernel_operator.factorizations == {"eigh": 1}


SCRIPT = """
import sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
sys.path.insert(0, sys.argv[1])
from linalg_helpers import ntk_train, to_2d
from ntk_dist.linalg import qdwh
from ntk_dist.linalg.qdwh import divide_and_conquer_eigh
assert len(jax.local_devices()) == 4
a = to_2d(ntk_train(50, seed=3))
# the jitted JAX tile kernels, round robin over the 4 devices (the path for GPUs and TPUs)
w, v = divide_and_conquer_eigh(lambda r, c: a[r, c], 100, np.float64, 30, 4 * 70 * 70 * 8,
                               kernels="device")
norm = np.linalg.norm(a, 2)
print(np.linalg.norm(a @ v - v * w) / norm, np.linalg.norm(v.T @ v - np.eye(100)),
      np.abs(w - np.linalg.eigvalsh(a)).max() / norm)
"""


def test_out_of_core_eigh_with_jax_tile_kernels_on_four_cpu_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    tests = os.path.dirname(__file__)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, tests], env=env, capture_output=True, text=True, check=True
    )
    residual, orthogonality, values = map(float, out.stdout.split())
    assert residual <= 1e-10 and orthogonality <= 1e-10 and values <= 1e-12


def test_when_every_split_from_the_exact_spectrum_fails_the_sampled_ones_follow(monkeypatch):
    # Splitting inside a cluster of width 1e-9 fails the coupling check; forced to try
    # only there at the top, the eigh must go on with the sample's split points.
    values = np.repeat([0.5, 1.0, 3.0], [50, 50, 40]) + 1e-9 * np.random.default_rng(1).random(140)
    a = clustered(140, values, seed=2)
    inside = float(np.sort(values)[75] + np.sort(values)[74]) / 2
    real_tries, real_polar = qdwh._exact_tries, qdwh.polar_factor
    polar_shifts = []

    def in_the_cluster(w, *args):
        if len(w) != 140:  # the children: as usual
            return real_tries(w, *args)
        return [qdwh._SplitTry(inside, 1e-12, True, fast, w[0], w[-1]) for fast in (True, False)]

    def polar(ctx, x, scale, bound, estimated=False):
        polar_shifts.append(bound)
        return real_polar(ctx, x, scale, bound, estimated)

    monkeypatch.setattr(qdwh, "_exact_tries", in_the_cluster)
    monkeypatch.setattr(qdwh, "polar_factor", polar)
    w, v = divide_and_conquer_eigh(
        lambda r, c: a[r, c], 140, np.float64, 30, in_core_up_to(40), two_stage_blocks=False
    )
    check(a, w, v)
    assert len(polar_shifts) >= 3  # both forced tries, then at least one of the sample's
