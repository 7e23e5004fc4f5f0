"""Cholesky factorisation of a kernel that may not fit in memory, stored tile by tile.

``K = L L^T`` is computed in core (LAPACK) when ``IN_CORE_COPIES`` copies of ``K`` fit
the memory bound; otherwise by a left-looking algorithm over panels of block columns
(``b x b`` tiles; the store's chunks and the ledger's unit). For a panel ``J`` of
columns starting at row ``j0``::

    A_:J = K_:J - sum_{K < j0} L_:K L_JK^T    (one gemm per strip of earlier columns)
    L_JJ = chol(A_JJ)                          (potrf)
    L_IJ = A_IJ L_JJ^{-T}                      (trsm)                  I below J

A panel holds as many block columns as fit a quarter of the bound (it widens as the
rows left shrink); the panel just factored stays resident as the first strip of the
next one (its tiles are written meanwhile), and earlier columns are read back in wide
strips of an eighth of the bound each, the next one read by a reader thread while the
current one is multiplied.
The arithmetic is host BLAS/LAPACK in place (the data lives on the host out of core;
XLA's CPU potrf is ~1.7x slower than LAPACK and every new panel shape would cost a
compile). Every finished tile is recorded in the factor's ledger; a killed
factorisation resumes at the first unfinished block column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

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
    "first_unfinished",
    "is_complete",
    "potrf",
    "tile_key",
    "tiled_cholesky",
    "write_factor",
]

IN_CORE_COPIES = 3  # K, L and one working copy
PANELS = 4  # a panel takes a quarter of the bound (the previous one another, strips the rest)
STRIPS = 8  # each of the two strips in flight takes an eighth of the bound

RegionReader = Callable[[slice, slice], np.ndarray]
Progress = Callable[[int, int], None]


class TileStore(Protocol):
    """What :func:`tiled_cholesky` writes the factor to (a ``FactorStore`` or a scratch)."""

    def done(self) -> set[str]: ...

    def write(self, key: str, index: tuple[slice, ...], data: np.ndarray) -> None: ...

    def read(self, index: tuple[slice, ...]) -> np.ndarray: ...


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


def potrf(a: np.ndarray, offset: int, n: int) -> np.ndarray:
    """Lower factor of ``a`` (rows ``offset`` on of an ``n x n`` kernel) or the failing pivot."""
    try:
        lower = scipy.linalg.cholesky(a, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        lower = None
    if lower is None or not np.all(np.isfinite(lower)):
        pivot = failing_pivot(a)
        raise NotPositiveDefiniteError(-1 if pivot is None else offset + pivot, (n, n))
    return lower


def cholesky_in_core(matrix: np.ndarray) -> jax.Array:
    """Lower Cholesky factor of ``matrix`` by LAPACK; NotPositiveDefiniteError names the pivot."""
    a = np.asarray(matrix)
    return jnp.asarray(potrf(a, 0, a.shape[0]))


def tile_key(i: int, j: int) -> str:
    """The ledger key of factor tile ``(i, j)``."""
    return f"{i}_{j}"


def first_unfinished(factor: TileStore, nb: int) -> int:
    """The first of ``nb`` block columns with a tile missing from ``factor``'s ledger."""
    done = factor.done()
    return next((j for j in range(nb) if any(tile_key(i, j) not in done for i in range(j, nb))), nb)


def _subtract_product(panel: np.ndarray, strip: np.ndarray, width: int) -> None:
    """In place ``panel -= strip @ strip[:width].T`` (BLAS gemm on the transposes, no copy)."""
    (gemm,) = scipy.linalg.get_blas_funcs(("gemm",), (panel,))
    gemm(-1.0, strip[:width].T, strip.T, beta=1.0, c=panel.T, trans_a=1, overwrite_c=1)


def _solve_below(panel: np.ndarray, lower: np.ndarray) -> None:
    """In place ``panel[w:] <- panel[w:] L^{-T}`` for the ``w x w`` lower factor ``L``."""
    w = lower.shape[0]
    (trsm,) = scipy.linalg.get_blas_funcs(("trsm",), (panel,))
    trsm(1.0, lower, panel[w:].T, side=0, lower=1, trans_a=0, overwrite_b=1)


def _strips(start: int, stop: int, width: int) -> Iterator[slice]:
    for k in range(start, stop, width):
        yield slice(k, min(stop, k + width))


def tiled_cholesky(
    read: RegionReader,
    n: int,
    factor: TileStore,
    tile: int,
    devices: Sequence[jax.Device] | None = None,
    progress: Progress | None = None,
    memory_bound: int | None = None,
) -> int:
    """Write the lower factor of the ``n x n`` matrix given by ``read`` into ``factor``.

    ``read(rows, cols)`` returns a region of ``K`` in the compute dtype. The work
    starts at the first block column missing from ``factor``'s ledger. ``memory_bound``
    (bytes; default: the bound that gives ``tile`` by :func:`cholesky_tile_size`) sizes
    panels and strips. ``devices`` is accepted for the operator interface: the kernels
    run on the host's BLAS, which uses every core. Returns the number of block columns
    computed by this call; ``progress(done, total)`` is called after each column.
    """
    del devices
    nb = math.ceil(n / tile)
    span = [slice(i * tile, min(n, (i + 1) * tile)) for i in range(nb)]
    first = first_unfinished(factor, nb)
    previous: tuple[np.ndarray, int] | None = None  # (rows below it, first column)
    writing: list[tuple[int, list[Future]]] = []  # the previous panel's columns being written
    itemsize = read(slice(0, 1), slice(0, 1)).dtype.itemsize
    bound = memory_bound or PANELS * n * itemsize * tile

    def finish_writes() -> None:
        for c, writes in writing:
            for write in writes:
                write.result()
            if progress is not None:
                progress(c + 1, nb)
        writing.clear()

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(4) as writer:
        j = first
        while j < nb:
            j0 = span[j].start
            cols = max(1, min(nb - j, bound // (PANELS * (n - j0) * itemsize * tile)))
            panel = np.ascontiguousarray(read(slice(j0, n), slice(j0, span[j + cols - 1].stop)))
            width = panel.shape[1]
            stored_to = j0
            if previous is not None:  # rows j0: of the columns p0:j0, still in memory
                strip, stored_to = previous
                _subtract_product(panel, strip, width)
            finish_writes()  # the earlier columns are durable before they are read back
            strip_cols = max(1, bound // (STRIPS * (n - j0) * itemsize))
            pending: Future | None = None
            for ks in _strips(0, stored_to, strip_cols):
                future = reader.submit(factor.read, (slice(j0, n), ks))
                if pending is not None:
                    _subtract_product(panel, pending.result(), width)
                pending = future
            if pending is not None:
                _subtract_product(panel, pending.result(), width)
            panel[:width] = potrf(panel[:width], j0, n)
            _solve_below(panel, panel[:width])
            for c in range(j, j + cols):
                local = slice(span[c].start - j0, span[c].stop - j0)
                rows = [slice(span[i].start - j0, span[i].stop - j0) for i in range(c, nb)]
                keys = [(tile_key(i, c), (span[i], span[c])) for i in range(c, nb)]
                writes = [
                    writer.submit(factor.write, key, index, panel[r, local])
                    for (key, index), r in zip(keys, rows, strict=True)
                ]
                writing.append((c, writes))
            previous = (panel[width:], j0)
            j += cols
        finish_writes()
    return nb - first


def write_factor(factor: FactorStore, lower: np.ndarray, tile: int) -> None:
    """Store an in-memory lower factor tile by tile (lower triangle only)."""
    n = lower.shape[0]
    nb = math.ceil(n / tile)
    span = [slice(i * tile, min(n, (i + 1) * tile)) for i in range(nb)]
    with ThreadPoolExecutor(4) as writer:  # tensorstore writes release the GIL
        writes = [
            writer.submit(factor.write, tile_key(i, j), (span[i], span[j]), lower[span[i], span[j]])
            for j in range(nb)
            for i in range(j, nb)
        ]
        for write in writes:
            write.result()


def is_complete(factor: FactorStore, n: int, tile: int) -> bool:
    """Whether every lower tile of the factor is in its ledger."""
    nb = math.ceil(n / tile)
    done = factor.done()
    return all(tile_key(i, j) in done for j in range(nb) for i in range(j, nb))


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
