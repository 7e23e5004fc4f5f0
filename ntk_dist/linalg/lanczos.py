"""Block Lanczos on a symmetric operator, from its products with blocks of vectors only.

:class:`KrylovSpace` builds an orthonormal basis ``Q`` of the block Krylov space
``span{S, K S, K^2 S, ...}`` of a start block ``S`` (full reorthogonalisation, two
passes) and ``T = Q^T K Q`` from the same products. Its Ritz pairs ``(θ, Q y)`` serve
both the extreme eigenvalues (:func:`ritz_values`: the learning-rate bound, the QDWH
scale) and matrix functions ``f(K) S ≈ Q f(T) Q^T S`` (:func:`krylov_eigendecomposition`:
gradient-flow predictions at given times without an eigendecomposition of ``K``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist.linalg.operator import Eigendecomposition

__all__ = ["KrylovEigendecomposition", "KrylovSpace", "krylov_eigendecomposition", "ritz_values"]

Matmul = Callable[[np.ndarray], np.ndarray]  # K @ X for an n x c block X


class KrylovSpace:
    """An orthonormal basis of the block Krylov space of ``start`` under ``matmul``.

    Each :meth:`extend` multiplies the newest block by ``K`` (one ``matmul``), adds its
    projection onto the basis to ``T = Q^T K Q`` and orthogonalises the rest against the
    basis twice; the directions left (singular values above ``eps`` times the largest
    seen) form the next block. ``invariant`` once none is left (or the basis spans
    ``R^n``): ``T``'s eigenvalues are then eigenvalues of ``K``. A zero start is
    invariant at once.
    """

    def __init__(self, matmul: Matmul, start: np.ndarray):
        self.matmul = matmul
        self.n = start.shape[0]
        self.eps = float(np.finfo(np.float64).eps)
        u, s, _ = np.linalg.svd(np.asarray(start, np.float64), full_matrices=False)
        self.basis = u[:, s > self.eps * (s[0] if s.size else 0.0)]
        self.scale = 0.0  # |K| as seen so far (the start's size is another unit)
        self.block = self.basis.shape[1]  # columns of the newest block, not yet multiplied
        self.t = np.zeros((0, 0))
        self.residual = np.zeros((0, 0))  # R with K Q - Q T = W (W^T W = R^T R), last block
        self.invariant = self.block == 0

    @property
    def dim(self) -> int:
        return self.basis.shape[1]

    def extend(self) -> None:
        """One block Lanczos step (a no-op once ``invariant``)."""
        if self.invariant:
            return
        new = self.basis[:, self.dim - self.block :]
        w = np.array(self.matmul(new), np.float64)  # a copy: updated in place
        h = self.basis.T @ w  # T's columns of the new block
        w -= self.basis @ h
        w -= self.basis @ (self.basis.T @ w)  # the second pass: orthogonal to round-off
        old = self.dim - self.block
        t = np.zeros((self.dim, self.dim))
        t[:old, :old] = self.t
        t[:, old:] = h
        t[old:, :old] = h[:old].T
        t[old:, old:] = (h[old:] + h[old:].T) / 2
        self.t = t
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        self.scale = max(self.scale, float(np.abs(h).max(initial=0.0)), float(s.max(initial=0.0)))
        self.residual = s[:, None] * vt
        keep = s > self.eps * self.scale * np.sqrt(self.n)
        keep[max(0, self.n - self.dim) :] = False  # never more than n directions
        self.basis = np.hstack([self.basis, u[:, keep]])
        self.block = int(keep.sum())
        self.invariant = self.block == 0

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), their vectors in the basis (columns) and residual
        norms ``|K Q y - θ Q y|``."""
        theta, y = np.linalg.eigh(self.t)
        last = self.residual.shape[1]
        residuals = np.linalg.norm(self.residual @ y[self.t.shape[0] - last :], axis=0)
        return theta, y, residuals


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
    start = np.random.default_rng(seed).standard_normal((n, 1))
    space = KrylovSpace(lambda x: np.asarray(matvec(x[:, 0]))[:, None], start)
    while True:
        space.extend()
        theta, _, residuals = space.ritz()
        if space.invariant or space.dim >= min(n, steps or n) + 1:
            return theta
        if residuals[-1] <= rtol * abs(theta[-1]):
            return theta


class KrylovEigendecomposition(Eigendecomposition):
    """Ritz pairs ``(θ, Q y)`` of ``K`` on a Krylov space: :meth:`apply` is
    ``Q Y diag(w) Y^T Q^T rhs``, ``f(K) rhs`` to the space's accuracy for ``rhs`` in it."""

    def __init__(self, basis: np.ndarray, values: np.ndarray, vectors: np.ndarray):
        self.basis, self._y = basis, vectors
        self.values = jnp.asarray(values)

    def apply(self, weights: jax.Array, rhs: jax.Array) -> jax.Array:
        z = self._y.T @ (self.basis.T @ np.asarray(rhs, np.float64))  # (M, C)
        out = np.matmul(self.basis, np.matmul(self._y, np.asarray(weights)[..., :, None] * z))
        return jnp.asarray(out, jnp.asarray(rhs).dtype)

    def vectors_dense(self) -> np.ndarray:
        return self.basis @ self._y


def krylov_eigendecomposition(
    matmul: Matmul,
    start: np.ndarray,
    functions: Callable[[np.ndarray], list[np.ndarray]],
    rtol: float = 1e-12,
    check_every: int = 4,
    max_dim: int | None = None,
) -> KrylovEigendecomposition:
    """Ritz pairs of ``K`` on the block Krylov space of ``start`` (``n x c``), extended until
    ``f(K) start`` has converged for every weight vector ``f(θ)`` in ``functions(θ)``.

    Every ``check_every`` steps each ``Q Y f(θ) Y^T Q^T start`` is compared with the
    previous check's; the space stops growing once every one changed by at most ``rtol``
    of its norm, twice in a row, or once it is invariant (then exact). ``max_dim`` (the
    basis's columns, exceeded by one block at most; default ``n``) bounds memory:
    ValueError if reached unconverged.
    """
    n = start.shape[0]
    space = KrylovSpace(matmul, start)
    previous: list[np.ndarray] | None = None
    calm = 0
    while True:
        for _ in range(check_every):
            if space.dim < (max_dim or n) or space.dim == n:  # R^n: the last step adds none
                space.extend()
        theta, y, _ = space.ritz()
        eigen = KrylovEigendecomposition(space.basis[:, : len(theta)], theta, y)
        now = [np.asarray(eigen.apply(jnp.asarray(f), start)) for f in functions(theta)]
        if previous is not None:
            change = max(
                float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(a)), 1e-300)
                for a, b in zip(now, previous, strict=True)
            )
            calm = calm + 1 if change <= rtol else 0
        if space.invariant or calm >= 2:
            return eigen
        if space.dim >= (max_dim or n):
            raise ValueError(
                f"the Krylov space reached its limit of {space.dim} columns (max_dim, from the "
                f"memory bound) before its predictions converged to rtol={rtol}; raise the "
                "memory bound, ask for shorter times, or use method='eigh'"
            )
        previous = now
