"""linearize and taylor_expand against explicit Jacobians / Hessians and error orders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_empirical_oracle import full_jacobian

from ntk_dist.empirical import linearize, taylor_expand


def model(p, x, scale=1.0):
    return scale * jnp.sin(x @ p["w"] + p["b"]) * jnp.exp(p["s"])


PARAMS = {
    "w": jnp.array([[0.3, -0.7], [1.1, 0.2], [0.4, 0.5]]),
    "b": jnp.array([0.1, -0.4]),
    "s": jnp.array(0.2),
}
X = jnp.array([[0.5, -1.0, 0.3], [2.0, 0.3, -0.1]])
DIRECTION = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size) + 1.0).reshape(a.shape), PARAMS)


def _shifted(delta):
    return jax.tree.map(lambda p, d: p + delta * d, PARAMS, DIRECTION)


def test_linearize_exact_at_params_and_linear():
    f_lin = linearize(model, PARAMS)
    np.testing.assert_allclose(f_lin(PARAMS, X), model(PARAMS, X), rtol=1e-15, atol=0)
    np.testing.assert_allclose(
        f_lin(_shifted(2.0), X) - f_lin(PARAMS, X),
        2 * (f_lin(_shifted(1.0), X) - f_lin(PARAMS, X)),
        rtol=1e-12,
    )
    jac = full_jacobian(lambda p: model(p, X, scale=3.0), PARAMS)
    dp = ravel_pytree(DIRECTION)[0]
    want = model(PARAMS, X, 3.0) + 0.5 * jac @ dp
    np.testing.assert_allclose(f_lin(_shifted(0.5), X, scale=3.0), want, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(f_lin)(_shifted(0.5), X, 3.0), want, rtol=1e-12)


def _error(fn, delta):
    return np.max(np.abs(fn(_shifted(delta), X) - model(_shifted(delta), X)))


@pytest.mark.parametrize(("degree", "order"), [(1, 2), (2, 3), (3, 4)])
def test_taylor_error_order(degree, order):
    fn = taylor_expand(model, PARAMS, degree)
    ratio = _error(fn, 1e-1) / _error(fn, 1e-2)
    assert 10 ** (order - 0.3) < ratio < 10 ** (order + 0.3)


def test_taylor_degree_0_1_2_explicit():
    np.testing.assert_allclose(
        taylor_expand(model, PARAMS, 0)(_shifted(0.3), X), model(PARAMS, X), rtol=1e-15
    )
    np.testing.assert_allclose(
        taylor_expand(model, PARAMS, 1)(_shifted(0.3), X),
        linearize(model, PARAMS)(_shifted(0.3), X),
        rtol=1e-13,
    )
    flat, unravel = ravel_pytree(PARAMS)
    dp = 0.3 * ravel_pytree(DIRECTION)[0]
    jac = np.asarray(jax.jacfwd(lambda v: model(unravel(v), X))(flat))
    hess = np.asarray(jax.hessian(lambda v: model(unravel(v), X))(flat))
    want = model(PARAMS, X) + jac @ dp + 0.5 * np.einsum("...ij,i,j->...", hess, dp, dp)
    got = taylor_expand(model, PARAMS, 2)(_shifted(0.3), X)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_pytree_outputs_and_kwargs():
    def two(p, x, scale):
        return model(p, x, scale), {"sq": model(p, x) ** 2}

    f2 = taylor_expand(two, PARAMS, 2)(_shifted(1e-3), X, scale=2.0)
    f1 = linearize(two, PARAMS)(_shifted(1e-3), X, scale=2.0)
    exact = two(_shifted(1e-3), X, 2.0)
    for approx, tol in [(f1, 1e-5), (f2, 1e-8)]:
        assert isinstance(approx, tuple) and set(approx[1]) == {"sq"}
        np.testing.assert_allclose(approx[0], exact[0], atol=tol)
        np.testing.assert_allclose(approx[1]["sq"], exact[1]["sq"], atol=tol)


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_bad_degree(bad):
    with pytest.raises(ValueError, match="degree=.*non-negative int"):
        taylor_expand(model, PARAMS, bad)
