"""Gradient-flow predictions for any loss by integrating the kernel ODE (``gradient_descent``).

Without momentum, in time ``s = t * learning_rate``::

    d fx_train / ds = -K g,    d fx_test / ds = -K_test_train g,    g = dloss/dfx_train

With momentum ``m``, in time ``s = t * sqrt(learning_rate)`` and with
``c = (m - 1) / sqrt(learning_rate)``, each output gets a velocity ``q``::

    d fx / ds = q,    d q / ds = -K g + c q

Kernels act as ``K ⊗ I`` over ``trace_axes``. The state is integrated by
:mod:`ntk_dist.predict.integrator`, stepping exactly onto the requested times.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist.linalg.operator import KernelOperator
from ntk_dist.predict.integrator import integrate, integrate_to_steady_state
from ntk_dist.predict.kernel_matrix import OutputLayout
from ntk_dist.predict.mse import KTestTrain, check_learning_rate, train_kernel_operator

ArrayLike = Any


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["fx_train", "fx_test", "qx_train", "qx_test"],
    meta_fields=[],
)
@dataclasses.dataclass
class ODEState:
    """Outputs (``fx_*``) and, with momentum, their velocities (``qx_*``); a JAX pytree."""

    fx_train: Any = None
    fx_test: Any = None
    qx_train: Any = None
    qx_test: Any = None


class _FlatState:
    """Packs a list of arrays into one flat vector and back (with optional leading axes)."""

    def __init__(self, shapes: list[tuple[int, ...]]):
        self.shapes = shapes
        self.offsets = np.cumsum([0] + [math.prod(s) for s in shapes])

    def pack(self, arrays: list[jax.Array]) -> jax.Array:
        return jnp.concatenate([jnp.ravel(a) for a in arrays])

    def unpack(self, flat: jax.Array) -> list[jax.Array]:
        lead = flat.shape[:-1]
        return [
            flat[..., self.offsets[i] : self.offsets[i + 1]].reshape(lead + shape)
            for i, shape in enumerate(self.shapes)
        ]


def gradient_descent(
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    k_train_train: ArrayLike | KernelOperator,
    y_train: ArrayLike,
    learning_rate: float = 1.0,
    momentum: float | None = None,
    trace_axes: int | Sequence[int] = (-1,),
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
) -> Callable[..., Any]:
    """Predict outputs of a linearised network trained by gradient flow on ``loss(fx, y)``.

    Same signature, units and outputs as ``neural_tangents.predict.gradient_descent``.
    Kernels may be arrays, :class:`~ntk_dist.store.KernelStore` (each right-hand side
    ``K g`` then streams the store's tiles) or :class:`KernelOperator`. The
    keyword-only ``rtol``/``atol`` (default: :func:`~ntk_dist.predict.integrator.
    default_tolerances` of the kernel dtype) and ``max_steps`` tune the integrator. Returns
    ``predict_fn(t=None, fx_train_or_state_0=0., fx_test_0=None, k_test_train=None)``:
    ``t`` is a scalar or array of times (any order, duplicates allowed; its shape is
    prepended to the outputs) or ``None`` for the steady state, raising
    :class:`~ntk_dist.predict.integrator.ConvergenceError` when there is none (e.g.
    cross-entropy). Given an :class:`ODEState`, ``predict_fn`` returns one.
    """
    y_train = jnp.asarray(y_train)
    layout = OutputLayout.create(trace_axes, y_train.ndim)
    check_learning_rate(learning_rate)
    op = train_kernel_operator(k_train_train, layout, y_train.shape)
    dtype = op.dtype
    grad_loss = jax.grad(lambda fx: loss(fx, y_train))
    if momentum is None:
        time_scale, friction = learning_rate, None
    else:
        time_scale = learning_rate**0.5
        friction = (momentum - 1.0) / time_scale
    solver_kw: dict[str, Any] = {"rtol": rtol, "atol": atol}
    if max_steps is not None:
        solver_kw["max_steps"] = max_steps

    def make_rhs(state: _FlatState, test: KTestTrain | None) -> Callable:
        n_fx = 1 if test is None else 2

        @jax.jit
        def loss_gradient(flat: jax.Array) -> jax.Array:
            return layout.to_matrix(grad_loss(state.unpack(flat)[0]))

        @jax.jit
        def derivative(flat: jax.Array, *k_g: jax.Array) -> jax.Array:
            shapes = [y_train.shape] if test is None else [y_train.shape, test.y_shape]
            forces = [-layout.from_matrix(kg, s) for kg, s in zip(k_g, shapes, strict=True)]
            if friction is None:
                return state.pack(forces)
            q = state.unpack(flat)[n_fx:]
            return state.pack(q + [f + friction * qi for f, qi in zip(forces, q, strict=True)])

        def rhs(_t: float, flat: np.ndarray) -> jax.Array:
            g = loss_gradient(flat)
            ops = [op] if test is None else [op, test.op]
            return derivative(flat, *(o.matmul(g) for o in ops))

        return rhs

    def predict_fn(
        t: ArrayLike | None = None,
        fx_train_or_state_0: ArrayLike | ODEState | None = 0.0,
        fx_test_0: ArrayLike | None = None,
        k_test_train: ArrayLike | KernelOperator | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array] | ODEState:
        return_state = isinstance(fx_train_or_state_0, ODEState)
        if return_state:
            if fx_test_0 is not None:
                raise ValueError(
                    "fx_test_0 must be None when fx_train_or_state_0 is an ODEState; "
                    "set ODEState.fx_test instead"
                )
            s0 = fx_train_or_state_0
            if s0.fx_train is None:
                raise ValueError("ODEState.fx_train is None; the train outputs are required")
            fx_train_0, fx_test_0, qx_train_0, qx_test_0 = dataclasses.astuple(s0)
        else:
            fx_train_0, qx_train_0, qx_test_0 = fx_train_or_state_0, None, None
            if fx_train_0 is None and fx_test_0 is None:
                raise ValueError(
                    "fx_train_or_state_0 and fx_test_0 are both None: nothing to predict"
                )
        test = None
        if fx_test_0 is not None:
            if k_test_train is None:
                raise ValueError(
                    "fx_test_0 (or ODEState.fx_test) is given, so k_test_train is required"
                )
            test = KTestTrain(k_test_train, layout, y_train.shape)

        def initial(x: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array:
            x = 0.0 if x is None else x
            return jnp.broadcast_to(jnp.asarray(x, dtype), shape)

        shapes = [y_train.shape] + ([] if test is None else [test.y_shape])
        parts = [initial(fx_train_0, shapes[0])]
        if test is not None:
            parts.append(initial(fx_test_0, shapes[1]))
        if momentum is not None:
            parts += [initial(q, s) for q, s in zip((qx_train_0, qx_test_0), shapes, strict=False)]
            shapes = shapes * 2
        state = _FlatState(shapes)
        y0 = np.asarray(state.pack(parts))
        rhs = make_rhs(state, test)

        if t is None:
            _, y_t = integrate_to_steady_state(rhs, y0, **solver_kw)
        else:
            times = np.asarray(t, dtype=np.float64)
            if not np.all(np.isfinite(times)) or np.any(times < 0):
                raise ValueError(f"t must be finite and >= 0 (or None); got {t}")
            unique, inverse = np.unique(times.ravel() * time_scale, return_inverse=True)
            y_t = integrate(rhs, y0, unique, **solver_kw)[inverse].reshape(times.shape + (-1,))
        out = state.unpack(jnp.asarray(y_t, dtype))

        n_fx = 1 if test is None else 2
        fx_t, qx_t = out[:n_fx] + [None], out[n_fx:] + [None, None]
        if return_state:
            return ODEState(fx_t[0], fx_t[1], qx_t[0], qx_t[1])
        if test is None:
            return fx_t[0]
        if fx_train_0 is None:
            return fx_t[1]
        return fx_t[0], fx_t[1]

    return predict_fn
