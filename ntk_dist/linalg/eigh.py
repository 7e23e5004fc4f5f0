"""Eigendecomposition of a stored kernel, stored next to it for reuse.

In core: the kernel is assembled in memory and decomposed by LAPACK through JAX
(``jnp.linalg.eigh``) when ``IN_CORE_COPIES`` copies fit the memory bound, else on CPU
devices by :func:`~ntk_dist.linalg.tridiagonal.host_eigh` when ``HOST_LEAF_COPIES`` (1.5) do
(LAPACK's tridiagonal reduction in place: 4.58 s against numpy's 4.53 s at N = 4096
here); the eigenvalues (``values``, shape ``(N,)``) and eigenvectors (``vectors``,
``N x N`` in ``b x b`` chunks, one ledger entry per block row) are written to Zarr beside
the kernel. Later runs read them back; :class:`StoredEigendecomposition` applies
``V diag(w) V^T`` streaming row panels of ``V``.

Out of core (neither fits the bound): spectral divide and conquer
(:mod:`ntk_dist.linalg.qdwh`) over scratch tiles of the tiled Cholesky's size: outlying
eigenvalues split off by subspace iteration, a block with no gap by two-stage
tridiagonalisation on the host (:mod:`ntk_dist.linalg.two_stage`) or tiled QDWH polar
decompositions on devices and Ray; the eigenvectors are written block row by block row
into the same stored layout, so later runs cannot tell the paths apart. The scratch folder
(:func:`default_scratch_dir`, beside the factors) keeps a ledger of finished splits and
blocks, so an interrupted eigh resumes where it stopped.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist.linalg import qdwh, tridiagonal, two_stage
from ntk_dist.linalg.band import band_eigenvalues, bandwidth_for
from ntk_dist.linalg.factor_store import FactorStore
from ntk_dist.linalg.operator import Eigendecomposition
from ntk_dist.linalg.tiled import Tiled, TileRunner, write_symmetrised
from ntk_dist.store import KernelStore

__all__ = [
    "IN_CORE_COPIES",
    "StoredEigendecomposition",
    "column_chunk",
    "default_scratch_dir",
    "fits_in_core",
    "fits_on_host",
    "is_complete",
    "out_of_core_eigenvalues",
    "out_of_core_eigh",
    "write_eigh",
]

IN_CORE_COPIES = 4  # K, JAX's symmetrised copy, V and LAPACK's workspace


def fits_in_core(n: int, itemsize: int, memory_bound: int) -> bool:
    """Whether JAX's in-core eigh of an ``n x n`` matrix fits the memory bound."""
    return IN_CORE_COPIES * n * n * itemsize <= memory_bound


def fits_on_host(n: int, itemsize: int, memory_bound: int) -> bool:
    """Whether :func:`~ntk_dist.linalg.tridiagonal.host_eigh` of an ``n x n`` matrix fits it."""
    return tridiagonal.HOST_LEAF_COPIES * n * n * itemsize <= memory_bound


def column_chunk(n: int, itemsize: int, memory_bound: int, tile: int) -> int:
    """Width of the stored eigenvectors' chunks (at most a tile, at least 64 columns where
    the tile allows): the width of the two-stage path's chunks of columns, so that they
    end on the chunks' edges and each chunk is written once, whole (a chunk written in
    two parts is read and written again: 2.4x the time)."""
    b = bandwidth_for(n, tile, itemsize, memory_bound)
    width = two_stage.chunk_width(n, b, tile, itemsize, memory_bound)
    return min(tile, max(width, 64))


def out_of_core_eigh(
    read: Callable[[slice, slice], np.ndarray],
    n: int,
    dtype: np.dtype,
    memory_bound: int,
    values_store: FactorStore,
    vectors_store: FactorStore,
    devices: Sequence[jax.Device] | None = None,
    scratch_dir: str | None = None,
    runner: TileRunner | None = None,
) -> None:
    """Store the eigendecomposition of the ``n x n`` matrix ``read(rows, cols)`` out of core.

    ``scratch_dir`` holds the tiles and the ledger of finished splits and blocks (at most
    :func:`~ntk_dist.linalg.qdwh.scratch_bytes`, 12 N^2 x itemsize, of disk); a rerun with
    the same folder after a kill skips what is recorded there. It is removed at the end.
    ``runner`` runs the tile jobs (default: this process; ``RayRunner`` for a cluster).
    """
    tile = vectors_store.array.chunk_layout.read_chunk.shape[0]
    qdwh.divide_and_conquer_eigh(
        read,
        n,
        dtype,
        tile,
        memory_bound,
        devices,
        write_rows=lambda rows, panel: vectors_store.write(
            f"rows_{rows.start // tile}", (rows, slice(None)), panel
        ),
        values_out=lambda values: values_store.write("values", (slice(None),), values),
        write_columns=lambda cols, block: vectors_store.write(
            f"cols_{cols.start}_{cols.stop}", (slice(None), cols), block
        ),
        column_chunk=vectors_store.array.chunk_layout.write_chunk.shape[1],
        scratch_dir=scratch_dir,
        runner=runner,
    )


def out_of_core_eigenvalues(
    read: Callable[[slice, slice], np.ndarray],
    n: int,
    dtype: np.dtype,
    tile: int,
    memory_bound: int,
    scratch_dir: str | None = None,
) -> np.ndarray:
    """Eigenvalues (ascending) of the symmetric ``n x n`` matrix ``read(rows, cols)`` out
    of core, in ``4/3 N^3`` flops: it is copied, symmetrised, to a file in
    the folder ``scratch_dir`` (default a new temporary folder; removed at the end) and
    reduced to band form there (:func:`~ntk_dist.linalg.band.band_eigenvalues`)."""
    folder = scratch_dir or tempfile.mkdtemp(prefix="ntk_dist_eigvalsh_")
    os.makedirs(folder, exist_ok=True)
    try:
        a = Tiled(os.path.join(folder, "a"), n, n, tile, np.dtype(dtype).name).create()
        write_symmetrised(read, a)
        width = bandwidth_for(n, tile, np.dtype(dtype).itemsize, memory_bound)
        return band_eigenvalues(a, None, width)
    finally:
        shutil.rmtree(folder)


def default_scratch_dir(store: KernelStore, name: str) -> str | None:
    """``<store>/ntk_dist_linalg/<name>-scratch`` for a store on local disk, else None.

    Beside the factor (not inside it: creating the factor clears its folder), so that a
    killed out-of-core eigh of the same kernel resumes from it.
    """
    if store.kvstore_spec.get("driver") != "file":
        return None
    return os.path.join(store.path, "ntk_dist_linalg", f"{name}-scratch")


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
    """Whether the eigenvalues and the eigenvectors are finished: every block row, or
    column ranges (as the two-stage path writes them) that cover every column."""
    n, tile = vectors_store.array.shape[0], vectors_store.array.chunk_layout.read_chunk.shape[0]
    done = vectors_store.done()
    finished_rows = all(f"rows_{i}" in done for i in range(math.ceil(n / tile)))
    covered = 0
    for lo, hi in sorted(tuple(map(int, k.split("_")[1:])) for k in done if k.startswith("cols_")):
        if lo > covered:
            break
        covered = max(covered, hi)
    return "values" in values_store.done() and (finished_rows or covered >= n)


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
