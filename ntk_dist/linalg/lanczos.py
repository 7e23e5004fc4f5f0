"""Ritz values of a symmetric operator by Lanczos, from its products with vectors only."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["ritz_values"]


def ritz_values(
    matvec: Callable[[np.ndarray], np.ndarray],
    n: int,
    steps: int | None = None,
    rtol: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Ritz values (ascending) of Lanczos with full reorthogonalisation on an ``n x n``
    symmetric operator, ``matvec(v)`` its product with a vector, from a Gaussian start.

    Stops after ``steps`` products (default ``n``), or once the residual bound
    ``|K v - θ v|`` of the top Ritz pair is at most ``rtol |θ|`` (some eigenvalue then lies
    within that distance of ``θ``), or when the Krylov space is invariant (its Ritz values
    are then eigenvalues). Every Ritz value lies within the spectrum; the extreme ones
    approach its ends.
    """
    q = np.random.default_rng(seed).standard_normal(n)
    basis = [q / np.linalg.norm(q)]
    alphas: list[float] = []
    betas: list[float] = []
    while True:
        v = basis[-1]
        w = np.asarray(matvec(v), dtype=np.float64)
        alphas.append(float(v @ w))
        q_mat = np.stack(basis, axis=1)
        for _ in range(2):  # twice is enough to keep the basis orthogonal to round-off
            w = w - q_mat @ (q_mat.T @ w)
        beta = float(np.linalg.norm(w))
        tri = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, vectors = np.linalg.eigh(tri)
        residual = beta * abs(vectors[-1, -1])
        if len(basis) == min(n, steps or n) or residual <= rtol * abs(theta[-1]) or beta == 0:
            return theta
        betas.append(beta)
        basis.append(w / beta)
