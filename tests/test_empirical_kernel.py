"""empirical_nngp_fn against the explicit outer product, and empirical_kernel_fn's ``get``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_empirical_oracle import oracle_nngp, oracle_ntk

from ntk_dist.empirical import empirical_kernel_fn, empirical_nngp_fn, empirical_ntk_fn

TOL = {"rtol": 1e-12, "atol": 1e-12}


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def model(p, x, scale=1.0):
    """(N, H, 3) -> (N, H, 4)."""
    return scale * jnp.tanh(x @ p["w"] + p["b"])


PARAMS = {"w": _normal(0, (3, 4)), "b": _normal(1, (4,))}
X1, X2, X2_SAME_N = _normal(2, (3, 2, 3)), _normal(3, (5, 2, 3)), _normal(4, (3, 2, 3))


@pytest.mark.parametrize(
    ("trace_axes", "diagonal_axes"),
    [((-1,), ()), ((), ()), ((1, 2), ()), ((), (1,)), ((-1,), (0,)), ((-1,), (-1, 0)), (-1, 1)],
)
def test_nngp_matches_outer_product(trace_axes, diagonal_axes):
    trace = (trace_axes,) if isinstance(trace_axes, int) else trace_axes
    diag = (diagonal_axes,) if isinstance(diagonal_axes, int) else diagonal_axes
    x2 = X2_SAME_N if 0 in diag else X2
    got = empirical_nngp_fn(model, trace_axes, diagonal_axes)(X1, x2, PARAMS)
    want = oracle_nngp(model(PARAMS, X1), model(PARAMS, x2), trace, diag)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL)


def test_nngp_x2_none_kwargs_pytree_and_jit():
    nngp_fn = empirical_nngp_fn(model, (), (1,))
    want = oracle_nngp(model(PARAMS, X1), model(PARAMS, X1), (), (1,))
    np.testing.assert_allclose(nngp_fn(X1, None, PARAMS), want, **TOL)
    np.testing.assert_allclose(jax.jit(nngp_fn)(X1, None, PARAMS), want, **TOL)

    split = oracle_nngp(model(PARAMS, X1, 2.0), model(PARAMS, X2, 3.0), (), (1,))
    np.testing.assert_allclose(nngp_fn(X1, X2, PARAMS, scale=(2.0, 3.0)), split, **TOL)

    def two(p, x):
        return [model(p, x), model(p, x)[..., :2] ** 2]

    got = empirical_nngp_fn(two)(X1, X2, PARAMS)
    assert isinstance(got, list) and len(got) == 2
    for g, a, b in zip(got, two(PARAMS, X1), two(PARAMS, X2), strict=True):
        np.testing.assert_allclose(g, oracle_nngp(a, b, (-1,), ()), **TOL)


def test_kernel_fn_get_variants():
    kernel_fn = empirical_kernel_fn(model, (-1,), (), 0, 2)
    ntk = oracle_ntk(lambda p: model(p, X1), lambda p: model(p, X2), PARAMS)
    nngp = oracle_nngp(model(PARAMS, X1), model(PARAMS, X2))

    bare = kernel_fn(X1, X2, "ntk", PARAMS)
    assert isinstance(bare, jax.Array)
    np.testing.assert_allclose(bare, ntk, **TOL)
    np.testing.assert_allclose(kernel_fn(X1, X2, "nngp", PARAMS), nngp, **TOL)

    both = kernel_fn(X1, X2, None, PARAMS)
    assert type(both).__name__ == "EmpiricalKernel" and both._fields == ("nngp", "ntk")
    np.testing.assert_allclose(both.nngp, nngp, **TOL)
    np.testing.assert_allclose(both.ntk, ntk, **TOL)

    swapped = kernel_fn(X1, X2, ("ntk", "nngp"), PARAMS)
    assert type(swapped).__name__ == "EmpiricalKernel" and swapped._fields == ("ntk", "nngp")
    np.testing.assert_allclose(swapped[0], ntk, **TOL)
    np.testing.assert_allclose(swapped[1], nngp, **TOL)

    one = kernel_fn(X1, X2, ("nngp",), PARAMS)
    assert one._fields == ("nngp",)
    np.testing.assert_allclose(one.nngp, nngp, **TOL)

    jitted = jax.jit(kernel_fn, static_argnames="get")(X1, None, ("ntk",), PARAMS)
    want = empirical_ntk_fn(model, (-1,), (), 0, 2)(X1, None, PARAMS)
    np.testing.assert_allclose(jitted.ntk, want, **TOL)


@pytest.mark.parametrize("get", ["ntk_nngp", ("ntk", "ntk"), (), ("ntk", "foo"), 3])
def test_kernel_fn_bad_get(get):
    kernel_fn = empirical_kernel_fn(model)
    with pytest.raises(ValueError, match="get="):
        kernel_fn(X1, X2, get, PARAMS)
