"""The largest stable learning rate of (momentum) gradient descent on the MSE loss."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from ntk_dist.linalg.lanczos import ritz_values
from ntk_dist.linalg.operator import KernelOperator
from ntk_dist.predict.kernel_matrix import as_kernel_operator


def largest_eigenvalue(op: KernelOperator, rtol: float = 1e-12) -> float:
    """Largest eigenvalue of a symmetric operator by Lanczos with full reorthogonalisation
    (:func:`~ntk_dist.linalg.lanczos.ritz_values`, one ``op.matmul`` per iteration).

    Stops when the residual bound ``|K v - θ v|`` of the top Ritz pair is below
    ``rtol * |θ|`` (some eigenvalue then lies within that distance of ``θ``), or when the
    Krylov space is invariant, which happens after at most ``dim(K)`` iterations and
    makes ``θ`` exact.
    """
    op.require_square("largest_eigenvalue")

    def matvec(v: np.ndarray) -> np.ndarray:
        return np.asarray(op.matmul(jnp.asarray(v[:, None], op.dtype))[:, 0])

    return float(ritz_values(matvec, op.shape[0], rtol=rtol)[-1])


def max_learning_rate(
    ntk_train_train: Any,
    y_train_size: int | None = None,
    momentum: float = 0.0,
    eps: float = 1e-12,
) -> float:
    """Largest learning rate for which gradient descent on the MSE loss converges.

    Same signature and value as ``neural_tangents.predict.max_learning_rate``:
    ``2 * (1 + momentum) * factor / (λ_max + eps)`` with ``factor = y_train_size`` or, if it
    is ``None``, the number of rows of the 2-D kernel (right only without traced axes, as
    in neural-tangents). ``λ_max`` comes from :func:`largest_eigenvalue` (relative residual
    ``1e-12``), not from ``scipy.linalg.eigvalsh(eigvals=...)``, which SciPy removed.
    """
    op = as_kernel_operator(ntk_train_train, "ntk_train_train")
    factor = op.shape[0] if y_train_size is None else y_train_size
    return 2 * (1.0 + momentum) * factor / (largest_eigenvalue(op) + eps)
