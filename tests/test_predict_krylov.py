"""gradient_descent_mse(method="krylov"): block Lanczos predictions without an eigh,
against scipy's matrix exponential of the dense kernel, in memory and on stores."""

import jax
import numpy as np
import pytest
import scipy.linalg
from linalg_helpers import mlp, mlp_params, ntk, rel, store_kernel, to_2d

from ntk_dist.linalg import DenseKernelOperator, StoredKernelOperator
from ntk_dist.linalg.lanczos import krylov_eigendecomposition, ritz_values
from ntk_dist.predict import gradient_descent_mse

N_TRAIN, N_TEST, DIAG_REG, LR = 60, 11, 1e-3, 0.7


def oracle(k, kt, y, f0, ft0, t):
    """The in-memory formula with expm and a dense solve (trace_axes=())."""
    k2, kt2 = to_2d(k), to_2d(kt)
    k2 = k2 + DIAG_REG * np.mean(np.diag(k2)) * np.eye(len(k2))
    r = (f0 - y).reshape(-1, 1)
    flow = scipy.linalg.expm(-k2 * t * LR / r.size) - np.eye(len(k2))
    train = f0 + (flow @ r).reshape(f0.shape)
    test = ft0 + (kt2 @ np.linalg.solve(k2, flow @ r)).reshape(ft0.shape)
    return train, test


@pytest.mark.parametrize("where", ["memory", "store"])
def test_krylov_predictions_match_expm_without_an_eigh(tmp_path, where):
    params = mlp_params(hidden=16, seed=2)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (N_TRAIN + N_TEST, 3)))
    k = ntk(x[:N_TRAIN], x[:N_TRAIN], params, False)
    kt = ntk(x[N_TRAIN:], x[:N_TRAIN], params, False)
    y = np.asarray(jax.random.normal(jax.random.PRNGKey(8), (N_TRAIN, 2)))
    f0, ft0 = np.asarray(mlp(params, x[:N_TRAIN])), np.asarray(mlp(params, x[N_TRAIN:]))
    if where == "store":
        n = 2 * N_TRAIN  # a bound that streams K (it is not held twice) and holds the basis
        bound = int(1.5 * n * n * 8)
        train = StoredKernelOperator(store_kernel(tmp_path / "k", k, 16), memory_bound=bound)
        test = store_kernel(tmp_path / "kt", kt, 8, symmetric=False)
    else:
        train, test = DenseKernelOperator.from_kernel(k), kt
    predict = gradient_descent_mse(train, y, LR, diag_reg=DIAG_REG, trace_axes=(), method="krylov")
    times = np.array([0.0, 1.0, 30.0, 1e3, 1e5])
    got_train, got_test = predict(times, f0, ft0, test)
    for i, t in enumerate(times):
        want_train, want_test = oracle(k, kt, y, f0, ft0, t)
        assert rel(got_train[i], want_train) <= 1e-9
        assert rel(got_test[i], want_test) <= 1e-9
    op = predict.kernel_operator
    assert "eigh" not in op.factorizations and op._eigh is None  # never decomposed
    scalar = predict(30.0, f0)  # a scalar time, train outputs only
    assert rel(scalar, oracle(k, kt, y, f0, ft0, 30.0)[0]) <= 1e-9


def test_krylov_space_is_smaller_than_the_kernel_for_short_times():
    # A short time needs few Lanczos steps: fewer products than the kernel has rows.
    params = mlp_params(hidden=16, seed=2)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (150, 3)))
    k = ntk(x, x, params, False)
    op = DenseKernelOperator.from_kernel(k)
    products = []
    real = op.matmul
    op.matmul = lambda rhs: products.append(rhs.shape[1]) or real(rhs)
    y = np.asarray(jax.random.normal(jax.random.PRNGKey(8), (150, 2)))
    got = gradient_descent_mse(op, y, trace_axes=(), method="krylov")(1.0, 0.0)
    k2 = to_2d(k)
    want = (scipy.linalg.expm(-k2 / y.size) - np.eye(len(k2))) @ (-y.reshape(-1, 1))
    assert rel(got, want.reshape(y.shape)) <= 1e-9
    assert sum(products) < len(k2) // 2


def test_ritz_values_find_the_ends_of_the_spectrum():
    a = np.diag(np.linspace(-3.0, 5.0, 200)) + 1e-3 * np.eye(200, k=1) + 1e-3 * np.eye(200, k=-1)
    w = np.linalg.eigvalsh(a)
    theta = ritz_values(lambda v: a @ v, 200, rtol=1e-13)
    assert abs(theta[-1] - w[-1]) <= 1e-10 * abs(w[-1])
    theta = ritz_values(lambda v: a @ v, 200)  # to the end: every eigenvalue
    np.testing.assert_allclose(theta, w, rtol=0, atol=1e-12)


def test_bad_method_is_refused():
    with pytest.raises(ValueError, match="method must be 'eigh' or 'krylov'"):
        gradient_descent_mse(np.eye(3), np.ones((3, 1)), method="lanczos")


def test_a_krylov_space_that_outgrows_the_memory_bound_is_refused(tmp_path):
    params = mlp_params(hidden=16, seed=2)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (N_TRAIN, 3)))
    k = ntk(x, x, params, False)
    n = 2 * N_TRAIN
    op = StoredKernelOperator(store_kernel(tmp_path / "k", k, 16), memory_bound=10 * n * 8)
    y = np.asarray(jax.random.normal(jax.random.PRNGKey(8), (N_TRAIN, 2)))
    predict = gradient_descent_mse(op, y, diag_reg=DIAG_REG, trace_axes=(), method="krylov")
    with pytest.raises(ValueError, match=r"limit of 1[0-2] columns .* raise the memory bound"):
        predict(1e6, 0.0)


def test_a_krylov_space_bounded_by_the_whole_space_ends_exact():
    # n = 10 rows, blocks of 3: the space reaches R^10 (3 + 3 + 3 + 1) and is then exact,
    # however slowly a long time converges.
    rng = np.random.default_rng(0)
    g = rng.standard_normal((10, 10))
    k = g @ g.T + 1e-3 * np.eye(10)
    start = rng.standard_normal((10, 3))
    eigen = krylov_eigendecomposition(
        lambda x: k @ x, start, lambda theta: [np.exp(-1e4 * theta)], max_dim=10
    )
    want = scipy.linalg.expm(-1e4 * k) @ start
    got = np.asarray(eigen.apply(np.exp(-1e4 * np.asarray(eigen.values)), start))
    assert np.abs(got - want).max() <= 1e-12 * np.abs(start).max()


def test_krylov_accuracy_does_not_depend_on_the_size_of_the_start():
    # The start's norm is not K's: a residual of 1e12 must not hide K's small directions.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    k = (q * np.logspace(-6, 0, 40)) @ q.T
    for size in (1e-12, 1.0, 1e12):
        start = size * rng.standard_normal((40, 2))
        eigen = krylov_eigendecomposition(
            lambda x: k @ x, start, lambda theta: [np.exp(-1e3 * theta)], max_dim=40
        )
        got = np.asarray(eigen.apply(np.exp(-1e3 * np.asarray(eigen.values)), start))
        want = scipy.linalg.expm(-1e3 * k) @ start
        assert rel(got, want) <= 1e-10, size
