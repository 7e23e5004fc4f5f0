"""Cholesky factorisation of a kernel that may not fit in memory, stored tile by tile.

``K = L L^T`` of a stored kernel is computed by a left-looking algorithm over panels of
block columns (``b x b`` tiles; the store's chunks and the ledger's unit), whether or
not ``K`` fits in memory (kernels in memory use LAPACK directly). For a panel ``J`` of
columns starting at row ``j0``::

    A_:J = K_:J - sum_{K < j0} L_:K L_JK^T    (one gemm per strip of earlier columns)
    L_JJ = chol(A_JJ)                          (potrf)
    L_IJ = A_IJ L_JJ^{-T}                      (trsm)                  I below J

A panel holds as many block columns as fit a quarter of the bound (it widens as the
rows left shrink); the panel just factored stays resident as the first strip of the
next one (its tiles are written meanwhile), and earlier columns are read back in wide
strips of an eighth of the bound each (at least one block column on devices), the next
one read by a reader thread while the current one is multiplied.

The arithmetic runs on one of two tile backends (``tile_backend``):

- ``"host"``: BLAS/LAPACK in place on host arrays (the data lives on the host out of
  core; XLA's CPU potrf is ~1.7x slower than LAPACK and every new panel shape would
  cost a compile). ``"auto"`` picks it when the devices are CPUs.
- ``"device"``: panels as grids of ``b x b`` tiles on the JAX devices (block row ``i``
  on device ``i % D``, so the tile updates of a panel spread over the devices), updated
  by jitted potrf / trsm / syrk / gemm tile kernels of one fixed shape (the ragged last
  block padded with an identity on the diagonal), each compiled once per device.
  ``"auto"`` picks it for GPUs and TPUs.

Both write the same tiles to the same stored layout. Every finished tile is recorded
in the factor's ledger; a killed factorisation resumes at the first unfinished block
column.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from ntk_dist import precision
from ntk_dist.linalg.factor_store import FactorStore
from ntk_dist.linalg.operator import CholeskyFactor, NotPositiveDefiniteError, failing_pivot
from ntk_dist.progress import ProgressReporter

__all__ = [
    "PANELS",
    "STREAM_TILE",
    "TILE_BACKENDS",
    "StoredCholeskyFactor",
    "cholesky_tile_size",
    "check_tile_backend",
    "choose_tile_backend",
    "column_flops",
    "first_unfinished",
    "is_complete",
    "potrf",
    "tile_key",
    "tiled_cholesky",
]

STREAM_TILE = 512  # largest tile of a stored kernel's factor (measured fastest at N = 4096)
PANELS = 4  # a panel takes a quarter of the bound (the previous one another, strips the rest)
STRIPS = 8  # each of the two strips in flight takes an eighth of the bound
TILE_BACKENDS = ("auto", "host", "device")

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


def column_flops(n: int, start: int, width: int) -> float:
    """Flops of block column ``start:start+width``: its updates (gemm), potrf and trsm."""
    below = n - start - width
    return 2.0 * (n - start) * start * width + width**3 / 3 + below * width**2


def check_tile_backend(tile_backend: str) -> None:
    """ValueError unless ``tile_backend`` is one of :data:`TILE_BACKENDS`."""
    if tile_backend not in TILE_BACKENDS:
        raise ValueError(
            f"tile_backend={tile_backend!r} is not one of {TILE_BACKENDS}: 'host' runs the tile "
            "kernels on host LAPACK, 'device' on the JAX devices, 'auto' picks host on CPU"
        )


def choose_tile_backend(tile_backend: str, devices: Sequence[jax.Device]) -> str:
    """``"host"`` or ``"device"``: ``"auto"`` is host LAPACK on CPU devices, else device."""
    check_tile_backend(tile_backend)
    if tile_backend == "auto":
        return "host" if all(d.platform == "cpu" for d in devices) else "device"
    return tile_backend


class _HostPanels:
    """Panels as host arrays, updated in place by BLAS/LAPACK (the data lives on the host)."""

    def __init__(self, n: int, tile: int):
        self.n, self.tile = n, tile

    def strip_width(self, columns: int) -> int:
        return columns

    def load(self, region: np.ndarray, j: int) -> np.ndarray:
        return np.ascontiguousarray(region)

    def strip(self, region: np.ndarray, j: int) -> np.ndarray:
        return region

    def subtract(self, panel: np.ndarray, strip: np.ndarray, width: int) -> None:
        _subtract_product(panel, strip, width)

    def factor(self, panel: np.ndarray, width: int, j0: int) -> None:
        panel[:width] = potrf(panel[:width], j0, self.n)
        _solve_below(panel, panel[:width])

    def tile_of(self, panel: np.ndarray, r: int, c: int) -> np.ndarray:
        """Tile ``(r, c)`` of ``panel`` in block units from its first block row and column."""
        b = self.tile
        return panel[r * b : (r + 1) * b, c * b : (c + 1) * b]

    def below(self, panel: np.ndarray, width: int) -> np.ndarray:
        return panel[width:]


@functools.partial(jax.jit, donate_argnums=0)
def _gemm_update(acc: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    return acc - precision.matmul(a, b.T)


@functools.partial(jax.jit, donate_argnums=0)
def _syrk_update(acc: jax.Array, a: jax.Array) -> jax.Array:
    return acc - precision.matmul(a, a.T)


@jax.jit
def _potrf_tile(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    lower = jnp.linalg.cholesky(a)  # NaN where the factorisation failed
    return lower, jnp.all(jnp.isfinite(lower))


@jax.jit
def _trsm_tile(lower: jax.Array, a: jax.Array) -> jax.Array:  # a L^{-T}
    return jax.scipy.linalg.solve_triangular(lower, a.T, lower=True).T


@dataclass
class _Tiles:
    """Device tiles of a panel or strip: ``rows[r][c]`` is block ``(first + r, c)``."""

    first: int  # the first block row (and, for a panel, block column)
    rows: list[list[jax.Array | None]]  # None above a panel's diagonal


class _DevicePanels:
    """Panels as grids of ``b x b`` device tiles; block row ``i`` lives on device ``i % D``.

    Every tile has the same shape (the ragged last block is padded: zeros off the
    diagonal, ones on the diagonal's padding), so each kernel compiles once per device.
    """

    def __init__(self, n: int, tile: int, devices: Sequence[jax.Device]):
        self.n, self.tile, self.devices = n, tile, list(devices)

    def strip_width(self, columns: int) -> int:
        return max(1, columns // self.tile) * self.tile  # whole block columns

    def _device(self, i: int) -> jax.Device:
        return self.devices[i % len(self.devices)]

    def _edge(self, i: int) -> int:
        return min(self.tile, self.n - i * self.tile)

    def _put(self, block: np.ndarray, i: int, diagonal: bool) -> jax.Array:
        """``block`` of block row ``i``, padded to ``b x b``, on its device."""
        b = self.tile
        if block.shape != (b, b):
            padded = np.zeros((b, b), block.dtype)
            padded[: block.shape[0], : block.shape[1]] = block
            if diagonal:
                padded[np.arange(block.shape[0], b), np.arange(block.shape[0], b)] = 1
            block = padded
        return jax.device_put(block, self._device(i))

    def _grid(self, region: np.ndarray, j: int, panel: bool) -> _Tiles:
        b = self.tile
        rows, cols = math.ceil(len(region) / b), math.ceil(region.shape[1] / b)
        return _Tiles(
            j,
            [
                [
                    self._put(
                        region[r * b : (r + 1) * b, c * b : (c + 1) * b], j + r, panel and r == c
                    )
                    if r >= c or not panel
                    else None
                    for c in range(cols)
                ]
                for r in range(rows)
            ],
        )

    def load(self, region: np.ndarray, j: int) -> _Tiles:
        """The lower tiles of a panel read from ``K`` (block rows and columns from ``j``)."""
        return self._grid(region, j, panel=True)

    def strip(self, region: np.ndarray, j: int) -> _Tiles:
        """Every tile of a strip of earlier factor columns (block rows from ``j``)."""
        return self._grid(region, j, panel=False)

    def _everywhere(self, tile: jax.Array) -> dict[jax.Device, jax.Array]:
        return {d: jax.device_put(tile, d) for d in self.devices}

    def _update(self, acc: jax.Array, a: jax.Array, top: dict, i: int, diagonal: bool) -> jax.Array:
        """``acc - a top^T`` for block row ``i`` (syrk on the diagonal, where top is a)."""
        return _syrk_update(acc, a) if diagonal else _gemm_update(acc, a, top[self._device(i)])

    def subtract(self, panel: _Tiles, strip: _Tiles, width: int) -> None:
        """``panel -= strip strip[:width]^T`` on the panel's lower tiles, tile by tile."""
        p, s, j = panel.rows, strip.rows, panel.first
        for k in range(len(s[0])):
            for c in range(len(p[0])):
                top = self._everywhere(s[c][k])
                for r in range(c, len(p)):
                    p[r][c] = self._update(p[r][c], s[r][k], top, j + r, r == c)

    def factor(self, panel: _Tiles, width: int, j0: int) -> None:
        """Right-looking Cholesky of the panel's columns: potrf, trsm below, update right."""
        p, j = panel.rows, panel.first
        for c in range(len(p[0])):
            lower, finite = _potrf_tile(p[c][c])
            if not bool(finite):
                h = self._edge(j + c)
                pivot = failing_pivot(np.asarray(p[c][c])[:h, :h])
                offset = (j + c) * self.tile
                raise NotPositiveDefiniteError(
                    -1 if pivot is None else offset + pivot, (self.n,) * 2
                )
            p[c][c] = lower
            copies = self._everywhere(lower)
            for r in range(c + 1, len(p)):
                p[r][c] = _trsm_tile(copies[self._device(j + r)], p[r][c])
            for c2 in range(c + 1, len(p[0])):
                top = self._everywhere(p[c2][c])
                for r in range(c2, len(p)):
                    p[r][c2] = self._update(p[r][c2], p[r][c], top, j + r, r == c2)

    def tile_of(self, panel: _Tiles, r: int, c: int) -> np.ndarray:
        """Tile ``(r, c)`` (block units from the panel's first block), unpadded, on the host."""
        i, k = panel.first + r, panel.first + c
        return np.asarray(panel.rows[r][c])[: self._edge(i), : self._edge(k)]

    def below(self, panel: _Tiles, width: int) -> _Tiles:
        cols = len(panel.rows[0])
        return _Tiles(panel.first + cols, panel.rows[cols:])


def tiled_cholesky(
    read: RegionReader,
    n: int,
    factor: TileStore,
    tile: int,
    devices: Sequence[jax.Device] | None = None,
    progress: Progress | bool | None = None,
    memory_bound: int | None = None,
    tile_backend: str = "auto",
) -> int:
    """Write the lower factor of the ``n x n`` matrix given by ``read`` into ``factor``.

    ``read(rows, cols)`` returns a region of ``K`` in the compute dtype. The work
    starts at the first block column missing from ``factor``'s ledger. ``memory_bound``
    (bytes; default: the bound that gives ``tile`` by :func:`cholesky_tile_size`) sizes
    panels and strips. ``tile_backend``: ``"host"`` (LAPACK/BLAS in place, which uses
    every core), ``"device"`` (jitted tile kernels on ``devices``, default all local
    devices) or ``"auto"`` (host when the devices are CPUs). Returns the number of block
    columns computed by this call; ``progress(done, total)`` is called after each column
    is stored, or ``progress=True`` prints columns done, GFLOP/s and an ETA on stderr.
    """
    devices = list(devices) if devices else jax.local_devices()
    if choose_tile_backend(tile_backend, devices) == "device":
        panels: _HostPanels | _DevicePanels = _DevicePanels(n, tile, devices)
    else:
        panels = _HostPanels(n, tile)
    nb = math.ceil(n / tile)
    span = [slice(i * tile, min(n, (i + 1) * tile)) for i in range(nb)]
    first = first_unfinished(factor, nb)
    on_column = _column_reporter(progress, n, span, first)
    previous = None  # (the last panel's rows below it, its first column)
    writing: list[tuple[int, list[Future]]] = []  # the previous panel's columns being written
    itemsize = read(slice(0, 1), slice(0, 1)).dtype.itemsize
    bound = memory_bound or PANELS * n * itemsize * tile

    def finish_writes() -> None:
        for c, writes in writing:
            for write in writes:
                write.result()
            on_column(c)
        writing.clear()

    def read_strip(cols: slice, j: int) -> object:
        return panels.strip(factor.read((slice(span[j].start, n), cols)), j)

    def write_tile(panel: object, r: int, c: int, j: int) -> None:
        factor.write(
            tile_key(j + r, j + c), (span[j + r], span[j + c]), panels.tile_of(panel, r, c)
        )

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(4) as writer:
        j = first
        while j < nb:
            j0 = span[j].start
            cols = max(1, min(nb - j, bound // (PANELS * (n - j0) * itemsize * tile)))
            stop = span[j + cols - 1].stop
            panel = panels.load(read(slice(j0, n), slice(j0, stop)), j)
            width = stop - j0
            stored_to = j0
            if previous is not None:  # rows j0: of the columns p0:j0, still in memory
                strip, stored_to = previous
                panels.subtract(panel, strip, width)
            finish_writes()  # the earlier columns are durable before they are read back
            strip_cols = panels.strip_width(max(1, bound // (STRIPS * (n - j0) * itemsize)))
            pending: Future | None = None
            for ks in _strips(0, stored_to, strip_cols):
                future = reader.submit(read_strip, ks, j)
                if pending is not None:
                    panels.subtract(panel, pending.result(), width)
                pending = future
            if pending is not None:
                panels.subtract(panel, pending.result(), width)
            panels.factor(panel, width, j0)
            for c in range(cols):
                writes = [writer.submit(write_tile, panel, r, c, j) for r in range(c, nb - j)]
                writing.append((j + c, writes))
            previous = (panels.below(panel, width), j0)
            j += cols
        finish_writes()
    return nb - first


def _column_reporter(
    progress: Progress | bool | None, n: int, span: list[slice], first: int
) -> Callable[[int], None]:
    """What to do when block column ``c`` is stored: call ``progress`` or print a line."""
    nb = len(span)
    if callable(progress):
        return lambda c: progress(c + 1, nb)
    if not progress:
        return lambda c: None
    flops = [column_flops(n, s.start, s.stop - s.start) / 1e9 for s in span]
    left = [sum(flops[c:]) for c in range(nb + 1)]
    report = ProgressReporter(
        "cholesky block columns", nb, "GFLOP", done=first, work_left=left.__getitem__
    )
    return lambda c: report.update(flops[c])


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
