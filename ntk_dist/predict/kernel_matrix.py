"""Outputs ``y`` as right-hand-side matrices, and kernels as operators for the predictors.

Kernels are 2-D operators (:mod:`ntk_dist.linalg.operator`). Traced axes of ``y`` become
columns of the right-hand side, so the kernel acts as ``K ⊗ I`` over them. Predictors
touch kernels only through :class:`~ntk_dist.linalg.KernelOperator`: an in-memory array
is wrapped in a :class:`~ntk_dist.linalg.DenseKernelOperator`, a
:class:`~ntk_dist.store.KernelStore` in a :class:`~ntk_dist.linalg.StoredKernelOperator`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist.linalg.operator import DenseKernelOperator, KernelOperator, check_layout
from ntk_dist.linalg.stored import StoredKernelOperator
from ntk_dist.store import KernelStore

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class OutputLayout:
    """Which axes of an output ``y`` the kernel spans and which are traced (independent).

    ``to_matrix`` turns ``y`` into a ``(prod(kernel axes), prod(traced axes))`` matrix whose
    rows match the kernel operator's rows; ``from_matrix`` undoes it, keeping leading axes.
    """

    ndim: int
    trace_axes: tuple[int, ...]

    @classmethod
    def create(cls, trace_axes: int | Sequence[int], ndim: int) -> OutputLayout:
        """Canonicalise ``trace_axes`` modulo ``ndim`` (sorted, unique, non-negative)."""
        axes = (trace_axes,) if isinstance(trace_axes, int) else tuple(trace_axes)
        bad = [a for a in axes if not -ndim <= a < ndim]
        if bad:
            raise ValueError(
                f"trace_axes={tuple(axes)} has axes {bad} out of range for y_train with "
                f"{ndim} dimensions"
            )
        canonical = tuple(sorted({a % ndim for a in axes}))
        if 0 in canonical:
            raise ValueError(
                f"trace_axes={tuple(axes)} contains the example axis 0 of y_train; the kernel "
                "must keep the example axis"
            )
        return cls(ndim, canonical)

    @property
    def kernel_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(self.ndim) if a not in self.trace_axes)

    def kernel_shape(self, y_shape: Shape) -> Shape:
        """Sizes of the non-traced axes of ``y``: one argument's half of the kernel shape."""
        return tuple(y_shape[a] for a in self.kernel_axes)

    def traced_shape(self, y_shape: Shape) -> Shape:
        return tuple(y_shape[a] for a in self.trace_axes)

    def output_shape(self, kernel_shape: Shape, traced_shape: Shape) -> Shape:
        """Shape of ``y`` given its non-traced and traced sizes."""
        shape = [0] * self.ndim
        for a, d in zip(self.kernel_axes, kernel_shape, strict=True):
            shape[a] = d
        for a, d in zip(self.trace_axes, traced_shape, strict=True):
            shape[a] = d
        return tuple(shape)

    def to_matrix(self, y: jax.Array) -> jax.Array:
        """``y`` (exactly ``ndim`` axes) -> ``(rows, columns)`` with traced axes as columns."""
        y = jnp.asarray(y)
        k = len(self.trace_axes)
        moved = jnp.moveaxis(y, self.trace_axes, tuple(range(self.ndim - k, self.ndim)))
        rows = math.prod(self.kernel_shape(y.shape))
        return moved.reshape(rows, math.prod(self.traced_shape(y.shape)))

    def from_matrix(self, matrix: jax.Array, y_shape: Shape) -> jax.Array:
        """``(..., rows, columns)`` -> ``(..., *y_shape)``; leading axes are kept in front."""
        lead = matrix.shape[:-2]
        traced = self.traced_shape(y_shape)
        moved = matrix.reshape(lead + self.kernel_shape(y_shape) + traced)
        k, n_lead = len(traced), len(lead)
        source = tuple(range(moved.ndim - k, moved.ndim))
        return jnp.moveaxis(moved, source, tuple(n_lead + a for a in self.trace_axes))


def as_kernel_operator(
    kernel: KernelOperator | KernelStore | jax.Array, name: str
) -> KernelOperator:
    """Pass an operator through; wrap a store or an array of layout ``(N1, N2, ...)``.

    Raises ValueError (naming ``name``) for a malformed layout or NaN/Inf entries. Stored
    kernels are checked tile by tile as they are read, not by an extra pass over the store
    (which every new predictor on a large stored kernel would otherwise pay).
    """
    if isinstance(kernel, KernelOperator):
        op = kernel
    elif isinstance(kernel, KernelStore):
        op = StoredKernelOperator(kernel)
    else:
        shape = tuple(np.shape(kernel))
        check_layout(shape, name)
        op = DenseKernelOperator.from_kernel(kernel)
    if not op.checked_on_read:
        op.check_finite(name)
    return op


def check_kernel_shape(
    op: KernelOperator, row_shape: Shape, col_shape: Shape, name: str, hint: str
) -> None:
    """ValueError unless ``op`` has the given first- and second-argument axes."""
    if op.row_shape != tuple(row_shape) or op.col_shape != tuple(col_shape):
        have = tuple(d for pair in zip(op.row_shape, op.col_shape, strict=False) for d in pair)
        want = tuple(d for pair in zip(row_shape, col_shape, strict=False) for d in pair)
        raise ValueError(f"{name} has shape {have}, but {hint} needs shape {want}")
