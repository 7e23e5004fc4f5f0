"""Cholesky factorisation of a kernel that may not fit in memory, stored tile by tile.

``K = L L^T`` is computed in core (LAPACK through JAX) when ``IN_CORE_COPIES`` copies
of ``K`` fit the memory bound; otherwise by a left-looking tiled algorithm over
``b x b`` tiles. For each block column ``j``::

    A_ij = K_ij - sum_{k<j} L_ik L_jk^T     (gemm; syrk for i == j)    i >= j
    L_jj = chol(A_jj)                        (potrf)
    L_ij = A_ij L_jj^{-T}                    (trsm)                     i > j

The column panel ``A_:j`` and the row ``L_j:`` stay resident (``PANELS`` panels of
``N x b`` entries bound the working set); the earlier factor tiles ``L_ik`` are read
back from the store one at a time. Tiles of a column are spread round-robin over the
given devices as jitted kernels, so JAX runs them concurrently. Every finished tile is
recorded in the factor's ledger; a killed factorisation resumes at the first
unfinished block column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from ntk_dist.linalg.factor_store import FactorStore
from ntk_dist.linalg.operator import CholeskyFactor, NotPositiveDefiniteError, failing_pivot

__all__ = [
    "IN_CORE_COPIES",
    "PANELS",
    "StoredCholeskyFactor",
    "cholesky_in_core",
    "cholesky_tile_size",
    "is_complete",
    "tiled_cholesky",
    "write_factor",
]

IN_CORE_COPIES = 3  # K, L and JAX's symmetrised copy
PANELS = 4  # column panel, factor row, one device copy of each

RegionReader = Callable[[slice, slice], np.ndarray]
Progress = Callable[[int, int], None]


def cholesky_tile_size(n: int, itemsize: int, memory_bound: int) -> int:
    """Largest tile edge ``b`` whose ``PANELS`` panels of ``n x b`` entries fit the bound."""
    b = memory_bound // (PANELS * n * itemsize)
    if b < 1:
        raise ValueError(
            f"memory_bound={memory_bound} bytes is too small for a tiled Cholesky of a {n} x {n} "
            f"kernel: it needs at least {PANELS * n * itemsize} bytes ({PANELS} panels of one "
            "column); raise memory_bound"
        )
    return min(n, int(b))


def cholesky_in_core(matrix: np.ndarray) -> jax.Array:
    """Lower Cholesky factor of ``matrix`` by LAPACK; NotPositiveDefiniteError names the pivot."""
    lower = jnp.linalg.cholesky(jnp.asarray(matrix))
    if not bool(jnp.all(jnp.isfinite(lower))):
        pivot = failing_pivot(np.asarray(matrix))
        raise NotPositiveDefiniteError(-1 if pivot is None else pivot, matrix.shape)
    return lower


@jax.jit
def _update(acc: jax.Array, lik: jax.Array, ljk: jax.Array) -> jax.Array:
    return acc - lik @ ljk.T


@jax.jit
def _potrf(a: jax.Array) -> jax.Array:
    return jnp.linalg.cholesky(a)


@jax.jit
def _trsm(ljj: jax.Array, a: jax.Array) -> jax.Array:
    return jax.scipy.linalg.solve_triangular(ljj, a.T, lower=True).T


def _key(i: int, j: int) -> str:
    return f"{i}_{j}"


def tiled_cholesky(
    read: RegionReader,
    n: int,
    factor: FactorStore,
    tile: int,
    devices: Sequence[jax.Device] | None = None,
    progress: Progress | None = None,
) -> int:
    """Write the lower factor of the ``n x n`` matrix given by ``read`` into ``factor``.

    ``read(rows, cols)`` returns a region of ``K`` in the compute dtype. Block columns
    already in ``factor``'s ledger are skipped. Returns the number of block columns
    computed by this call. ``progress(done, total)`` is called after each column.
    """
    devices = list(devices or jax.local_devices())
    nb = math.ceil(n / tile)
    span = [slice(i * tile, min(n, (i + 1) * tile)) for i in range(nb)]
    done = factor.done()
    computed = 0
    for j in range(nb):
        if all(_key(i, j) in done for i in range(j, nb)):
            continue
        place = {i: devices[i % len(devices)] for i in range(j, nb)}
        acc = {i: jax.device_put(read(span[i], span[j]), place[i]) for i in range(j, nb)}
        for k in range(j):
            ljk = factor.read((span[j], span[k]))
            on = {d: jax.device_put(ljk, d) for d in set(place.values())}
            for i in range(j, nb):
                lik = ljk if i == j else factor.read((span[i], span[k]))
                acc[i] = _update(acc[i], jax.device_put(lik, place[i]), on[place[i]])
        ljj = _potrf(acc[j])
        if not bool(jnp.all(jnp.isfinite(ljj))):
            local = failing_pivot(np.asarray(acc[j]))
            raise NotPositiveDefiniteError(span[j].start + (local or 0), (n, n))
        ljj_on = {d: jax.device_put(ljj, d) for d in set(place.values())}
        lower = {j: ljj} | {i: _trsm(ljj_on[place[i]], acc[i]) for i in range(j + 1, nb)}
        for i in range(j, nb):
            factor.write(_key(i, j), (span[i], span[j]), np.asarray(lower[i]))
        computed += 1
        if progress is not None:
            progress(j + 1, nb)
    return computed


def write_factor(factor: FactorStore, lower: np.ndarray, tile: int) -> None:
    """Store an in-memory lower factor tile by tile (lower triangle only)."""
    n = lower.shape[0]
    nb = math.ceil(n / tile)
    span = [slice(i * tile, min(n, (i + 1) * tile)) for i in range(nb)]
    for j in range(nb):
        for i in range(j, nb):
            factor.write(_key(i, j), (span[i], span[j]), lower[span[i], span[j]])


def is_complete(factor: FactorStore, n: int, tile: int) -> bool:
    """Whether every lower tile of the factor is in its ledger."""
    nb = math.ceil(n / tile)
    done = factor.done()
    return all(_key(i, j) in done for j in range(nb) for i in range(j, nb))


class StoredCholeskyFactor(CholeskyFactor):
    """A lower factor on disk; solves stream one ``b x b`` tile at a time."""

    def __init__(self, factor: FactorStore, n: int, tile: int):
        self.factor, self.n, self.tile = factor, n, tile
        nb = math.ceil(n / tile)
        self._span = [slice(i * tile, min(n, (i + 1) * tile)) for i in range(nb)]

    def _tile(self, i: int, j: int) -> np.ndarray:
        return self.factor.read((self._span[i], self._span[j]))

    def solve(self, rhs: jax.Array) -> jax.Array:
        b = np.array(rhs, dtype=self.factor.array.dtype.numpy_dtype)
        span, nb = self._span, len(self._span)
        for i in range(nb):  # forward: L y = b
            for k in range(i):
                b[span[i]] -= self._tile(i, k) @ b[span[k]]
            b[span[i]] = scipy.linalg.solve_triangular(self._tile(i, i), b[span[i]], lower=True)
        for i in reversed(range(nb)):  # back: L^T x = y
            for k in range(i + 1, nb):
                b[span[i]] -= self._tile(k, i).T @ b[span[k]]
            b[span[i]] = scipy.linalg.solve_triangular(
                self._tile(i, i), b[span[i]], lower=True, trans="T"
            )
        return jnp.asarray(b)

    def to_dense(self) -> np.ndarray:
        return np.tril(self.factor.read((slice(None), slice(None))))
