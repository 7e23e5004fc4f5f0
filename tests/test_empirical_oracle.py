"""Independent oracles for the empirical kernels, and a finite-difference check of them.

The oracle builds full Jacobians with ``jax.jacrev`` on flattened parameters, contracts them
with ``numpy.einsum`` into the untraced kernel (x1's output axes, then x2's), and applies the
trace / diagonal rules with ``np.trace`` / ``np.diagonal``. Other test files import it.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def full_jacobian(f1, params):
    """d f1(params) / d params as an array of shape f1(params).shape + (P,)."""
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jacrev(lambda v: f1(unravel(v)))(flat))


def apply_axes(k, nd, trace_axes, diagonal_axes):
    """Apply the kernel layout rules to a full kernel with axes (out1..., out2...)."""
    trace = sorted({a % nd for a in trace_axes})
    diag = sorted({a % nd for a in diagonal_axes} - set(trace))
    labels = [(1, i) for i in range(nd)] + [(2, i) for i in range(nd)]
    for i in trace:
        a, b = labels.index((1, i)), labels.index((2, i))
        k = np.trace(k, axis1=a, axis2=b) / k.shape[a]
        labels = [lab for lab in labels if lab[1] != i]
    for i in diag:
        a, b = labels.index((1, i)), labels.index((2, i))
        k = np.diagonal(k, axis1=a, axis2=b)  # numpy puts the diagonal last
        labels = [lab for lab in labels if lab[1] != i] + [(0, i)]
    order = []
    for i in range(nd):
        if i in diag:
            order.append(labels.index((0, i)))
        elif i not in trace:
            order += [labels.index((1, i)), labels.index((2, i))]
    return np.transpose(k, order)


def oracle_full_ntk(f1, f2, params):
    """Untraced NTK of f1 = f(., x1), f2 = f(., x2) (arrays): axes (out1..., out2...)."""
    j1, j2 = full_jacobian(f1, params), full_jacobian(f2, params)
    k = np.einsum("ap,bp->ab", j1.reshape(-1, j1.shape[-1]), j2.reshape(-1, j2.shape[-1]))
    return k.reshape(j1.shape[:-1] + j2.shape[:-1])


def oracle_ntk(f1, f2, params, trace_axes=(-1,), diagonal_axes=()):
    """NTK of f1 = f(., x1), f2 = f(., x2) via explicit Jacobians and the layout rules."""
    k = oracle_full_ntk(f1, f2, params)
    return apply_axes(k, k.ndim // 2, trace_axes, diagonal_axes)


def oracle_nngp(fx1, fx2, trace_axes=(-1,), diagonal_axes=()):
    """NNGP of outputs fx1, fx2 via the explicit outer product."""
    fx1, fx2 = np.asarray(fx1), np.asarray(fx2)
    k = np.einsum("a,b->ab", fx1.ravel(), fx2.ravel()).reshape(fx1.shape + fx2.shape)
    return apply_axes(k, fx1.ndim, trace_axes, diagonal_axes)


def finite_difference_jacobian(f1, params, h=1e-6):
    """Central differences of f1 w.r.t. the flattened parameters (float64)."""
    flat, unravel = ravel_pytree(params)
    cols = []
    for k in range(flat.size):
        e = jnp.zeros_like(flat).at[k].set(h)
        cols.append(
            (np.asarray(f1(unravel(flat + e))) - np.asarray(f1(unravel(flat - e)))) / (2 * h)
        )
    return np.stack(cols, axis=-1)


def _tiny(p, x):
    return jnp.sin(x @ p["w"] + p["b"]) * p["s"]


def test_oracle_matches_finite_differences():
    params = {"w": jnp.array([[0.3, -0.7], [1.1, 0.2]]), "b": jnp.array([0.1, -0.4]), "s": 1.5}
    x1 = jnp.array([[0.5, -1.0], [2.0, 0.3], [-0.2, 0.9]])
    x2 = jnp.array([[1.0, 0.1], [-0.6, -0.8]])
    f1, f2 = (lambda p: _tiny(p, x1)), (lambda p: _tiny(p, x2))
    j1, j2 = finite_difference_jacobian(f1, params), finite_difference_jacobian(f2, params)
    np.testing.assert_allclose(j1, full_jacobian(f1, params), rtol=1e-7, atol=1e-8)
    fd_full = np.einsum("icp,jdp->icjd", j1, j2)
    for trace, diag in [((), ()), ((-1,), ()), ((), (1,))]:
        want = apply_axes(fd_full, 2, trace, diag)
        np.testing.assert_allclose(oracle_ntk(f1, f2, params, trace, diag), want, rtol=1e-7)
    # the layout rule by hand: trace=(-1,) averages the two outputs; diagonal=(1,) keeps c == d
    np.testing.assert_allclose(
        oracle_ntk(f1, f2, params, (-1,), ()), np.einsum("icjc->ij", fd_full) / 2, rtol=1e-7
    )
    np.testing.assert_allclose(
        oracle_ntk(f1, f2, params, (), (1,)), np.einsum("icjc->ijc", fd_full), rtol=1e-7
    )


def test_apply_axes_layout_by_hand():
    k = np.arange(2 * 3 * 4 * 2 * 3 * 4, dtype=float).reshape(2, 3, 4, 2, 3, 4)
    got = apply_axes(k, 3, (2,), (1,))  # -> (N1, N2, H) with C averaged
    want = np.einsum("ahcbhc->abh", k) / 4
    np.testing.assert_array_equal(got, want)
