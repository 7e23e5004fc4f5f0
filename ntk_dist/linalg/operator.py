"""Kernels as 2-D linear operators: the one interface predictors and solvers use.

A kernel for outputs of shape ``(N, A, B, ...)`` (traced axes removed) has its axes
interleaved, ``(N1, N2, A1, A2, B1, B2, ...)``: even axes index the first argument,
odd axes the second. Its 2-D form moves the even axes first and flattens each group,
giving a ``(N1*A1*B1..., N2*A2*B2...)`` matrix.

:class:`KernelOperator` is abstract; :class:`DenseKernelOperator` holds the matrix in
memory (on one device, or a ``jax.Array`` sharded over several, each multiplying its
own rows in products) and :class:`~ntk_dist.linalg.stored.StoredKernelOperator` streams it from a
:class:`~ntk_dist.store.KernelStore`. Factorisations are returned as
:class:`CholeskyFactor` and :class:`Eigendecomposition` objects, whose solves and
spectral products work the same whether the factor is in memory or on disk.
"""

from __future__ import annotations

import abc
import collections
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.scipy.linalg import cho_solve
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from ntk_dist import precision

Shape = tuple[int, ...]


class NotPositiveDefiniteError(ValueError):
    """Cholesky failed: the (regularised) kernel is not numerically positive definite."""

    def __init__(self, pivot: int, shape: tuple[int, int]):
        super().__init__(
            f"kernel of shape {shape} is not positive definite: Cholesky failed at pivot "
            f"{pivot} (row/column {pivot} of the 2-D kernel); pass diag_reg > 0 (e.g. 1e-6) "
            "or use float64"
        )
        self.pivot = pivot


def failing_pivot(matrix: np.ndarray) -> int | None:
    """Index of the first pivot at which LAPACK's Cholesky of ``matrix`` fails, or None."""
    a = np.array(matrix)
    if not np.all(np.isfinite(a)):
        return int(np.argwhere(~np.isfinite(a))[0].min())
    (potrf,) = scipy.linalg.get_lapack_funcs(("potrf",), (a,))
    _, info = potrf(a, lower=1, clean=0, overwrite_a=1)
    return int(info) - 1 if info > 0 else None


def check_layout(shape: Shape, name: str) -> None:
    """ValueError unless ``shape`` is a kernel layout ``(N1, N2, A1, A2, ...)``."""
    if len(shape) == 0 or len(shape) % 2:
        raise ValueError(
            f"{name} must have an even number of axes laid out as (N1, N2, A1, A2, ...); "
            f"got shape {shape}"
        )


def _spread(matrix: jax.Array) -> NamedSharding | None:
    """The sharding of a matrix laid out over several devices of a mesh, else None."""
    sharding = getattr(matrix, "sharding", None)
    if isinstance(sharding, NamedSharding) and len(sharding.device_set) > 1:
        return sharding
    return None


def _two_d(sharding: NamedSharding) -> NamedSharding:
    """The 2-D form's sharding: rows as the kernel's N1 axis, columns as its N2 axis."""
    spec = tuple(sharding.spec) + (None, None)
    return NamedSharding(sharding.mesh, PartitionSpec(spec[0], spec[1]))


def make_2d(kernel: jax.Array) -> jax.Array:
    """Reshape a kernel of layout ``(N1, N2, A1, A2, ...)`` into a 2-D matrix.

    A kernel sharded over a mesh along ``N1`` (``N2``) stays sharded along rows (columns).
    """
    kernel = jnp.asarray(kernel)
    check_layout(kernel.shape, "kernel")
    even, odd = kernel.shape[0::2], kernel.shape[1::2]
    order = tuple(range(0, kernel.ndim, 2)) + tuple(range(1, kernel.ndim, 2))
    moved, shape = jnp.transpose(kernel, order), (math.prod(even), math.prod(odd))
    sharding = _spread(kernel)
    if sharding is None or AxisType.Explicit not in sharding.mesh.axis_types:
        return moved.reshape(shape)  # Auto meshes: the compiler carries the sharding over
    return jax.lax.reshape(moved, shape, out_sharding=_two_d(sharding))


def make_2d_numpy(block: np.ndarray) -> np.ndarray:
    """:func:`make_2d` for host arrays (no device transfer)."""
    check_layout(block.shape, "kernel block")
    order = tuple(range(0, block.ndim, 2)) + tuple(range(1, block.ndim, 2))
    rows = math.prod(block.shape[0::2])
    return np.ascontiguousarray(block.transpose(order)).reshape(rows, -1)


def unmake_2d(matrix: jax.Array, row_shape: Shape, col_shape: Shape) -> jax.Array:
    """Inverse of :func:`make_2d`: restore the interleaved ``(N1, N2, A1, A2, ...)`` layout."""
    if len(row_shape) != len(col_shape):
        raise ValueError(f"row_shape {row_shape} and col_shape {col_shape} differ in length")
    k = len(row_shape)
    full = jnp.reshape(matrix, tuple(row_shape) + tuple(col_shape))
    order = tuple(i for pair in zip(range(k), range(k, 2 * k), strict=True) for i in pair)
    return jnp.transpose(full, order)


class CholeskyFactor(abc.ABC):
    """A lower Cholesky factor ``L`` of ``K = L L^T``, in memory or on disk."""

    @abc.abstractmethod
    def solve(self, rhs: jax.Array) -> jax.Array:
        """``K^{-1} rhs`` for ``rhs`` of shape ``(M, C)``."""

    @abc.abstractmethod
    def to_dense(self) -> np.ndarray:
        """``L`` as one host array (tests and small problems only)."""


class Eigendecomposition(abc.ABC):
    """``K = V diag(values) V^T`` with ascending ``values``, in memory or on disk."""

    values: jax.Array

    @abc.abstractmethod
    def apply(self, weights: jax.Array, rhs: jax.Array) -> jax.Array:
        """``V diag(w) V^T rhs`` for weights ``(..., M)`` and ``rhs (M, C)``; ``(..., M, C)``."""

    @abc.abstractmethod
    def vectors_dense(self) -> np.ndarray:
        """``V`` as one host array (tests and small problems only)."""


class DenseCholeskyFactor(CholeskyFactor):
    """A Cholesky factor held in memory."""

    def __init__(self, lower: jax.Array):
        self.lower = lower

    def solve(self, rhs: jax.Array) -> jax.Array:
        return cho_solve((self.lower, True), rhs)

    def to_dense(self) -> np.ndarray:
        return np.asarray(self.lower)


class DenseEigendecomposition(Eigendecomposition):
    """An eigendecomposition held in memory."""

    def __init__(self, values: jax.Array, vectors: jax.Array):
        self.values, self.vectors = values, vectors

    def apply(self, weights: jax.Array, rhs: jax.Array) -> jax.Array:
        coefficients = precision.matmul(self.vectors.T, rhs)
        return precision.matmul(self.vectors, weights[..., :, None] * coefficients)

    def vectors_dense(self) -> np.ndarray:
        return np.asarray(self.vectors)


class KernelOperator(abc.ABC):
    """A kernel seen as a 2-D linear operator; the only way predictors access kernels.

    Rows are the flattened first-argument axes (``row_shape``), columns the second
    (``col_shape``). Subclasses implement ``matmul``, ``diagonal``, ``to_dense``,
    ``all_finite``, ``add_to_diagonal``, the two factorisations and the eigenvalues alone.
    This base class caches each; ``factorizations`` counts those computed and ``reused``
    those read back from storage. ``checked_on_read`` is True for operators that reject
    NaN/Inf in every block they read, so no separate pass over the kernel is needed.
    """

    checked_on_read = False

    def __init__(self, row_shape: Shape, col_shape: Shape, dtype: jnp.dtype):
        self.row_shape = tuple(row_shape)
        self.col_shape = tuple(col_shape)
        self.dtype = jnp.dtype(dtype)
        self.factorizations: collections.Counter[str] = collections.Counter()
        self.reused: collections.Counter[str] = collections.Counter()
        self._eigh: Eigendecomposition | None = None
        self._eigenvalues: jax.Array | None = None
        self._cholesky: CholeskyFactor | None = None

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
    def _eigendecomposition(self) -> Eigendecomposition:
        """Compute (counting in ``factorizations``) or load (counting in ``reused``) eigh."""

    @abc.abstractmethod
    def _eigenvalues_only(self) -> jax.Array:
        """Compute (counting ``factorizations["eigvalsh"]``) or load the eigenvalues."""

    @abc.abstractmethod
    def _cholesky_factor(self) -> CholeskyFactor:
        """Compute or load the Cholesky factor; NotPositiveDefiniteError names the pivot."""

    def check_finite(self, name: str) -> None:
        """ValueError (naming ``name``) if any entry is NaN or Inf."""
        if not self.all_finite():
            raise ValueError(f"{name} contains NaN or Inf; recompute it (e.g. in float64)")

    def require_square(self, what: str) -> None:
        """ValueError (naming ``what``) unless rows and columns have the same axes."""
        if self.row_shape != self.col_shape:
            raise ValueError(
                f"{what} needs a square kernel; got rows {self.row_shape}, columns {self.col_shape}"
            )

    def eigh(self) -> Eigendecomposition:
        """Eigendecomposition ``K = V diag(w) V^T``, obtained once and cached."""
        if self._eigh is None:
            self.require_square("eigh")
            self._eigh = self._eigendecomposition()
        return self._eigh

    def eigvalsh(self) -> jax.Array:
        """Eigenvalues (ascending) without eigenvectors: those of the eigh if it is
        cached, else obtained once and cached (far cheaper than the eigh out of core)."""
        if self._eigh is not None:
            return self._eigh.values
        if self._eigenvalues is None:
            self.require_square("eigvalsh")
            self._eigenvalues = self._eigenvalues_only()
        return self._eigenvalues

    def cholesky(self) -> CholeskyFactor:
        """Lower Cholesky factor, obtained once and cached."""
        if self._cholesky is None:
            self.require_square("cholesky")
            self._cholesky = self._cholesky_factor()
        return self._cholesky

    def solve(self, rhs: jax.Array) -> jax.Array:
        """``K^{-1} rhs`` for ``rhs`` of shape ``(shape[0], C)`` via the cached Cholesky factor."""
        return self.cholesky().solve(rhs)


class DenseKernelOperator(KernelOperator):
    """:class:`KernelOperator` over a kernel held in memory as one array.

    The array may be a ``jax.Array`` sharded over several devices (e.g. its rows over a
    mesh axis): products are then compiled for its sharding, each device multiplying its
    own rows by the replicated right-hand side (only the small product is gathered, never
    the kernel); the diagonal and shifted kernels stay sharded. JAX has no distributed
    Cholesky or eigh (on a sharded array they gather it anyway, or refuse to on Explicit
    meshes), so the factorisations gather the kernel onto its first device explicitly.
    """

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
        sharding = _spread(self.matrix)
        if sharding is None:
            return _matmul(self.matrix, rhs)
        rhs = jax.device_put(rhs, NamedSharding(sharding.mesh, PartitionSpec()))
        return _sharded_matmul(sharding)(self.matrix, rhs)

    def diagonal(self) -> jax.Array:
        if _spread(self.matrix) is None:
            return jnp.diagonal(self.matrix)
        return _masked_diagonal(self.matrix)  # a gather would need collectives on a mesh

    def _on_one_device(self) -> jax.Array:
        """The matrix, gathered onto its first device if it is sharded (for factorising)."""
        sharding = _spread(self.matrix)
        if sharding is None:
            return self.matrix
        first = jax.sharding.SingleDeviceSharding(sharding.mesh.devices.flat[0])
        return jax.device_put(self.matrix, first)  # a bare device would keep the mesh type

    def to_dense(self) -> jax.Array:
        return self.matrix

    def all_finite(self) -> bool:
        return bool(jnp.all(jnp.isfinite(self.matrix)))

    def add_to_diagonal(self, value: float) -> DenseKernelOperator:
        self.require_square("add_to_diagonal")
        shifted = self.matrix + value * jnp.eye(self.shape[0], dtype=self.dtype)
        return DenseKernelOperator(shifted, self.row_shape, self.col_shape)

    def _eigendecomposition(self) -> Eigendecomposition:
        self.factorizations["eigh"] += 1
        return DenseEigendecomposition(*jnp.linalg.eigh(self._on_one_device()))

    def _eigenvalues_only(self) -> jax.Array:
        self.factorizations["eigvalsh"] += 1
        return jnp.linalg.eigvalsh(self._on_one_device())

    def _cholesky_factor(self) -> CholeskyFactor:
        self.factorizations["cholesky"] += 1
        lower = jnp.linalg.cholesky(self._on_one_device())
        if not bool(jnp.all(jnp.isfinite(lower))):
            pivot = failing_pivot(np.asarray(self.matrix))
            raise NotPositiveDefiniteError(-1 if pivot is None else pivot, self.shape)
        return DenseCholeskyFactor(lower)


_matmul = jax.jit(precision.matmul)


@functools.lru_cache(maxsize=16)
def _sharded_matmul(sharding: NamedSharding) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``K @ rhs`` compiled for ``K`` with ``sharding``: each device multiplies its own rows.

    Only the ``(rows, C)`` product is gathered (replicated over the mesh, so that the
    predictors' reshapes work on Explicit meshes too); the kernel never moves.
    """
    return jax.jit(precision.matmul, out_shardings=NamedSharding(sharding.mesh, PartitionSpec()))


@jax.jit
def _masked_diagonal(matrix: jax.Array) -> jax.Array:
    eye = jnp.eye(*matrix.shape, dtype=bool)
    return jnp.sum(jnp.where(eye, matrix, 0), axis=1)
