"""Kernels as 2-D linear operators, and outputs ``y`` as right-hand-side matrices.

A kernel for outputs of shape ``(N, A, B, ...)`` (traced axes removed) has its axes
interleaved, ``(N1, N2, A1, A2, B1, B2, ...)``: even axes index the first argument,
odd axes the second. Its 2-D form moves the even axes first and flattens each group,
giving a ``(N1*A1*B1..., N2*A2*B2...)`` matrix. Traced axes of ``y`` become columns of
the right-hand side, so the kernel acts as ``K ⊗ I`` over them.

Predictors touch kernels only through :class:`KernelOperator`; an in-memory array is
wrapped in :class:`DenseKernelOperator`. Kernels stored elsewhere (on disk, sharded)
plug in by subclassing the operator, without a second copy of any predictor.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve

Shape = tuple[int, ...]


def _check_layout(shape: Shape, name: str) -> None:
    if len(shape) == 0 or len(shape) % 2:
        raise ValueError(
            f"{name} must have an even number of axes laid out as (N1, N2, A1, A2, ...); "
            f"got shape {shape}"
        )


def make_2d(kernel: jax.Array) -> jax.Array:
    """Reshape a kernel of layout ``(N1, N2, A1, A2, ...)`` into a 2-D matrix."""
    kernel = jnp.asarray(kernel)
    _check_layout(kernel.shape, "kernel")
    even, odd = kernel.shape[0::2], kernel.shape[1::2]
    order = tuple(range(0, kernel.ndim, 2)) + tuple(range(1, kernel.ndim, 2))
    return jnp.transpose(kernel, order).reshape(math.prod(even), math.prod(odd))


def unmake_2d(matrix: jax.Array, row_shape: Shape, col_shape: Shape) -> jax.Array:
    """Inverse of :func:`make_2d`: restore the interleaved ``(N1, N2, A1, A2, ...)`` layout."""
    if len(row_shape) != len(col_shape):
        raise ValueError(f"row_shape {row_shape} and col_shape {col_shape} differ in length")
    k = len(row_shape)
    full = jnp.reshape(matrix, tuple(row_shape) + tuple(col_shape))
    order = tuple(i for pair in zip(range(k), range(k, 2 * k), strict=True) for i in pair)
    return jnp.transpose(full, order)


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


class KernelOperator(abc.ABC):
    """A kernel seen as a 2-D linear operator; the only way predictors access kernels.

    Rows are the flattened first-argument axes (``row_shape``), columns the second
    (``col_shape``). Subclasses implement ``matmul``, ``diagonal``, ``to_dense``,
    ``all_finite``, ``add_to_diagonal`` and the two factorisations; this base class caches
    each factorisation and counts how often one was computed in ``factorizations``.
    """

    def __init__(self, row_shape: Shape, col_shape: Shape, dtype: jnp.dtype):
        self.row_shape = tuple(row_shape)
        self.col_shape = tuple(col_shape)
        self.dtype = jnp.dtype(dtype)
        self.factorizations: collections.Counter[str] = collections.Counter()
        self._eigh: tuple[jax.Array, jax.Array] | None = None
        self._cholesky: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return math.prod(self.row_shape), math.prod(self.col_shape)

    @abc.abstractmethod
    def matmul(self, rhs: jax.Array) -> jax.Array:
        """``K @ rhs`` for ``rhs`` of shape ``(shape[1], C)``; returns ``(shape[0], C)``."""

    @abc.abstractmethod
    def diagonal(self) -> jax.Array:
        """The main diagonal of the 2-D kernel."""

    @abc.abstractmethod
    def to_dense(self) -> jax.Array:
        """The whole 2-D kernel in memory; only for callers that cannot avoid it."""

    @abc.abstractmethod
    def all_finite(self) -> bool:
        """Whether every entry is finite (no NaN or Inf)."""

    @abc.abstractmethod
    def add_to_diagonal(self, value: float) -> KernelOperator:
        """A new operator for ``K + value * I`` (square kernels only)."""

    @abc.abstractmethod
    def _compute_eigh(self) -> tuple[jax.Array, jax.Array]:
        """Ascending eigenvalues and orthonormal eigenvectors (as columns)."""

    @abc.abstractmethod
    def _compute_cholesky(self) -> jax.Array:
        """Lower Cholesky factor; may contain NaN when ``K`` is not positive definite."""

    def require_square(self, what: str) -> None:
        """ValueError (naming ``what``) unless rows and columns have the same axes."""
        if self.row_shape != self.col_shape:
            raise ValueError(
                f"{what} needs a square kernel; got rows {self.row_shape}, columns {self.col_shape}"
            )

    def eigh(self) -> tuple[jax.Array, jax.Array]:
        """Eigendecomposition ``K = V diag(w) V^T``, computed once and cached."""
        if self._eigh is None:
            self.require_square("eigh")
            self.factorizations["eigh"] += 1
            self._eigh = self._compute_eigh()
        return self._eigh

    def cholesky(self) -> jax.Array:
        """Lower Cholesky factor, computed once and cached; ValueError if not positive definite."""
        if self._cholesky is None:
            self.require_square("cholesky")
            self.factorizations["cholesky"] += 1
            factor = self._compute_cholesky()
            if not bool(jnp.all(jnp.isfinite(factor))):
                raise ValueError(
                    f"kernel of shape {self.shape} is not positive definite (Cholesky failed); "
                    "pass diag_reg > 0 or use float64"
                )
            self._cholesky = factor
        return self._cholesky

    def solve(self, rhs: jax.Array) -> jax.Array:
        """``K^{-1} rhs`` for ``rhs`` of shape ``(shape[0], C)`` via the cached Cholesky factor."""
        return cho_solve((self.cholesky(), True), rhs)


class DenseKernelOperator(KernelOperator):
    """:class:`KernelOperator` over a kernel held in memory as one array."""

    def __init__(self, matrix: jax.Array, row_shape: Shape, col_shape: Shape):
        matrix = jnp.asarray(matrix)
        if not jnp.issubdtype(matrix.dtype, jnp.inexact):
            matrix = matrix.astype(jnp.result_type(float))
        super().__init__(row_shape, col_shape, matrix.dtype)
        if matrix.shape != self.shape:
            raise ValueError(f"matrix shape {matrix.shape} does not match {self.shape}")
        self.matrix = matrix

    @classmethod
    def from_kernel(cls, kernel: jax.Array) -> DenseKernelOperator:
        """Wrap a kernel of layout ``(N1, N2, A1, A2, ...)``."""
        kernel = jnp.asarray(kernel)
        return cls(make_2d(kernel), kernel.shape[0::2], kernel.shape[1::2])

    def matmul(self, rhs: jax.Array) -> jax.Array:
        return _matmul(self.matrix, rhs)

    def diagonal(self) -> jax.Array:
        return jnp.diagonal(self.matrix)

    def to_dense(self) -> jax.Array:
        return self.matrix

    def all_finite(self) -> bool:
        return bool(jnp.all(jnp.isfinite(self.matrix)))

    def add_to_diagonal(self, value: float) -> DenseKernelOperator:
        self.require_square("add_to_diagonal")
        shifted = self.matrix + value * jnp.eye(self.shape[0], dtype=self.dtype)
        return DenseKernelOperator(shifted, self.row_shape, self.col_shape)

    def _compute_eigh(self) -> tuple[jax.Array, jax.Array]:
        return jnp.linalg.eigh(self.matrix)

    def _compute_cholesky(self) -> jax.Array:
        return jnp.linalg.cholesky(self.matrix)


_matmul = jax.jit(jnp.matmul)


def as_kernel_operator(kernel: KernelOperator | jax.Array, name: str) -> KernelOperator:
    """Pass an operator through; wrap an array of layout ``(N1, N2, ...)``.

    Raises ValueError (naming ``name``) for a malformed layout or NaN/Inf entries.
    """
    if isinstance(kernel, KernelOperator):
        op = kernel
    else:
        shape = tuple(np.shape(kernel))
        _check_layout(shape, name)
        op = DenseKernelOperator.from_kernel(kernel)
    if not op.all_finite():
        raise ValueError(f"{name} contains NaN or Inf; recompute it (e.g. in float64)")
    return op


def check_kernel_shape(
    op: KernelOperator, row_shape: Shape, col_shape: Shape, name: str, hint: str
) -> None:
    """ValueError unless ``op`` has the given first- and second-argument axes."""
    if op.row_shape != tuple(row_shape) or op.col_shape != tuple(col_shape):
        have = tuple(d for pair in zip(op.row_shape, op.col_shape, strict=False) for d in pair)
        want = tuple(d for pair in zip(row_shape, col_shape, strict=False) for d in pair)
        raise ValueError(f"{name} has shape {have}, but {hint} needs shape {want}")
