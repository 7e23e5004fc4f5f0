"""Linear algebra on kernels: one operator interface over in-memory and stored kernels.

:class:`KernelOperator` (products, diagonal, Cholesky, eigh, solves) has an in-memory
implementation (:class:`DenseKernelOperator`) and one streaming a
:class:`~ntk_dist.store.KernelStore` (:class:`StoredKernelOperator`), whose tiled,
resumable Cholesky and eigendecomposition are stored next to the kernel.
"""

from ntk_dist.linalg.operator import (
    CholeskyFactor,
    DenseKernelOperator,
    Eigendecomposition,
    KernelOperator,
    NotPositiveDefiniteError,
    make_2d,
    unmake_2d,
)
from ntk_dist.linalg.qdwh import SplitFailedError
from ntk_dist.linalg.stored import StoredKernelOperator

__all__ = [
    "CholeskyFactor",
    "DenseKernelOperator",
    "Eigendecomposition",
    "KernelOperator",
    "NotPositiveDefiniteError",
    "SplitFailedError",
    "StoredKernelOperator",
    "make_2d",
    "unmake_2d",
]
