"""Closed-form gradient-flow predictions for the MSE loss (``gradient_descent_mse``).

The loss is ``0.5 / y_train.size * ||f - y_train||^2`` and time is in units of
``learning_rate``, as in neural-tangents. With ``n = y_train.size``, ``K`` the
(regularised) 2-D train kernel and ``r = fx_train_0 - y_train``:

- ``fx_train(t) = fx_train_0 + (exp(-K t lr / n) - I) r``
- ``fx_test(t) = fx_test_0 + K_test_train K^{-1} (exp(-K t lr / n) - I) r``

both evaluated in the eigenbasis of ``K`` (or, with ``method="krylov"``, of the Ritz
pairs of a block Krylov space of ``r``); ``t = None`` is the ``t -> inf`` limit,
evaluated with a Cholesky solve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist.linalg.lanczos import krylov_eigendecomposition
from ntk_dist.linalg.operator import Eigendecomposition, KernelOperator
from ntk_dist.predict.kernel_matrix import (
    OutputLayout,
    as_kernel_operator,
    check_kernel_shape,
)

ArrayLike = Any


def regularize(op: KernelOperator, diag_reg: float, absolute_scale: bool) -> KernelOperator:
    """``K + diag_reg * s * I`` with ``s = 1`` if ``absolute_scale`` else ``trace(K) / dim(K)``."""
    if diag_reg < 0:
        raise ValueError(f"diag_reg must be >= 0; got {diag_reg}")
    if diag_reg == 0:
        return op
    scale = 1.0 if absolute_scale else float(jnp.mean(op.diagonal()))
    return op.add_to_diagonal(diag_reg * scale)


def flow_factors(evals: jax.Array, tau: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-eigenvalue ``expm1(-λτ)`` and ``expm1(-λτ) / λ`` for times ``tau`` (any shape).

    Returns arrays of shape ``tau.shape + evals.shape``. Negative eigenvalues (round-off of a
    PSD kernel) are clamped to 0, as neural-tangents does in the exponent; unlike it, the
    quotient uses the clamped value too and takes its limit ``-τ`` at ``λ = 0``, so it stays
    finite and continuous (neural-tangents divides by ``|λ|`` and returns NaN at ``λ = 0``).
    """
    lam = jnp.maximum(evals, 0)
    tau = jnp.asarray(tau)[..., None]
    x = lam * tau
    expm1 = jnp.expm1(-x)
    nonzero = x != 0
    ratio = jnp.where(nonzero, expm1 / jnp.where(nonzero, x, 1), -1)
    return expm1, ratio * tau


def _matmul_batched(op: KernelOperator, rhs: jax.Array) -> jax.Array:
    """``op @ rhs`` for ``rhs (..., M, C)`` in one ``matmul`` call; returns ``(..., rows, C)``."""
    lead, (m, c) = rhs.shape[:-2], rhs.shape[-2:]
    flat = jnp.moveaxis(rhs, -2, 0).reshape(m, -1)
    out = op.matmul(flat).reshape((op.shape[0],) + lead + (c,))
    return jnp.moveaxis(out, 0, -2)


class KTestTrain:
    """A validated ``k_test_train`` with the output layout of test predictions."""

    def __init__(
        self, k_test_train: Any, layout: OutputLayout, y_train_shape: tuple[int, ...]
    ) -> None:
        op = as_kernel_operator(k_test_train, "k_test_train")
        train_shape = layout.kernel_shape(y_train_shape)
        want_rows = op.row_shape[:1] + train_shape[1:]
        check_kernel_shape(
            op,
            want_rows,
            train_shape,
            "k_test_train",
            f"y_train of shape {y_train_shape} with trace_axes={layout.trace_axes}",
        )
        self.op = op
        self.y_shape = layout.output_shape(op.row_shape, layout.traced_shape(y_train_shape))


def check_learning_rate(learning_rate: float) -> None:
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive; got {learning_rate}")


def train_kernel_operator(
    k_train_train: Any, layout: OutputLayout, y_shape: tuple[int, ...]
) -> KernelOperator:
    """Validate ``k_train_train`` against ``y_train`` and ``trace_axes``; return its operator."""
    op = as_kernel_operator(k_train_train, "k_train_train")
    shape = layout.kernel_shape(y_shape)
    check_kernel_shape(
        op,
        shape,
        shape,
        "k_train_train",
        f"y_train of shape {y_shape} with trace_axes={layout.trace_axes} (check trace_axes)",
    )
    return op


def _krylov_flow(op: KernelOperator, r: jax.Array, tau: jax.Array) -> Eigendecomposition:
    """Ritz pairs of ``K`` on the block Krylov space of ``r``, grown until both flow
    factors applied to ``r`` have converged at every time ``tau`` (1e-12 relative); the
    basis may take the operator's memory bound, if it has one."""
    n = op.shape[0]
    bound = getattr(op, "memory_bound", None)
    max_dim = n if bound is None else max(1, min(n, bound // (n * 8)))

    def matmul(x: np.ndarray) -> np.ndarray:
        return np.asarray(op.matmul(jnp.asarray(x, op.dtype)))

    return krylov_eigendecomposition(
        matmul,
        np.asarray(r),
        lambda theta: list(flow_factors(jnp.asarray(theta), tau)),
        max_dim=max_dim,
    )


def gradient_descent_mse(
    k_train_train: ArrayLike | KernelOperator,
    y_train: ArrayLike,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: int | Sequence[int] = (-1,),
    method: str = "eigh",
) -> Callable[..., Any]:
    """Predict outputs of a linearised network trained by gradient flow on the MSE loss.

    Same signature, units and outputs as ``neural_tangents.predict.gradient_descent_mse``.
    ``k_train_train`` is an array of layout ``(N, N, A, A, ...)`` (``trace_axes`` of
    ``y_train`` removed), a :class:`~ntk_dist.store.KernelStore` (streamed; its
    factorisations are stored beside it and reused by later calls) or a
    :class:`KernelOperator`; ``k_test_train`` likewise. Returns
    ``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``; ``t`` may be
    ``None`` (infinite time), a scalar or an array, whose shape is prepended to the outputs.
    ``predict_fn.kernel_operator`` is the regularised train operator, whose eigh and Cholesky
    factorisations are computed at most once and reused across calls.

    ``method`` (new) decides how finite times are evaluated: ``"eigh"`` (the
    eigendecomposition of ``K``, once, stored beside a stored kernel and reused by later
    calls and runs) or ``"krylov"`` (no factorisation: each call grows a block Krylov
    space of ``fx_train_0 - y_train`` until its predictions at the requested times agree
    to 1e-12, one ``K`` product per step: for a few predictions from a kernel whose
    eigh costs too much; a long time on a kernel with many small eigenvalues takes many
    steps).
    """
    if method not in ("eigh", "krylov"):
        raise ValueError(f"method must be 'eigh' or 'krylov'; got {method!r}")
    y_train = jnp.asarray(y_train)
    layout = OutputLayout.create(trace_axes, y_train.ndim)
    check_learning_rate(learning_rate)
    op = train_kernel_operator(k_train_train, layout, y_train.shape)
    op = regularize(op, diag_reg, diag_reg_absolute_scale)
    dtype = op.dtype
    y_mat = layout.to_matrix(y_train).astype(dtype)
    n = y_train.size

    def predict_fn(
        t: ArrayLike | None = None,
        fx_train_0: ArrayLike | None = 0.0,
        fx_test_0: ArrayLike | None = None,
        k_test_train: ArrayLike | KernelOperator | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        if fx_train_0 is None and fx_test_0 is None:
            raise ValueError("fx_train_0 and fx_test_0 are both None: nothing to predict")
        test = None
        if fx_test_0 is not None:
            if k_test_train is None:
                raise ValueError("fx_test_0 is given, so k_test_train is required")
            test = KTestTrain(k_test_train, layout, y_train.shape)
            fx_test_0 = jnp.broadcast_to(jnp.asarray(fx_test_0, dtype), test.y_shape)
        if fx_train_0 is not None:
            fx_train_0 = jnp.broadcast_to(jnp.asarray(fx_train_0, dtype), y_train.shape)

        if t is None:
            fx_train_t = y_train.astype(dtype)
            if test is not None:
                rhs = y_mat if fx_train_0 is None else y_mat - layout.to_matrix(fx_train_0)
                dfx = test.op.matmul(op.solve(rhs))
                fx_test_t = fx_test_0 + layout.from_matrix(dfx, test.y_shape)
        else:
            tau = jnp.asarray(t, dtype) * (learning_rate / n)
            r = -y_mat if fx_train_0 is None else layout.to_matrix(fx_train_0) - y_mat
            eigen = op.eigh() if method == "eigh" else _krylov_flow(op, r, tau)
            expm1, expm1_over_lam = flow_factors(eigen.values, tau)
            if fx_train_0 is not None:
                dfx = eigen.apply(expm1, r)
                fx_train_t = fx_train_0 + layout.from_matrix(dfx, y_train.shape)
            if test is not None:
                dfx = _matmul_batched(test.op, eigen.apply(expm1_over_lam, r))
                fx_test_t = fx_test_0 + layout.from_matrix(dfx, test.y_shape)

        if test is None:
            return fx_train_t
        if fx_train_0 is None:
            return fx_test_t
        return fx_train_t, fx_test_t

    predict_fn.kernel_operator = op
    return predict_fn
