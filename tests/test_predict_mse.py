"""Closed-form MSE predictor and max_learning_rate against independent oracles.

Kernels come from explicit Jacobians (``jax.jacrev``) of a tiny model; dynamics are
checked against ``scipy.linalg.expm`` of the linear ODE and against real gradient descent
on the linearised network.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ntk_dist.linalg.operator import DenseKernelOperator, make_2d, unmake_2d
from ntk_dist.predict.kernel_matrix import OutputLayout
from ntk_dist.predict.learning_rate import max_learning_rate
from ntk_dist.predict.mse import gradient_descent_mse

N_TRAIN, N_TEST, N_IN, C = 7, 4, 3, 2


def model(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def init_params(key, hidden):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (N_IN, hidden)),
        "b1": jax.random.normal(k2, (hidden,)),
        "w2": jax.random.normal(k3, (hidden, C)) / np.sqrt(hidden),
    }


def jacobian(params, x):
    """Explicit Jacobian of the flattened outputs, shape (len(x) * C, n_params)."""
    jac = jax.jacrev(model)(params, x)
    leaves = jax.tree_util.tree_leaves(jac)
    return np.concatenate([np.asarray(j).reshape(len(x) * C, -1) for j in leaves], axis=1)


class Problem:
    """Train/test data, outputs and Jacobian-based kernels in both layouts."""

    def __init__(self, hidden=5, seed=0):
        kp, kx, ky, kf = jax.random.split(jax.random.PRNGKey(seed), 4)
        self.params = init_params(kp, hidden)
        x = jax.random.normal(kx, (N_TRAIN + N_TEST, N_IN))
        self.x_train, self.x_test = x[:N_TRAIN], x[N_TRAIN:]
        self.y = np.asarray(jax.random.normal(ky, (N_TRAIN, C)))
        self.fx_train_0 = np.asarray(model(self.params, self.x_train))
        self.fx_test_0 = np.asarray(model(self.params, self.x_test))
        self.j_train = jacobian(self.params, self.x_train)
        self.j_test = jacobian(self.params, self.x_test)
        # Untraced kernels, as 2-D matrices over flattened (example, channel) and in layout.
        self.a_untraced = self.j_train @ self.j_train.T
        self.b_untraced = self.j_test @ self.j_train.T
        self.k_untraced = self.a_untraced.reshape(N_TRAIN, C, N_TRAIN, C).transpose(0, 2, 1, 3)
        self.kt_untraced = self.b_untraced.reshape(N_TEST, C, N_TRAIN, C).transpose(0, 2, 1, 3)
        # Traced kernels (sum over channels) act as K ⊗ I on the channel axis.
        jt = self.j_train.reshape(N_TRAIN, C, -1)
        js = self.j_test.reshape(N_TEST, C, -1)
        self.k_traced = np.einsum("icp,jcp->ij", jt, jt)
        self.kt_traced = np.einsum("icp,jcp->ij", js, jt)

    def kernels(self, traced):
        """(kernel, k_test_train, 2-D train operator, 2-D test operator) for the oracle."""
        if traced:
            eye = np.eye(C)
            return (
                self.k_traced,
                self.kt_traced,
                np.kron(self.k_traced, eye),
                np.kron(self.kt_traced, eye),
            )
        return self.k_untraced, self.kt_untraced, self.a_untraced, self.b_untraced


def expm_oracle(a, b, y, fx_train_0, fx_test_0, t, lr):
    """Joint linear ODE d[f - y; f_test]/dt = -lr/n [A; B] (f - y), solved by expm."""
    n_tr, n = a.shape[0], y.size
    m = np.zeros((n_tr + b.shape[0],) * 2)
    m[:, :n_tr] = -np.vstack([a, b]) * lr / n
    z = scipy.linalg.expm(m * t) @ np.concatenate([(fx_train_0 - y).ravel(), fx_test_0.ravel()])
    return z[:n_tr].reshape(y.shape) + y, z[n_tr:].reshape(fx_test_0.shape)


def assert_close(actual, expected, rtol=1e-8):
    scale = max(np.abs(expected).max(), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.fixture(scope="module")
def problem():
    return Problem()


def test_make_2d_round_trip_and_layout():
    k = np.arange(3 * 3 * 2 * 2 * 4 * 4, dtype=float).reshape(3, 3, 2, 2, 4, 4)
    m = np.asarray(make_2d(k))
    # Entry ((i, a, b), (j, c, d)) of the 2-D form is k[i, j, a, c, b, d].
    assert m[(1 * 2 + 1) * 4 + 2, (2 * 2 + 0) * 4 + 3] == k[1, 2, 1, 0, 2, 3]
    np.testing.assert_array_equal(unmake_2d(m, (3, 2, 4), (3, 2, 4)), k)

    layout = OutputLayout.create((-1, 2), 4)
    y = np.arange(3 * 2 * 5 * 6, dtype=float).reshape(3, 2, 5, 6)
    mat = layout.to_matrix(y)
    assert mat.shape == (6, 30)
    np.testing.assert_array_equal(mat[1 * 2 + 1], y[1, 1].ravel())
    np.testing.assert_array_equal(layout.from_matrix(jnp.stack([mat, 2 * mat]), y.shape)[1], 2 * y)


def test_dense_operator_matmul_matches_einsum(problem):
    op = DenseKernelOperator.from_kernel(problem.k_untraced)
    rhs = np.random.default_rng(0).standard_normal((N_TRAIN * C, 3))
    expected = np.einsum("ijab,jbk->iak", problem.k_untraced, rhs.reshape(N_TRAIN, C, 3))
    np.testing.assert_allclose(op.matmul(rhs), expected.reshape(-1, 3), rtol=1e-12)
    np.testing.assert_allclose(op.diagonal(), np.diag(problem.a_untraced), rtol=1e-12)


@pytest.mark.parametrize("traced", [True, False])
def test_matches_expm_train_and_test(problem, traced):
    k, kt, a, b = problem.kernels(traced)
    trace_axes = (-1,) if traced else ()
    lr = 0.7
    predict = gradient_descent_mse(k, problem.y, learning_rate=lr, trace_axes=trace_axes)
    ts = np.array([[0.0, 0.3], [2.0, 40.0]])
    fx_train_t, fx_test_t = predict(ts, problem.fx_train_0, problem.fx_test_0, kt)
    assert fx_train_t.shape == (2, 2, N_TRAIN, C) and fx_test_t.shape == (2, 2, N_TEST, C)
    for idx in np.ndindex(ts.shape):
        exp_train, exp_test = expm_oracle(
            a, b, problem.y, problem.fx_train_0, problem.fx_test_0, ts[idx], lr
        )
        assert_close(fx_train_t[idx], exp_train)
        assert_close(fx_test_t[idx], exp_test)
    # Scalar t: no leading axis; t = 0 returns the initial outputs.
    train_s, test_s = predict(2.0, problem.fx_train_0, problem.fx_test_0, kt)
    assert_close(train_s, fx_train_t[1, 0], rtol=1e-13)
    assert_close(test_s, fx_test_t[1, 0], rtol=1e-13)
    np.testing.assert_allclose(fx_train_t[0, 0], problem.fx_train_0, rtol=1e-14)
    np.testing.assert_allclose(fx_test_t[0, 0], problem.fx_test_0, rtol=1e-14)


@pytest.mark.parametrize(
    ("fx_train_0", "diag_reg", "absolute"),
    [(None, 0.0, False), (0.3, 0.1, False), ("array", 0.05, True)],
)
def test_initial_outputs_and_diag_reg(problem, fx_train_0, diag_reg, absolute):
    k, kt, a, b = problem.kernels(traced=True)
    if isinstance(fx_train_0, str):
        fx_train_0 = problem.fx_train_0
    fx_train_array = np.broadcast_to(0.0 if fx_train_0 is None else fx_train_0, problem.y.shape)
    scale = 1.0 if absolute else np.trace(k) / N_TRAIN
    a = a + diag_reg * scale * np.eye(a.shape[0])
    predict = gradient_descent_mse(
        k, problem.y, diag_reg=diag_reg, diag_reg_absolute_scale=absolute
    )
    out = predict(np.array([0.5, 5.0]), fx_train_0, problem.fx_test_0, kt)
    fx_test_t = out if fx_train_0 is None else out[1]
    for i, t in enumerate([0.5, 5.0]):
        exp_train, exp_test = expm_oracle(
            a, b, problem.y, fx_train_array, problem.fx_test_0, t, 1.0
        )
        assert_close(fx_test_t[i], exp_test)
        if fx_train_0 is not None:
            assert_close(out[0][i], exp_train)
    # Train-only prediction when fx_test_0 is None.
    if fx_train_0 is not None:
        assert_close(predict(5.0, fx_train_0), out[0][1], rtol=1e-13)


def test_traced_middle_axis_equals_explicit_kronecker():
    """trace_axes=(1,) on y (N, C, H) equals the untraced kernel K ⊗ I written out."""
    rng = np.random.default_rng(0)
    n, c, h, m = 4, 2, 3, 2
    g = rng.standard_normal((n + m, h, 20))
    k_all = np.einsum("iap,jbp->ijab", g, g)  # (N, N, H, H)
    k, kt = k_all[:n, :n], k_all[n:, :n]
    y, f0, ft0 = (rng.standard_normal((s, c, h)) for s in (n, n, m))
    full = np.einsum("ijab,cd->ijcdab", k, np.eye(c))
    full_t = np.einsum("ijab,cd->ijcdab", kt, np.eye(c))
    traced = gradient_descent_mse(k, y, trace_axes=(1,))
    untraced = gradient_descent_mse(full, y, trace_axes=())
    for t in [np.array([0.5, 4.0]), None]:
        for a, b in zip(traced(t, f0, ft0, kt), untraced(t, f0, ft0, full_t), strict=True):
            assert_close(a, b, rtol=1e-12)


@pytest.mark.parametrize("traced", [True, False])
def test_infinite_time(problem, traced):
    k, kt, a, b = problem.kernels(traced)
    predict = gradient_descent_mse(k, problem.y, trace_axes=(-1,) if traced else ())
    fx_train_inf, fx_test_inf = predict(None, problem.fx_train_0, problem.fx_test_0, kt)
    np.testing.assert_array_equal(fx_train_inf, problem.y)
    delta = np.linalg.solve(a, (problem.y - problem.fx_train_0).ravel())
    assert_close(fx_test_inf, problem.fx_test_0 + (b @ delta).reshape(N_TEST, C))
    # fx_train_0 None: the residual is y itself; only test outputs are returned.
    test_only = predict(None, None, problem.fx_test_0, kt)
    delta = np.linalg.solve(a, problem.y.ravel())
    assert_close(test_only, problem.fx_test_0 + (b @ delta).reshape(N_TEST, C))
    # Long finite time approaches the same limit.
    _, fx_test_long = predict(1e5, problem.fx_train_0, problem.fx_test_0, kt)
    assert_close(fx_test_long, fx_test_inf, rtol=1e-7)


def test_rank_deficient_kernel_has_no_nan():
    # 1 hidden unit: 3 + 1 + 2 = 6 parameters for 14 outputs, so K = J J^T has rank <= 6.
    p = Problem(hidden=1, seed=3)
    k, kt, a, b = p.kernels(traced=False)
    assert np.linalg.matrix_rank(a) <= 6
    predict = gradient_descent_mse(k, p.y, learning_rate=0.5, trace_axes=())
    for t in [0.0, 1.0, 30.0, 1e3]:
        fx_train_t, fx_test_t = predict(t, p.fx_train_0, p.fx_test_0, kt)
        assert np.all(np.isfinite(fx_train_t)) and np.all(np.isfinite(fx_test_t))
        exp_train, exp_test = expm_oracle(a, b, p.y, p.fx_train_0, p.fx_test_0, t, 0.5)
        assert_close(fx_train_t, exp_train)
        assert_close(fx_test_t, exp_test)


def test_exact_zero_eigenvalue_uses_limit():
    # eigh of a diagonal matrix returns its exact diagonal, including an exact 0.
    lam = np.array([0.0, 0.5, 2.0])
    k, kt = np.diag(lam), np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 1.0]])
    y = np.array([[1.0], [2.0], [-1.0]])
    predict = gradient_descent_mse(k, y)
    t = 3.0
    fx_train_t, fx_test_t = predict(t, 0.0, 0.0, kt)
    exp_train, exp_test = expm_oracle(k, kt, y, np.zeros_like(y), np.zeros((2, 1)), t, 1.0)
    assert_close(fx_train_t, exp_train, rtol=1e-12)
    assert_close(fx_test_t, exp_test, rtol=1e-12)
    # Mode 0 does not move the train output and moves the test output by k_t[:, 0] * t / n.
    assert fx_train_t[0, 0] == 0.0
    assert fx_test_t[0, 0] == pytest.approx(t / y.size * y[0, 0], rel=1e-12)


def test_negative_eigenvalue_is_clamped_to_zero():
    # Round-off can make a PSD kernel slightly indefinite; such modes are frozen, not grown.
    k, kt, y = np.diag([-1.0, 1.0]), np.array([[1.0, 1.0]]), np.array([[1.0], [1.0]])
    fx_train_t, fx_test_t = gradient_descent_mse(k, y)(4.0, 0.0, 0.0, kt)
    clamped_train, clamped_test = expm_oracle(
        np.diag([0.0, 1.0]), kt, y, 0 * y, 0 * kt[:, :1], 4.0, 1.0
    )
    assert_close(fx_train_t, clamped_train, rtol=1e-14)
    assert_close(fx_test_t, clamped_test, rtol=1e-14)


def test_matches_real_gradient_descent_on_linearised_network(problem):
    """Discrete GD with step eta approaches the flow; the gap is bounded by eta."""
    a, b = problem.a_untraced, problem.b_untraced
    n = problem.y.size
    lam_max = np.linalg.eigvalsh(a)[-1]
    eta = 1e-3 * n / lam_max  # x_max = eta * lam_max / n = 1e-3
    steps = 3000
    r0 = (problem.fx_train_0 - problem.y).ravel()
    theta = np.zeros(problem.j_train.shape[1])  # displacement from the initial parameters
    for _ in range(steps):
        f = problem.fx_train_0.ravel() + problem.j_train @ theta
        theta = theta - eta / n * problem.j_train.T @ (f - problem.y.ravel())
    gd_train = problem.fx_train_0.ravel() + problem.j_train @ theta
    gd_test = problem.fx_test_0.ravel() + problem.j_test @ theta

    predict = gradient_descent_mse(problem.k_untraced, problem.y, learning_rate=eta, trace_axes=())
    fx_train_t, fx_test_t = predict(
        steps, problem.fx_train_0, problem.fx_test_0, problem.kt_untraced
    )
    # Per mode |exp(-kx) - (1-x)^k| <= x / (2e(1-x)) with x = eta*lam/n <= 1e-3, and the test
    # outputs see that gap divided by lam, times ||B||.
    x_max = 1e-3
    bound_train = np.linalg.norm(r0) * x_max / (2 * np.e * (1 - x_max))
    bound_test = np.linalg.norm(b, 2) * np.linalg.norm(r0) * (eta / n) / (2 * np.e * (1 - x_max))
    moved = np.linalg.norm(gd_train - problem.fx_train_0.ravel())
    assert moved > 100 * bound_train  # the comparison is not vacuous
    assert np.linalg.norm(np.ravel(fx_train_t) - gd_train) <= bound_train
    assert np.linalg.norm(np.ravel(fx_test_t) - gd_test) <= bound_test


def test_factorizations_are_computed_once(problem):
    k, kt, _, _ = problem.kernels(traced=True)
    predict = gradient_descent_mse(k, problem.y, diag_reg=1e-3)
    assert predict.kernel_operator.factorizations == {}
    for t in [None, 1.0, np.array([2.0, 3.0]), None, 0.5]:
        predict(t, problem.fx_train_0, problem.fx_test_0, kt)
    assert predict.kernel_operator.factorizations == {"eigh": 1, "cholesky": 1}


def test_bad_inputs(problem):
    k, kt, _, _ = problem.kernels(traced=True)
    y = problem.y
    with pytest.raises(ValueError, match=r"k_train_train has shape \(7, 7\).*check trace_axes"):
        gradient_descent_mse(k, y, trace_axes=())
    with pytest.raises(ValueError, match="out of range"):
        gradient_descent_mse(k, y, trace_axes=(5,))
    with pytest.raises(ValueError, match="even number of axes"):
        gradient_descent_mse(k[0], y)
    bad = k.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="k_train_train contains NaN or Inf"):
        gradient_descent_mse(bad, y)
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        gradient_descent_mse(k, y, learning_rate=0.0)
    predict = gradient_descent_mse(k, y)
    with pytest.raises(ValueError, match="both None"):
        predict(1.0, None, None)
    with pytest.raises(ValueError, match="k_test_train is required"):
        predict(1.0, 0.0, problem.fx_test_0)
    with pytest.raises(ValueError, match=r"k_test_train has shape \(4, 6\)"):
        predict(1.0, 0.0, problem.fx_test_0, kt[:, :6])
    bad_kt = kt.copy()
    bad_kt[0, 0] = np.inf
    with pytest.raises(ValueError, match="k_test_train contains NaN or Inf"):
        predict(1.0, 0.0, problem.fx_test_0, bad_kt)
    singular = gradient_descent_mse(np.zeros((N_TRAIN, N_TRAIN)), y)
    with pytest.raises(ValueError, match="not positive definite.*diag_reg"):
        singular(None, 0.0, problem.fx_test_0, kt)


def test_max_learning_rate_matches_eigvalsh(problem):
    lam_max = np.linalg.eigvalsh(problem.a_untraced)[-1]
    lr = max_learning_rate(problem.k_untraced)
    assert lr == pytest.approx(2 * N_TRAIN * C / (lam_max + 1e-12), rel=1e-10)
    lr = max_learning_rate(problem.k_traced, y_train_size=14, momentum=0.5, eps=0.0)
    lam_max = np.linalg.eigvalsh(problem.k_traced)[-1]
    assert lr == pytest.approx(2 * 1.5 * 14 / lam_max, rel=1e-10)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_max_learning_rate_separates_convergence_from_divergence(momentum):
    """Heavy-ball GD on 0.5/n ||J theta - y||^2 converges just below the rate, diverges above."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    v, _ = np.linalg.qr(rng.standard_normal((10, 6)))
    j = u @ np.diag(np.linspace(1.0, 1.5, 6)) @ v.T  # well conditioned: all modes are fast
    y = rng.standard_normal(6)
    lr_max = max_learning_rate(j @ j.T, momentum=momentum)

    def final_loss(lr):
        theta, velocity = np.zeros(10), np.zeros(10)
        for _ in range(2000):
            velocity = momentum * velocity - lr * j.T @ (j @ theta - y) / y.size
            theta = theta + velocity
        return np.sum((j @ theta - y) ** 2)

    assert final_loss(0.99 * lr_max) < 1e-20
    assert final_loss(1.01 * lr_max) > 1e20
