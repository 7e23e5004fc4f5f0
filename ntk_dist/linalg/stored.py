"""A kernel in a :class:`~ntk_dist.store.KernelStore` as a :class:`KernelOperator`.

The 2-D view of a stored kernel of layout ``(N1, N2, A1, A2, ...)`` is the same as
:func:`~ntk_dist.linalg.operator.make_2d` of the whole array, read block by block.
``memory_bound`` (bytes per worker) decides what is held: the whole 2-D kernel is kept
resident for products only if it takes at most half the bound, otherwise every
product streams the store's tiles. The Cholesky factorisation is always the tiled one
(tiles of at most ``STREAM_TILE``: reading the kernel and writing the factor overlap the
arithmetic, which beats reading, factorising and writing in turn); eigh runs in core
when it fits (:mod:`ntk_dist.linalg.eigh`) and out of core (:mod:`ntk_dist.linalg.qdwh`)
when not. Factorisations are
written next to the kernel (:mod:`ntk_dist.linalg.factor_store`) and reused by every
later operator on the same store with the same diagonal shift and dtype (``reused`` counts those).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist.linalg import cholesky as chol
from ntk_dist.linalg import eigh as eig
from ntk_dist.linalg import tridiagonal
from ntk_dist.linalg.factor_store import FactorStore
from ntk_dist.linalg.operator import (
    CholeskyFactor,
    DenseCholeskyFactor,
    DenseEigendecomposition,
    Eigendecomposition,
    KernelOperator,
    make_2d_numpy,
)
from ntk_dist.store import KernelStore, NonFiniteTileError

__all__ = ["StoredKernelOperator", "default_memory_bound"]


def default_memory_bound() -> int:
    """A quarter of this machine's physical memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class StoredKernelOperator(KernelOperator):
    """:class:`KernelOperator` over a finished kernel store, streaming its tiles.

    Args:
      store: a complete, non-diagonal kernel store.
      memory_bound: bytes one worker may hold (default :func:`default_memory_bound`).
      dtype: compute dtype (default the store's; pass float64 to accumulate a float32
        kernel in float64, which needs ``jax_enable_x64``).
      shift: ``s`` in ``K + s I`` (what :meth:`add_to_diagonal` accumulates).
      devices: devices for the tiled Cholesky (default all local devices).
      progress: ``progress(done, total)`` after each block column of a tiled Cholesky,
        or True to print columns done, GFLOP/s and an ETA on stderr.
      tile_backend: where the tiled Cholesky's tile kernels run: ``"host"`` (LAPACK),
        ``"device"`` (jitted on ``devices``) or ``"auto"`` (host on CPU devices); on the
        host, an eigh too large for JAX's in-core one may still run in core in 1.5 copies.

    Every tile read is checked for NaN/Inf (``NonFiniteTileError`` naming the tile).
    """

    checked_on_read = True

    def __init__(
        self,
        store: KernelStore,
        *,
        memory_bound: int | None = None,
        dtype: Any = None,
        shift: float = 0.0,
        devices: Sequence[jax.Device] | None = None,
        progress: chol.Progress | bool | None = None,
        tile_backend: str = "auto",
    ):
        if store.plan.diagonal:
            raise ValueError(
                f"the kernel at {store.path} is diagonal over the batch axis; a linear operator "
                "needs the full (N1, N2, ...) kernel (compute it without diagonal_axes=(0,))"
            )
        missing = store.missing_tiles()
        if missing:
            raise ValueError(
                f"the kernel at {store.path} is not complete ({len(missing)} of "
                f"{len(store.plan)} tiles missing); finish it with compute_kernel(..., store=...)"
            )
        entry = store.shape[2:]
        self.store = store
        self.memory_bound = default_memory_bound() if memory_bound is None else int(memory_bound)
        dtype = np.dtype(store.dtype if dtype is None else dtype)
        if dtype.itemsize == 8 and not jax.config.jax_enable_x64:
            raise ValueError(
                f"dtype={dtype.name} needs JAX's 64-bit mode: call "
                "jax.config.update('jax_enable_x64', True) before using float64"
            )
        super().__init__((store.plan.n1,) + entry[0::2], (store.plan.n2,) + entry[1::2], dtype)
        self.shift = float(shift)
        self.devices = devices
        self.progress = progress
        chol.check_tile_backend(tile_backend)  # a bad name fails here, not mid-factorisation
        self.tile_backend = tile_backend
        self._per_row = math.prod(entry[0::2])  # 2-D rows per example
        self._per_col = math.prod(entry[1::2])
        self._resident: np.ndarray | None = None

    # ---------------------------------------------------------------- reading
    def _block(self, i: int, j: int) -> np.ndarray:
        """Kernel block (i, j) in 2-D form and compute dtype, shift included; checked finite."""
        block = self.store.block(i, j)
        if not np.all(np.isfinite(block)):
            t = self.store.plan.tile(i, j)
            raise NonFiniteTileError(
                f"the kernel at {self.store.path} has NaN/Inf in tile ({i}, {j}) (examples "
                f"{t.row_start}:{t.row_stop} x {t.col_start}:{t.col_stop}); recompute that "
                "tile (store.forget_tiles, then compute_kernel) or the kernel in float64",
                [(i, j)],
            )
        out = make_2d_numpy(block).astype(self.dtype, copy=False)
        if self.shift and i == j:
            out = out.copy()
            out[np.diag_indices(min(out.shape))] += self.shift
        return out

    def _spans(self, axis: int) -> list[slice]:
        """2-D row (axis 0) or column (axis 1) ranges of the store's block grid."""
        per = (self._per_row, self._per_col)[axis]
        n = self.shape[axis]
        b = self.store.plan.block_shape[axis] * per
        return [slice(s, min(n, s + b)) for s in range(0, n, b)]

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """A region of the 2-D kernel (plus shift), assembled from the blocks it overlaps."""
        rows, cols = slice(*rows.indices(self.shape[0])), slice(*cols.indices(self.shape[1]))
        out = np.empty((rows.stop - rows.start, cols.stop - cols.start), self.dtype)
        for i, rs in enumerate(self._spans(0)):
            r0, r1 = max(rs.start, rows.start), min(rs.stop, rows.stop)
            if r0 >= r1:
                continue
            for j, cs in enumerate(self._spans(1)):
                c0, c1 = max(cs.start, cols.start), min(cs.stop, cols.stop)
                if c0 >= c1:
                    continue
                block = self._block(i, j)
                out[r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start] = block[
                    r0 - rs.start : r1 - rs.start, c0 - cs.start : c1 - cs.start
                ]
        return out

    def _fits(self, copies: int) -> bool:
        return copies * self.shape[0] * self.shape[1] * self.dtype.itemsize <= self.memory_bound

    # ------------------------------------------------------------- interface
    def matmul(self, rhs: jax.Array) -> jax.Array:
        rhs = np.asarray(rhs, self.dtype)
        if self._resident is None and self._fits(2):
            self._resident = self.to_dense()
        if self._resident is not None:
            return jnp.asarray(self._resident @ rhs)
        out = np.zeros((self.shape[0],) + rhs.shape[1:], self.dtype)
        for i, rs in enumerate(self._spans(0)):
            for j, cs in enumerate(self._spans(1)):
                out[rs] += self._block(i, j) @ rhs[cs]
        return jnp.asarray(out)

    def diagonal(self) -> jax.Array:
        self.require_square("diagonal")
        return jnp.concatenate(
            [jnp.diagonal(self._block(i, i)) for i in range(len(self._spans(0)))]
        )

    def to_dense(self) -> np.ndarray:
        return self.read(slice(None), slice(None))

    def all_finite(self) -> bool:
        try:
            self.check_finite("kernel")
        except NonFiniteTileError:
            return False
        return True

    def check_finite(self, name: str) -> None:
        """NonFiniteTileError naming ``name`` and the first tile with NaN or Inf."""
        grid = self.store.plan.grid
        try:
            for i in range(grid[0]):
                for j in range(grid[1]):
                    self._block(i, j)
        except NonFiniteTileError as e:
            raise NonFiniteTileError(f"{name}: {e}", e.tiles) from None

    def add_to_diagonal(self, value: float) -> StoredKernelOperator:
        self.require_square("add_to_diagonal")
        return StoredKernelOperator(
            self.store,
            memory_bound=self.memory_bound,
            dtype=self.dtype,
            shift=self.shift + value,
            devices=self.devices,
            progress=self.progress,
            tile_backend=self.tile_backend,
        )

    # --------------------------------------------------------- factorisations
    def factor_name(self, what: str) -> str:
        """Name of a stored factor of this operator (dtype and diagonal shift included)."""
        return f"{what}-{self.dtype.name}-shift{self.shift.hex()}"

    def _cholesky_factor(self) -> CholeskyFactor:
        n, itemsize = self.shape[0], self.dtype.itemsize
        name = self.factor_name("cholesky")
        factor = FactorStore.open(self.store, name)
        if factor is not None and chol.is_complete(factor, n, factor.attributes["tile"]):
            self.reused["cholesky"] += 1
            stored = chol.StoredCholeskyFactor(factor, n, factor.attributes["tile"])
            return DenseCholeskyFactor(stored.to_dense()) if self._fits(2) else stored
        self.factorizations["cholesky"] += 1
        tile = min(chol.cholesky_tile_size(n, itemsize, self.memory_bound), chol.STREAM_TILE)
        if factor is None or factor.attributes.get("tile") != tile:
            factor = FactorStore.create(
                self.store,
                name,
                (n, n),
                (tile, tile),
                self.dtype,
                {"kind": "cholesky", "tile": tile},
            )
        chol.tiled_cholesky(  # even when K fits: reads and writes overlap the arithmetic
            self.read, n, factor, tile, self.devices, self.progress, tile_backend=self.tile_backend
        )
        stored = chol.StoredCholeskyFactor(factor, n, tile)
        return DenseCholeskyFactor(stored.to_dense()) if self._fits(2) else stored

    def _eigenvalues_only(self) -> jax.Array:
        """From a stored eigh or spectrum if there is one; else in core when the eigh
        would be, else out of core (band reduction), then stored beside the kernel."""
        n = self.shape[0]
        names = [self.factor_name(what) for what in ("eigenvalues", "eigenvectors", "spectrum")]
        values, vectors, spectrum = (FactorStore.open(self.store, name) for name in names)
        if values is not None and vectors is not None and eig.is_complete(values, vectors):
            self.reused["eigvalsh"] += 1
            return jnp.asarray(values.read((slice(None),)))
        if spectrum is not None and "values" in spectrum.done():
            self.reused["eigvalsh"] += 1
            return jnp.asarray(spectrum.read((slice(None),)))
        self.factorizations["eigvalsh"] += 1
        if eig.fits_in_core(n, self.dtype.itemsize, self.memory_bound):
            w = np.asarray(jnp.linalg.eigvalsh(self.to_dense()))
        else:
            tile = chol.cholesky_tile_size(n, self.dtype.itemsize, self.memory_bound)
            folder = eig.default_scratch_dir(self.store, names[2])
            w = eig.out_of_core_eigenvalues(
                self.read, n, self.dtype, tile, self.memory_bound, folder
            )
        spectrum = FactorStore.create(self.store, names[2], (n,), (n,), self.dtype, {})
        spectrum.write("values", (slice(None),), w)
        return jnp.asarray(w)

    def _eigendecomposition(self) -> Eigendecomposition:
        n = self.shape[0]
        names = self.factor_name("eigenvalues"), self.factor_name("eigenvectors")
        values, vectors = (FactorStore.open(self.store, name) for name in names)
        if values is not None and vectors is not None and eig.is_complete(values, vectors):
            self.reused["eigh"] += 1
            stored = eig.StoredEigendecomposition(values, vectors)
            if self._fits(2):
                return DenseEigendecomposition(stored.values, jnp.asarray(stored.vectors_dense()))
            return stored
        self.factorizations["eigh"] += 1
        tile = chol.cholesky_tile_size(n, self.dtype.itemsize, self.memory_bound)
        attrs = {"kind": "eigh", "tile": tile}
        if values is None or vectors is None or vectors.attributes.get("tile") != tile:
            values = FactorStore.create(self.store, names[0], (n,), (n,), self.dtype, attrs)
            chunk = (tile, eig.column_chunk(n, self.dtype.itemsize, self.memory_bound, tile))
            vectors = FactorStore.create(self.store, names[1], (n, n), chunk, self.dtype, attrs)
        devices = self.devices or jax.local_devices()
        on_host = chol.choose_tile_backend(self.tile_backend, devices) == "host"
        in_core = None
        if eig.fits_in_core(n, self.dtype.itemsize, self.memory_bound):
            in_core = jnp.linalg.eigh(self.to_dense())
        elif on_host and eig.fits_on_host(n, self.dtype.itemsize, self.memory_bound):
            in_core = tridiagonal.host_eigh(self.to_dense)
        if in_core is not None:
            w, v = in_core
            eig.write_eigh(values, vectors, np.asarray(w), np.asarray(v))
            if self._fits(2):
                return DenseEigendecomposition(jnp.asarray(w), jnp.asarray(v))
            return eig.StoredEigendecomposition(values, vectors)
        eig.out_of_core_eigh(
            self.read,
            n,
            self.dtype,
            self.memory_bound,
            values,
            vectors,
            self.devices,
            scratch_dir=eig.default_scratch_dir(self.store, names[1]),
        )
        return eig.StoredEigendecomposition(values, vectors)
