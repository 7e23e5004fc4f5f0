"""Eigendecomposition of a stored kernel, stored next to it for reuse.

In core: the kernel is assembled in memory and decomposed by LAPACK through JAX
(``jnp.linalg.eigh``) when ``IN_CORE_COPIES`` copies fit the memory bound; the
eigenvalues (``values``, shape ``(N,)``) and eigenvectors (``vectors``, ``N x N`` in
``b x b`` chunks, one ledger entry per block row) are written to Zarr beside the kernel.
Later runs read them back; :class:`StoredEigendecomposition` applies
``V diag(w) V^T`` streaming row panels of ``V``.

Not yet implemented: the out-of-core (distributed) eigh for kernels no single worker
holds. The plan, built from the tiled operations of :mod:`ntk_dist.linalg.cholesky`:
spectral divide-and-conquer (Nakatsukasa & Higham 2013). Shift by a median estimate
``σ`` of the spectrum, compute the polar factor ``U_p`` of ``K - σ I`` by QDWH (a few
Cholesky-based iterations ``X <- a X + b (X - c X (I + c X^T X)^{-1})``, each a tiled
``syrk``, tiled Cholesky and two tiled triangular solves), form the spectral projector
``P = (U_p + I) / 2``, get an orthonormal basis of its range by a tiled (subspace
iteration / randomised range finder + tiled QR) step, split ``K`` into the two
diagonal blocks ``Q_1^T K Q_1`` and ``Q_2^T K Q_2`` (tiled gemms), and recurse until a
block fits the in-core path; eigenvectors are the products of the ``Q`` factors,
accumulated tile by tile into the stored ``vectors``. Until then a kernel too large
for the bound raises :class:`OutOfCoreEighNotImplemented` with what to do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist.linalg.factor_store import FactorStore
from ntk_dist.linalg.operator import Eigendecomposition

__all__ = [
    "IN_CORE_COPIES",
    "OutOfCoreEighNotImplemented",
    "StoredEigendecomposition",
    "check_eigh_fits",
    "is_complete",
    "write_eigh",
]

IN_CORE_COPIES = 4  # K, JAX's symmetrised copy, V and LAPACK's workspace


class OutOfCoreEighNotImplemented(NotImplementedError):
    """The kernel is too large for the in-core eigh under the memory bound."""


def check_eigh_fits(n: int, itemsize: int, memory_bound: int) -> None:
    """Raise :class:`OutOfCoreEighNotImplemented` unless the in-core eigh fits the bound."""
    need = IN_CORE_COPIES * n * n * itemsize
    if need > memory_bound:
        raise OutOfCoreEighNotImplemented(
            f"eigh of a {n} x {n} kernel needs about {need} bytes in core but memory_bound is "
            f"{memory_bound}; the out-of-core eigh is not implemented yet (see "
            "ntk_dist.linalg.eigh). Raise memory_bound, or predict at t=None (Cholesky, which "
            "runs out of core), or use gradient_descent (streams the kernel)"
        )


def write_eigh(
    values_store: FactorStore, vectors_store: FactorStore, values: np.ndarray, vectors: np.ndarray
) -> None:
    """Store eigenvalues, then eigenvectors one block row at a time (each with a ledger entry)."""
    n = vectors.shape[0]
    tile = vectors_store.array.chunk_layout.read_chunk.shape[0]
    values_store.write("values", (slice(None),), values)
    for i in range(math.ceil(n / tile)):
        rows = slice(i * tile, min(n, (i + 1) * tile))
        vectors_store.write(f"rows_{i}", (rows, slice(None)), vectors[rows])


def is_complete(values_store: FactorStore, vectors_store: FactorStore) -> bool:
    """Whether the eigenvalues and every block row of the eigenvectors are finished."""
    n, tile = vectors_store.array.shape[0], vectors_store.array.chunk_layout.read_chunk.shape[0]
    done = vectors_store.done()
    finished_rows = all(f"rows_{i}" in done for i in range(math.ceil(n / tile)))
    return "values" in values_store.done() and finished_rows


class StoredEigendecomposition(Eigendecomposition):
    """Eigenvalues in memory, eigenvectors on disk read one block row at a time."""

    def __init__(self, values_store: FactorStore, vectors_store: FactorStore):
        self.values = jnp.asarray(values_store.read((slice(None),)))
        self.vectors_store = vectors_store
        n, tile = vectors_store.array.shape[0], vectors_store.array.chunk_layout.read_chunk.shape[0]
        self._rows = [slice(i * tile, min(n, (i + 1) * tile)) for i in range(math.ceil(n / tile))]

    def _panel(self, rows: slice) -> np.ndarray:
        return self.vectors_store.read((rows, slice(None)))

    def apply(self, weights: jax.Array, rhs: jax.Array) -> jax.Array:
        rhs = np.asarray(rhs)
        z = sum(self._panel(r).T @ rhs[r] for r in self._rows)  # V^T rhs, (M, C)
        wz = np.asarray(weights)[..., :, None] * z  # (..., M, C)
        out = np.concatenate([np.matmul(self._panel(r), wz) for r in self._rows], axis=-2)
        return jnp.asarray(out)

    def vectors_dense(self) -> np.ndarray:
        return self.vectors_store.read((slice(None), slice(None)))
