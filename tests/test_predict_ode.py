"""ODE predictor and its adaptive integrator against independent oracles.

The oracle is a fixed-step RK4 integrator with a tiny step and hand-written loss
gradients, on kernels from explicit Jacobians of a tiny model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ntk_dist.predict.integrator import (
    ConvergenceError,
    DormandPrince45,
    integrate,
    integrate_to_steady_state,
)
from ntk_dist.predict.mse import gradient_descent_mse
from ntk_dist.predict.ode import ODEState, gradient_descent

N_TRAIN, N_TEST, N_IN, C = 6, 3, 3, 3
LR = 0.8


def mse(fx, y):
    return 0.5 * jnp.mean((fx - y) ** 2)


def cross_entropy(fx, y):
    return -jnp.mean(jax.nn.log_softmax(fx) * y)


def mse_grad(fx, y):
    return (fx - y) / y.size


def cross_entropy_grad(fx, y):  # y one-hot: d/dfx of -mean(y * log softmax(fx))
    e = np.exp(fx - fx.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True) - y) / y.size


@pytest.fixture(scope="module")
def data():
    kp1, kp2, kx, kf = jax.random.split(jax.random.PRNGKey(1), 4)
    params = {"w1": jax.random.normal(kp1, (N_IN, 4)), "w2": jax.random.normal(kp2, (4, C)) / 2}

    def model(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    x = jax.random.normal(kx, (N_TRAIN + N_TEST, N_IN))
    jac = jax.jacrev(model)(params, x)
    j = np.concatenate([np.asarray(v).reshape(N_TRAIN + N_TEST, C, -1) for v in jac.values()], -1)
    k_all = np.einsum("icp,jcp->ij", j, j)  # traced over the class axis
    f_all = np.asarray(jax.random.normal(kf, (N_TRAIN + N_TEST, C)))
    y = np.eye(C)[np.arange(N_TRAIN) % C]
    return {
        "k": k_all[:N_TRAIN, :N_TRAIN] + 0.5 * np.eye(N_TRAIN),  # well conditioned
        "kt": k_all[N_TRAIN:, :N_TRAIN],
        "y": y,
        "fx_train_0": f_all[:N_TRAIN],
        "fx_test_0": f_all[N_TRAIN:],
    }


def rk4_oracle(data, loss_grad, momentum, ts, h=1e-3):
    """RK4 in real time t of the (momentum) gradient flow; returns states at sorted ts."""
    k, kt, y = data["k"], data["kt"], data["y"]
    if momentum is None:
        state = np.concatenate([data["fx_train_0"], data["fx_test_0"]])

        def deriv(s):
            g = loss_grad(s[:N_TRAIN], y)
            return -LR * np.concatenate([k @ g, kt @ g])
    else:
        f0 = np.concatenate([data["fx_train_0"], data["fx_test_0"]])
        state = np.concatenate([f0, np.zeros_like(f0)])
        root, friction = np.sqrt(LR), (momentum - 1) / np.sqrt(LR)
        n = N_TRAIN + N_TEST

        def deriv(s):
            g = loss_grad(s[:N_TRAIN], y)
            force = -np.concatenate([k @ g, kt @ g])
            return root * np.concatenate([s[n:], force + friction * s[n:]])

    out, t = [], 0.0
    for t_next in ts:
        steps = int(round((t_next - t) / h))
        for _ in range(steps):
            k1 = deriv(state)
            k2 = deriv(state + h / 2 * k1)
            k3 = deriv(state + h / 2 * k2)
            k4 = deriv(state + h * k3)
            state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t = t_next
        out.append(state.copy())
    return np.stack(out)


@pytest.mark.parametrize(
    ("loss", "loss_grad", "momentum"),
    [
        (mse, mse_grad, None),
        (cross_entropy, cross_entropy_grad, None),
        (cross_entropy, cross_entropy_grad, 0.9),
        (mse, mse_grad, 0.5),
    ],
)
def test_matches_rk4(data, loss, loss_grad, momentum):
    predict = gradient_descent(loss, data["k"], data["y"], LR, momentum)
    ts = np.array([[1.5, 0.0], [0.4, 1.5]])  # unsorted, with a duplicate and t = 0
    fx_train_t, fx_test_t = predict(ts, data["fx_train_0"], data["fx_test_0"], data["kt"])
    assert fx_train_t.shape == (2, 2, N_TRAIN, C) and fx_test_t.shape == (2, 2, N_TEST, C)
    oracle = rk4_oracle(data, loss_grad, momentum, [0.0, 0.4, 1.5])
    for idx, row in [((0, 0), 2), ((0, 1), 0), ((1, 0), 1), ((1, 1), 2)]:
        np.testing.assert_allclose(fx_train_t[idx], oracle[row][:N_TRAIN], rtol=0, atol=1e-8)
        np.testing.assert_allclose(
            fx_test_t[idx], oracle[row][N_TRAIN : N_TRAIN + N_TEST], rtol=0, atol=1e-8
        )
    np.testing.assert_array_equal(fx_train_t[0, 1], data["fx_train_0"])
    # The trajectory actually moved, so the comparison is not vacuous.
    assert np.abs(fx_train_t[0, 0] - data["fx_train_0"]).max() > 0.05


@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_mse_equals_closed_form(data, trace_axes):
    k, kt = data["k"], data["kt"]
    if trace_axes == ():  # K ⊗ I written out in the untraced layout (N, N, C, C)
        k = np.einsum("ij,ab->ijab", k, np.eye(C))
        kt = np.einsum("ij,ab->ijab", kt, np.eye(C))
    args = (data["fx_train_0"], data["fx_test_0"], kt)
    closed = gradient_descent_mse(k, data["y"], LR, trace_axes=trace_axes)
    ode = gradient_descent(mse, k, data["y"], LR, trace_axes=trace_axes)
    ts = np.array([0.0, 3.0, 20.0])
    for a, b in zip(ode(ts, *args), closed(ts, *args), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-8)
    # t = None: the ODE runs to its steady state, which is the closed-form limit.
    for a, b in zip(ode(None, *args), closed(None, *args), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-8)


def test_ode_state_round_trip_and_resume(data):
    predict = gradient_descent(cross_entropy, data["k"], data["y"], LR, momentum=0.9)
    state_0 = ODEState(data["fx_train_0"], data["fx_test_0"])
    s1 = predict(0.7, state_0, k_test_train=data["kt"])
    assert isinstance(s1, ODEState)
    assert len(jax.tree_util.tree_leaves(s1)) == 4
    assert s1.qx_train.shape == (N_TRAIN, C) and s1.qx_test.shape == (N_TEST, C)
    resumed = predict(1.1, s1, k_test_train=data["kt"])
    straight = predict(1.8, state_0, k_test_train=data["kt"])
    for a, b in zip(
        jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(straight), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-8)
    train, test = predict(1.8, data["fx_train_0"], data["fx_test_0"], data["kt"])
    np.testing.assert_allclose(train, straight.fx_train, rtol=0, atol=1e-12)
    np.testing.assert_allclose(test, straight.fx_test, rtol=0, atol=1e-12)
    # A pytree: tree_map over a state keeps the structure.
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, s1)
    np.testing.assert_array_equal(doubled.qx_test, 2 * s1.qx_test)


def test_state_without_momentum_and_without_test(data):
    predict = gradient_descent(mse, data["k"], data["y"], LR)
    out = predict(np.array([0.0, 1.0]), ODEState(data["fx_train_0"]))
    assert out.fx_test is None and out.qx_train is None and out.qx_test is None
    closed = gradient_descent_mse(data["k"], data["y"], LR)(1.0, data["fx_train_0"])
    np.testing.assert_allclose(out.fx_train[1], closed, rtol=0, atol=1e-8)
    # fx_train_or_state_0=None: train starts at 0 and only the test outputs are returned.
    test_only = predict(1.0, None, data["fx_test_0"], data["kt"])
    _, expected = gradient_descent_mse(data["k"], data["y"], LR)(
        1.0, 0.0, data["fx_test_0"], data["kt"]
    )
    np.testing.assert_allclose(test_only, expected, rtol=0, atol=1e-8)


def test_cross_entropy_has_no_steady_state(data):
    predict = gradient_descent(cross_entropy, data["k"], data["y"], LR, max_steps=400)
    with pytest.raises(ConvergenceError, match="no steady state"):
        predict(None, data["fx_train_0"])


def test_bad_inputs(data):
    predict = gradient_descent(mse, data["k"], data["y"])
    with pytest.raises(ValueError, match="fx_test_0 must be None"):
        predict(1.0, ODEState(data["fx_train_0"]), data["fx_test_0"], data["kt"])
    with pytest.raises(ValueError, match="k_test_train is required"):
        predict(1.0, 0.0, data["fx_test_0"])
    with pytest.raises(ValueError, match="t must be finite and >= 0"):
        predict(-1.0, 0.0)
    with pytest.raises(ValueError, match="both None"):
        predict(1.0, None)
    with pytest.raises(ValueError, match=r"k_train_train has shape \(6, 6\)"):
        gradient_descent(mse, data["k"], data["y"], trace_axes=())


def test_float32_uses_reachable_tolerances(data):
    k32, y32 = data["k"].astype(np.float32), data["y"].astype(np.float32)
    fx = gradient_descent(mse, k32, y32, LR)(2.0, data["fx_train_0"])
    assert fx.dtype == jnp.float32
    expected = gradient_descent_mse(data["k"], data["y"], LR)(2.0, data["fx_train_0"])
    np.testing.assert_allclose(fx, expected, rtol=0, atol=1e-4)


def test_integrator_lands_on_times_and_matches_expm():
    a = np.array([[-1.0, 3.0], [-3.0, -1.0]])  # damped rotation
    calls = []

    def rhs(t, y):
        calls.append(t)
        return a @ y

    ts = np.array([0.0, 0.1, 0.1, 2.5, 7.0])
    ys = integrate(rhs, np.array([1.0, 0.5]), ts, rtol=1e-11, atol=1e-13)
    for t, y in zip(ts, ys, strict=True):
        np.testing.assert_allclose(y, scipy.linalg.expm(a * t) @ [1.0, 0.5], rtol=0, atol=1e-10)
    assert {0.1, 2.5, 7.0} <= set(calls)  # steps end exactly on the requested times

    solver = DormandPrince45(rhs, 0.0, np.array([1.0, 0.5]), 1e-6, 1e-8)
    solver.step(t_max=1e-3)
    assert solver.t == 1e-3 and solver.n_steps == 1
    with pytest.raises(ConvergenceError, match="budget of 3 steps"):
        integrate(rhs, np.array([1.0, 0.5]), [50.0], max_steps=3)


def test_integrator_steady_state():
    k = np.array([[2.0, 0.5], [0.5, 0.3]])
    target = np.array([1.0, -2.0])
    t, y = integrate_to_steady_state(lambda t, y: -k @ (y - target), np.zeros(2))
    np.testing.assert_allclose(y, target, rtol=0, atol=1e-9)
    # A solution that keeps moving (here logarithmically, like cross-entropy logits) fails.
    with pytest.raises(ConvergenceError, match="no steady state"):
        integrate_to_steady_state(lambda t, y: np.exp(-y), np.zeros(1), max_steps=300)
