"""Weight-space prediction: the parameters of a linearised network after MSE gradient flow.

neural-tangents predicts outputs only. For the linearisation
``f_lin(p, x) = f(params, x) + J(x) (p - params)`` trained on the loss and time units of
:func:`~ntk_dist.predict.mse.gradient_descent_mse`, the parameters move only along
``J^T``, so with ``n = y_train.size``, ``r = f(params, x_train) - y_train`` and
``K = J J^T`` (the NTK with ``trace_axes=()``)::

    params_t = params + J^T V diag(expm1(-λ t lr / n) / λ) V^T r      (t = inf: -J^T K^{-1} r)

``J^T`` is applied as one vector-Jacobian product per time; ``J`` is never formed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ntk_dist.linalg.operator import DenseKernelOperator, KernelOperator
from ntk_dist.predict.kernel_matrix import OutputLayout
from ntk_dist.predict.mse import (
    check_learning_rate,
    flow_factors,
    regularize,
    train_kernel_operator,
)

ArrayLike = Any


def _ntk_by_products(
    f_train: Callable[[Any], jax.Array], params: Any, vjp_fn: Callable, fx: jax.Array
) -> jax.Array:
    """The NTK ``J J^T`` as a 2-D matrix, one column ``J (J^T e_j)`` at a time.

    Costs ``fx.size`` vector-Jacobian plus Jacobian-vector products, sequentially
    (``lax.map``), so memory holds one parameter-sized vector, never the Jacobian.
    """
    _, jvp_fn = jax.linearize(f_train, params)

    def column(basis_vector: jax.Array) -> jax.Array:
        (cotangent,) = vjp_fn(basis_vector.reshape(fx.shape))
        return jvp_fn(cotangent).ravel()

    columns = jax.jit(lambda eye: jax.lax.map(column, eye))(jnp.eye(fx.size, dtype=fx.dtype))
    return (columns + columns.T) / 2


def gradient_descent_mse_params(
    f: Callable[..., jax.Array],
    params: Any,
    x_train: Any,
    y_train: ArrayLike,
    k_train_train: ArrayLike | KernelOperator | None = None,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    **apply_fn_kwargs: Any,
) -> Callable[[ArrayLike | None], Any]:
    """Predict the parameters of the linearised ``f`` trained by gradient flow on the MSE loss.

    ``f(params, x, **apply_fn_kwargs)`` is the network; ``k_train_train`` its NTK on
    ``x_train`` with ``trace_axes=()`` (layout ``(N, N, C, C, ...)``), or ``None`` to
    compute it from ``f`` with vjp/jvp products (see ``_ntk_by_products``). Returns
    ``params_fn(t=None)``: the parameter pytree at time ``t`` (``None`` for ``t -> inf``;
    an array's shape is prepended to every leaf), so that ``f_lin(params_t, x_train)``
    equals ``gradient_descent_mse(...)(t, fx_train_0=f(params, x_train))``. With
    ``diag_reg > 0`` the coefficients come from the regularised kernel (a ridge-like
    solution), and that equality no longer holds. ``params_fn.kernel_operator`` is the
    (regularised) operator whose factorisations are reused across calls.
    """
    y_train = jnp.asarray(y_train)
    check_learning_rate(learning_rate)

    def f_train(p: Any) -> jax.Array:
        return f(p, x_train, **apply_fn_kwargs)

    fx_train_0, vjp_fn = jax.vjp(f_train, params)
    if fx_train_0.shape != y_train.shape:
        raise ValueError(
            f"f(params, x_train) has shape {fx_train_0.shape} but y_train has shape {y_train.shape}"
        )
    layout = OutputLayout.create((), y_train.ndim)
    if k_train_train is None:
        ntk = _ntk_by_products(f_train, params, vjp_fn, fx_train_0)
        op = DenseKernelOperator(ntk, y_train.shape, y_train.shape)
    else:
        op = train_kernel_operator(k_train_train, layout, y_train.shape)
    op = regularize(op, diag_reg, diag_reg_absolute_scale)
    dtype = op.dtype
    r = layout.to_matrix(fx_train_0 - y_train).astype(dtype)
    n = y_train.size
    vjp_many = jax.jit(jax.vmap(vjp_fn))

    def params_fn(t: ArrayLike | None = None) -> Any:
        if t is None:
            coef = -op.solve(r)
        else:
            eigen = op.eigh()
            tau = jnp.asarray(t, dtype) * (learning_rate / n)
            _, expm1_over_lam = flow_factors(eigen.values, tau)
            coef = eigen.apply(expm1_over_lam, r)
        lead = coef.shape[:-2]
        cotangents = coef.reshape((-1,) + y_train.shape).astype(fx_train_0.dtype)
        (dparams,) = vjp_many(cotangents)
        return jax.tree_util.tree_map(
            lambda p, d: p + d.reshape(lead + jnp.shape(p)), params, dparams
        )

    params_fn.kernel_operator = op
    return params_fn
