"""ntk_dist: empirical NTK / NNGP kernels of any JAX network at data-set scale.

The public API mirrors neural-tangents: ``nt.empirical_ntk_fn`` becomes
``ntk_dist.empirical_ntk_fn`` and ``nt.predict.gradient_descent_mse`` becomes
``ntk_dist.predict.gradient_descent_mse``. Kernels too large for one call go
through ``compute_kernel`` tile by tile (``TilePlan``) on all local devices
(``LocalExecutor``) into a resumable Zarr ``KernelStore``.
"""

from ntk_dist import predict
from ntk_dist.empirical import (
    NtkImplementation,
    empirical_kernel_fn,
    empirical_nngp_fn,
    empirical_ntk_fn,
    linearize,
    taylor_expand,
)
from ntk_dist.engine import compute_kernel
from ntk_dist.executors import LocalExecutor
from ntk_dist.store import KernelStore
from ntk_dist.tiling import TilePlan

__all__ = [
    "KernelStore",
    "LocalExecutor",
    "NtkImplementation",
    "TilePlan",
    "compute_kernel",
    "empirical_kernel_fn",
    "empirical_nngp_fn",
    "empirical_ntk_fn",
    "linearize",
    "predict",
    "taylor_expand",
]

__version__ = "0.1.0"
