"""Weight-space prediction: f_lin(params_t) matches the function-space prediction and real GD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_dist.predict.mse import gradient_descent_mse
from ntk_dist.predict.weight_space import gradient_descent_mse_params

N, N_IN, C = 5, 3, 2


def model(params, x, scale=1.0):
    return scale * jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


@pytest.fixture(scope="module")
def setup():
    k1, k2, k3, kx, ky = jax.random.split(jax.random.PRNGKey(2), 5)
    params = {
        "w1": jax.random.normal(k1, (N_IN, 4)),
        "b1": jax.random.normal(k2, (4,)),
        "w2": jax.random.normal(k3, (4, C)) / 2,
    }
    x = jax.random.normal(kx, (N, N_IN))
    y = np.asarray(jax.random.normal(ky, (N, C)))
    flat, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jacrev(lambda p: model(unravel(p), x, scale=0.5))(flat)).reshape(N * C, -1)
    k_untraced = (jac @ jac.T).reshape(N, C, N, C).transpose(0, 2, 1, 3)
    return {"params": params, "x": x, "y": y, "jac": jac, "k": k_untraced, "unravel": unravel}


def f_lin(params_t, params, x):
    """The linearised network, written out with one jvp."""
    delta = jax.tree_util.tree_map(jnp.subtract, params_t, params)
    f0, df = jax.jvp(lambda p: model(p, x, scale=0.5), (params,), (delta,))
    return f0 + df


@pytest.mark.parametrize("given_kernel", [False, True])
def test_f_lin_matches_function_space(setup, given_kernel):
    params, x, y = setup["params"], setup["x"], setup["y"]
    k = setup["k"] if given_kernel else None
    params_fn = gradient_descent_mse_params(
        model, params, x, y, k_train_train=k, learning_rate=0.6, scale=0.5
    )
    np.testing.assert_allclose(
        params_fn.kernel_operator.to_dense(), setup["jac"] @ setup["jac"].T, rtol=1e-10, atol=1e-12
    )
    fx_train_0 = model(params, x, scale=0.5)
    predict = gradient_descent_mse(setup["k"], y, learning_rate=0.6, trace_axes=())
    ts = np.array([[0.0, 2.0, 15.0]])
    params_t = params_fn(ts)
    assert params_t["w1"].shape == (1, 3, N_IN, 4)
    expected = predict(ts, fx_train_0)
    for idx in np.ndindex(ts.shape):
        p = jax.tree_util.tree_map(lambda leaf, idx=idx: leaf[idx], params_t)
        np.testing.assert_allclose(f_lin(p, params, x), expected[idx], rtol=0, atol=1e-8)
    for a, b in zip(
        jax.tree_util.tree_leaves(params_fn(0.0)), jax.tree_util.tree_leaves(params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # t = None: the linearised network interpolates the targets (more params than outputs).
    np.testing.assert_allclose(f_lin(params_fn(None), params, x), y, rtol=0, atol=1e-8)


def test_matches_real_gradient_descent(setup):
    params, x, y, jac = setup["params"], setup["x"], setup["y"], setup["jac"]
    n = y.size
    lam = np.linalg.eigvalsh(jac @ jac.T)
    x_max = 1e-3
    eta = x_max * n / lam[-1]
    steps = 2000
    theta_0, _ = ravel_pytree(params)
    theta_0 = np.asarray(theta_0)
    r0 = np.asarray(model(params, x, scale=0.5)).ravel() - y.ravel()
    theta = theta_0.copy()
    for _ in range(steps):
        residual = r0 + jac @ (theta - theta_0)
        theta = theta - eta / n * jac.T @ residual
    params_fn = gradient_descent_mse_params(model, params, x, y, learning_rate=eta, scale=0.5)
    predicted, _ = ravel_pytree(params_fn(steps))
    # Per mode the flow and GD coefficients differ by at most (eta/n) / (2e(1-x)); J^T scales
    # mode i by sqrt(lam_i).
    bound = np.sqrt(lam[-1]) * (eta / n) / (2 * np.e * (1 - x_max)) * np.linalg.norm(r0)
    assert np.linalg.norm(theta - theta_0) > 100 * bound
    assert np.linalg.norm(np.asarray(predicted) - theta) <= bound


def test_bad_inputs(setup):
    params, x, y = setup["params"], setup["x"], setup["y"]
    with pytest.raises(ValueError, match=r"f\(params, x_train\) has shape \(5, 2\)"):
        gradient_descent_mse_params(model, params, x, y[:, :1])
    with pytest.raises(ValueError, match=r"k_train_train has shape \(5, 5\)"):
        gradient_descent_mse_params(model, params, x, y, k_train_train=np.eye(N))
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        gradient_descent_mse_params(model, params, x, y, learning_rate=-1.0)
