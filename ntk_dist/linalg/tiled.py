"""Tiled dense matrices on scratch disk and the tile jobs the out-of-core eigh is made of.

A :class:`Tiled` matrix is one file in a scratch folder holding ``b x b`` tiles one
after another (row of tiles by row of tiles); edge tiles are stored padded with zeros,
so every tile has the same shape and a jitted tile kernel compiles once per panel
length, not once per ragged shape. Tiles are read and written with ``pread``/``pwrite``
(no memory map), so a process holds only the panels it is working on.

The work is cut into jobs that each produce one row of output tiles:

- :class:`ProductJob`: ``alpha op(A) op(B) + beta D + gamma I`` (optionally only the
  lower triangle, mirrored; tiles known to be zero in triangular operands are skipped),
  holding one row panel of ``op(A)`` and one column panel of ``op(B)``;
- :class:`SolveJob`: ``alpha X L^{-T} [L^{-1}] + beta X`` for lower factors ``L`` (a
  :class:`Factor` carries the inverses of its diagonal tiles, so every step of a solve
  is a gemm);
- :class:`CombineJob` (``alpha A + gamma I``) and :class:`RandomJob` (Gaussian tiles).

Each job returns the sums the algorithm needs next (squared Frobenius norm, trace,
squared distance to ``D`` or ``X``), so no extra pass over a matrix computes them.
A runner executes a list of independent jobs: :class:`LocalRunner` in this process
(host BLAS through numpy only: numpy and scipy bundle separate OpenBLAS builds whose
idle threads spin, and alternating between them made every call ~5x slower; or jitted
JAX kernels on the given devices, round robin), :class:`RayRunner` as Ray tasks spread
over the nodes of a cluster that shares the scratch folder (a local cluster shares the
disk). The Cholesky factorisations run in the calling process by
:func:`ntk_dist.linalg.cholesky.tiled_cholesky`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from ntk_dist import precision
from ntk_dist.linalg import cholesky as chol

__all__ = [
    "CombineJob",
    "DeviceKernels",
    "Factor",
    "HostKernels",
    "LocalRunner",
    "ProductJob",
    "RandomJob",
    "RayRunner",
    "Reductions",
    "SolveJob",
    "Term",
    "Tiled",
    "TileRunner",
    "cholesky",
]

Reductions = dict[str, float]  # "sumsq", "trace", "diffsq" of a job's output


@dataclass(frozen=True)
class Tiled:
    """A ``rows x cols`` matrix stored as padded ``tile x tile`` tiles in the file ``path``.

    ``triangle`` ("lower"/"upper") says which tiles are known to be zero (skipped by
    products and solves). Plain data, so jobs carrying it travel to Ray workers.
    """

    path: str
    rows: int
    cols: int
    tile: int
    dtype: str
    triangle: str | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return math.ceil(self.rows / self.tile), math.ceil(self.cols / self.tile)

    @property
    def _tile_bytes(self) -> int:
        return self.tile * self.tile * np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        """Size of the file: every (padded) tile, at least one."""
        gr, gc = self.grid
        return max(gr * gc, 1) * self._tile_bytes

    def create(self) -> Tiled:
        """Create the zero-filled file (a sparse file: zeros cost no disk until written)."""
        with open(self.path, "wb") as f:
            f.truncate(self.nbytes)
        return self

    def release(self) -> None:
        """Delete the file."""
        if os.path.exists(self.path):
            os.remove(self.path)

    def with_triangle(self, triangle: str | None) -> Tiled:
        return Tiled(self.path, self.rows, self.cols, self.tile, self.dtype, triangle)

    # ------------------------------------------------------------------ tiles
    def read_tiles(
        self, index: Sequence[tuple[int, int]], out: np.ndarray | None = None
    ) -> np.ndarray:
        """Tiles ``(i, j)`` as one ``(len(index), b, b)`` array (``out`` if given: a buffer
        read into again and again costs no fresh pages)."""
        b, gc = self.tile, self.grid[1]
        out = np.empty((len(index), b, b), self.dtype) if out is None else out
        with open(self.path, "rb", buffering=0) as f:
            fd, k = f.fileno(), 0
            while k < len(index):  # runs of consecutive tiles in one read each
                i, j = index[k]
                run = 1
                while k + run < len(index) and index[k + run] == (i, j + run) and j + run < gc:
                    run += 1
                got = os.preadv(fd, [out[k : k + run]], (i * gc + j) * self._tile_bytes)
                if got != run * self._tile_bytes:
                    raise OSError(f"short read from scratch matrix {self.path}")
                k += run
        return out

    def write_tiles(self, index: Sequence[tuple[int, int]], tiles: Iterable[np.ndarray]) -> None:
        gc = self.grid[1]
        with open(self.path, "r+b", buffering=0) as f:
            for (i, j), t in zip(index, tiles, strict=True):
                data = np.ascontiguousarray(t, self.dtype)
                os.pwrite(f.fileno(), data, (i * gc + j) * self._tile_bytes)

    def op_row(self, i: int, ks: range, transpose: bool) -> np.ndarray:
        """Row ``i`` of tiles ``op(M)[i, k]``, ``k`` in ``ks``, as one ``b x len(ks) b`` panel.

        ``op`` is the transpose if ``transpose``. Read a tile at a time into the panel.
        """
        b = self.tile
        panel = np.empty((b, len(ks) * b), self.dtype)
        for n, k in enumerate(ks):
            t = self.read_tiles([(k, i) if transpose else (i, k)])[0]
            panel[:, n * b : (n + 1) * b] = t.T if transpose else t
        return panel

    def op_col(self, j: int, ks: range, transpose: bool) -> np.ndarray:
        """Tiles ``op(M)[k, j]`` for ``k`` in ``ks``, stacked: a ``len(ks) b x b`` panel."""
        if not transpose:
            return self.read_tiles([(k, j) for k in ks])
        tiles = self.read_tiles([(j, k) for k in ks])
        for t in tiles:  # in place, a tile at a time
            t[:] = t.T.copy()
        return tiles

    def op_nonzero(self, i: int, transpose: bool, row: bool) -> range:
        """Tile range of row (``row``) or column ``i`` of ``op(M)`` that may be nonzero."""
        n = self.grid[0] if row == transpose else self.grid[1]
        lower = (self.triangle == "lower") != transpose  # op(M) is lower triangular
        if self.triangle is None:
            return range(n)
        if lower == row:  # row of a lower / column of an upper: up to the diagonal
            return range(min(i + 1, n))
        return range(i, n)

    # ---------------------------------------------------------------- regions
    def read_region(self, rows: slice, cols: slice) -> np.ndarray:
        """An arbitrary region (tests, the in-core leaves, the Cholesky's panels)."""
        r0, r1, _ = rows.indices(self.rows)
        c0, c1, _ = cols.indices(self.cols)
        b = self.tile
        out = np.empty((r1 - r0, c1 - c0), self.dtype)
        tj = range(c0 // b, math.ceil(c1 / b)) if c1 > c0 else range(0)
        for i in range(r0 // b, math.ceil(r1 / b)) if r1 > r0 else []:
            tiles = self.read_tiles([(i, j) for j in tj])
            panel = tiles.transpose(1, 0, 2).reshape(b, -1)
            lo, hi = max(r0, i * b), min(r1, (i + 1) * b)
            out[lo - r0 : hi - r0] = panel[lo - i * b : hi - i * b, c0 - tj.start * b :][
                :, : c1 - c0
            ]
        return out

    def write_region(self, rows: slice, cols: slice, data: np.ndarray) -> None:
        """Write a region whose corners lie on tile corners (or the matrix's edge)."""
        r0, r1, _ = rows.indices(self.rows)
        c0, c1, _ = cols.indices(self.cols)
        b = self.tile
        index = [
            (i, j)
            for i in range(r0 // b, math.ceil(r1 / b))
            for j in range(c0 // b, math.ceil(c1 / b))
        ]

        def padded(i: int, j: int) -> np.ndarray:
            t = np.zeros((b, b), self.dtype)
            block = data[i * b - r0 : (i + 1) * b - r0, j * b - c0 : (j + 1) * b - c0]
            t[: block.shape[0], : block.shape[1]] = block
            return t

        self.write_tiles(index, (padded(i, j) for i, j in index))  # a tile at a time

    def diagonal(self) -> np.ndarray:
        g = min(self.grid)
        tiles = self.read_tiles([(i, i) for i in range(g)])
        return np.concatenate([np.diagonal(t) for t in tiles])[: min(self.rows, self.cols)]


def write_symmetrised(read: Callable[[slice, slice], np.ndarray], a: Tiled) -> Reductions:
    """Write ``(A + A^T) / 2`` of the square matrix ``read(rows, cols)`` into ``a``, one pair
    of tiles at a time; returns its ``sumsq`` and ``trace``."""
    n, b = a.rows, a.tile
    spans = [slice(s, min(n, s + b)) for s in range(0, n, b)]
    sums = {"sumsq": 0.0, "trace": 0.0}
    for i, rs in enumerate(spans):
        for j, cs in enumerate(spans[: i + 1]):
            t = (np.asarray(read(rs, cs), a.dtype) + np.asarray(read(cs, rs), a.dtype).T) / 2
            a.write_region(rs, cs, t)
            a.write_region(cs, rs, t.T)
            sums["sumsq"] += (1 if i == j else 2) * float(np.sum(t * t))
            sums["trace"] += float(np.trace(t)) if i == j else 0.0
    return sums


def _identity_part(t: np.ndarray, i: int, j: int, rows: int, cols: int) -> np.ndarray:
    """``t`` plus 1 on the real (unpadded) diagonal entries of tile ``(i, j)``."""
    if i == j:
        b = t.shape[0]
        d = max(0, min(b, rows - i * b, cols - j * b))
        t = t.copy()
        t[np.arange(d), np.arange(d)] += 1
    return t


def _sums(t: np.ndarray, diagonal: bool, weight: float = 1.0) -> Reductions:
    return {"sumsq": weight * float(np.sum(t * t)), "trace": float(np.trace(t)) if diagonal else 0}


def _add(total: Reductions, part: Reductions) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v


# ---------------------------------------------------------------------- kernels
class Kernels(Protocol):
    """Tile arithmetic of the jobs: on the host (numpy) or on a JAX device."""

    def prepare(self, panel: np.ndarray) -> Any: ...

    def product(self, prepared: Any, k0: int, k1: int, tiles: np.ndarray) -> np.ndarray: ...

    def matmul(self, left: np.ndarray, right: np.ndarray) -> np.ndarray: ...


class HostKernels:
    """Host BLAS/LAPACK: one gemm of a ``b x K`` row panel and a ``K x b`` column panel a tile."""

    def prepare(self, panel: np.ndarray) -> np.ndarray:
        return panel

    def product(self, prepared: np.ndarray, k0: int, k1: int, tiles: np.ndarray) -> np.ndarray:
        """``sum_k row_k @ tiles_k`` over the prepared row's tiles ``k0:k1``."""
        b = tiles.shape[1]
        return prepared[:, k0 * b : k1 * b] @ tiles.reshape(-1, b)

    def matmul(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return left @ right


@jax.jit
def _tile_sum(left: jax.Array, right: jax.Array) -> jax.Array:
    return jnp.einsum("kij,kjl->il", left, right, precision=precision.HIGHEST)


_matmul = jax.jit(precision.matmul)


class DeviceKernels:
    """Jitted JAX tile kernels on one device (fixed ``b x b`` tiles: one compile per length)."""

    def __init__(self, device: jax.Device):
        self.device = device

    def _put(self, x: np.ndarray) -> jax.Array:
        return jax.device_put(x, self.device)

    def prepare(self, panel: np.ndarray) -> jax.Array:
        b = panel.shape[0]
        return self._put(panel).reshape(b, -1, b).transpose(1, 0, 2)  # the row's tiles

    def product(self, prepared: jax.Array, k0: int, k1: int, tiles: np.ndarray) -> np.ndarray:
        return np.asarray(_tile_sum(prepared[k0:k1], self._put(tiles)))

    def matmul(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return np.asarray(_matmul(self._put(left), self._put(right)))


# ------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Term:
    """``alpha op(a) op(b)`` in a product."""

    a: Tiled
    b: Tiled
    alpha: float = 1.0
    trans_a: bool = False
    trans_b: bool = False


@dataclass(frozen=True)
class ProductJob:
    """Row ``row`` of output tiles of ``term + beta * add + gamma * I``.

    ``out=None`` computes only the sums; ``lower`` computes tiles ``j <= row`` and
    mirrors them (a symmetric result; ``out`` may be ``add``). ``add`` may be larger or
    smaller than the output (see :meth:`_added`). ``diffsq`` is the
    squared distance to ``add``. Holds one row panel of ``op(A)`` and one column panel
    of ``op(B)``; output tiles are written as they are made.
    """

    term: Term
    out: Tiled | None
    row: int
    lower: bool = False
    add: Tiled | None = None
    beta: float = 0.0
    gamma: float = 0.0

    def _added(self, i: int, j: int, rows: int, cols: int) -> np.ndarray:
        """Tile ``(i, j)`` of ``add`` within the output's ``rows x cols`` (zero outside).

        ``add`` may be larger (its leading block is used) or smaller (zero-extended).
        """
        b = self.add.tile
        if i >= self.add.grid[0] or j >= self.add.grid[1]:
            return np.zeros((b, b), self.add.dtype)
        tile = self.add.read_tiles([(i, j)])[0]
        tile[max(0, rows - i * b) :] = 0
        tile[:, max(0, cols - j * b) :] = 0
        return tile

    def run(self, kernels: Kernels) -> Reductions:
        t, i = self.term, self.row
        rows = t.a.cols if t.trans_a else t.a.rows
        cols = t.b.rows if t.trans_b else t.b.cols
        b = t.a.tile
        ks = t.a.op_nonzero(i, t.trans_a, row=True)
        prepared = kernels.prepare(t.a.op_row(i, ks, t.trans_a))
        sums: Reductions = {"sumsq": 0.0, "trace": 0.0, "diffsq": 0.0}
        for j in range(i + 1) if self.lower else range(math.ceil(cols / b)):
            kb = t.b.op_nonzero(j, t.trans_b, row=False)
            k0, k1 = max(ks.start, kb.start), min(ks.stop, kb.stop)
            acc = np.zeros((b, b), t.a.dtype)
            if k1 > k0:
                panel = t.b.op_col(j, range(k0, k1), t.trans_b)
                acc = t.alpha * kernels.product(prepared, k0 - ks.start, k1 - ks.start, panel)
            if self.lower and j == i:  # exactly symmetric, as the mirrored tiles
                acc = (acc + acc.T) / 2
            weight = 2.0 if self.lower and j < i else 1.0
            if self.add is not None:
                added = self._added(i, j, rows, cols)
                acc += self.beta * added
                sums["diffsq"] += weight * float(np.sum((acc - added) ** 2))
            if self.gamma and i == j:
                acc += self.gamma * _identity_part(np.zeros_like(acc), i, j, rows, cols)
            _add(sums, _sums(acc, j == i, weight))
            if self.out is not None:
                mirror = ([(j, i)], [acc.T]) if weight == 2.0 else ([], [])
                self.out.write_tiles([(i, j), *mirror[0]], [acc, *mirror[1]])
        return sums


@dataclass(frozen=True)
class Factor:
    """A lower triangular ``L`` and the inverses of its diagonal tiles (``1 x g`` tiles).

    With ``L_jj^{-1}`` at hand each step of a blocked solve is a gemm (``x L_jj^{-T}`` is
    ``x @ inverse.T``); the diagonal tiles of the factors the eigh solves with are
    well conditioned (``Z = I + c X^T X`` with ``c <= 100``, or the second CholeskyQR pass).
    """

    lower: Tiled
    inverses: Tiled


@dataclass(frozen=True)
class SolveJob:
    """Row ``row`` of ``alpha X L_1^{-T} L_2^{-1} ... + beta X`` (``x=None``: ``X = I``).

    ``factors`` lists ``(Factor, transpose)``: ``X <- X L^{-T}`` if ``transpose`` else
    ``X <- X L^{-1}``, in order. ``diffsq`` is the squared distance to ``X``. Holds
    the row panel being solved and one row (or column) panel of ``L``. ``symmetric``:
    the result is symmetric and the last solve a backward one (``X L^{-T} L^{-1}`` for a
    symmetric ``X`` commuting with ``L L^T``): it stops at column block ``row``, so only
    tiles ``(row, j >= row)`` are made (a third of that solve's flops) and mirrored.
    """

    x: Tiled | None
    factors: tuple[tuple[Factor, bool], ...]
    out: Tiled
    row: int
    alpha: float = 1.0
    beta: float = 0.0
    symmetric: bool = False

    def _x(self, j: int) -> np.ndarray:
        """Tile ``(row, j)`` of ``X``."""
        if self.x is not None:
            return self.x.read_tiles([(self.row, j)])[0]
        b, out = self.out.tile, self.out
        return _identity_part(np.zeros((b, b), out.dtype), self.row, j, out.rows, b * j + b)

    def run(self, kernels: Kernels) -> Reductions:
        out, b, i = self.out, self.out.tile, self.row
        g = out.grid[1]
        if self.x is None:
            y = np.zeros((b, g * b), out.dtype)
            y[:, i * b : (i + 1) * b] = self._x(i)
            lead = i
        else:
            y = self.x.op_row(i, range(g), False)
            lead = i if self.x.triangle == "upper" else 0
        first = i if self.symmetric else 0  # the first column block the result needs
        for factor, transpose in self.factors:
            lower = factor.lower
            for j in range(lead, g) if transpose else range(g - 1, first - 1, -1):
                acc = y[:, j * b : (j + 1) * b]
                if transpose and j > lead:  # y_j - sum_{lead<=k<j} y_k L_jk^T
                    row = lower.op_row(j, range(lead, j), False)
                    acc = acc - kernels.matmul(y[:, lead * b : j * b], row.T)
                elif not transpose and j < g - 1:  # y_j - sum_{k>j} y_k L_kj
                    col = lower.op_col(j, range(j + 1, g), False).reshape(-1, b)
                    acc = acc - kernels.matmul(y[:, (j + 1) * b :], col)
                inverse = factor.inverses.read_tiles([(0, j)])[0]
                y[:, j * b : (j + 1) * b] = kernels.matmul(acc, inverse.T if transpose else inverse)
            lead = lead if transpose else 0
        sums: Reductions = {"sumsq": 0.0, "trace": 0.0, "diffsq": 0.0}
        for j in range(first, g):  # written a tile at a time
            x = self._x(j)
            t = self.alpha * y[:, j * b : (j + 1) * b] + self.beta * x
            if self.symmetric and j == i:
                t = (t + t.T) / 2
            weight = 2.0 if self.symmetric and j > i else 1.0
            _add(sums, _sums(t, j == i, weight))
            sums["diffsq"] += weight * float(np.sum((t - x) ** 2))
            mirror = ([(j, i)], [t.T]) if weight == 2.0 else ([], [])
            out.write_tiles([(i, j), *mirror[0]], [t, *mirror[1]])
        return sums


@dataclass(frozen=True)
class CombineJob:
    """Row ``row`` of ``alpha A + gamma I`` (``out=None``: only its sums)."""

    a: Tiled
    out: Tiled | None
    row: int
    alpha: float = 1.0
    gamma: float = 0.0

    def run(self, kernels: Kernels) -> Reductions:
        g = self.a.grid[1]
        tiles = self.alpha * self.a.read_tiles([(self.row, j) for j in range(g)])
        if self.gamma and self.row < g:
            tiles[self.row] += self.gamma * _identity_part(
                tiles[self.row] * 0, self.row, self.row, self.a.rows, self.a.cols
            )
        if self.out is not None:
            self.out.write_tiles([(self.row, j) for j in range(g)], list(tiles))
        sums = _sums(tiles[self.row], True) if self.row < g else {"trace": 0.0}
        sums["sumsq"] = float(np.sum(tiles * tiles))
        return sums


@dataclass(frozen=True)
class RandomJob:
    """Row ``row`` of a standard normal matrix; tile ``(i, j)`` drawn from ``(seed, i, j)``."""

    out: Tiled
    row: int
    seed: int

    def run(self, kernels: Kernels) -> Reductions:
        out, b = self.out, self.out.tile
        g = out.grid[1]
        tiles = []
        for j in range(g):
            t = np.random.default_rng((self.seed, self.row, j)).standard_normal((b, b))
            t[max(0, out.rows - self.row * b) :] = 0  # keep the padding zero
            t[:, max(0, out.cols - j * b) :] = 0
            tiles.append(t.astype(out.dtype))
        out.write_tiles([(self.row, j) for j in range(g)], tiles)
        return {"sumsq": float(sum(np.sum(t * t) for t in tiles))}


Job = ProductJob | SolveJob | CombineJob | RandomJob


def run_job(job: Job) -> Reductions:
    """Run one job with the host kernels (what a Ray task does)."""
    return job.run(HostKernels())


# ---------------------------------------------------------------------- runners
class TileRunner(Protocol):
    """Runs independent jobs and returns the sum of their reductions."""

    def run(self, jobs: Sequence[Job]) -> Reductions: ...


@dataclass
class LocalRunner:
    """Jobs in this process: host kernels, or JAX kernels on ``devices`` (job k on k % D)."""

    devices: Sequence[jax.Device] | None = None
    jobs_run: int = 0

    def run(self, jobs: Sequence[Job]) -> Reductions:
        total: Reductions = {}
        for k, job in enumerate(jobs):
            if self.devices:
                kernels: Kernels = DeviceKernels(self.devices[k % len(self.devices)])
            else:
                kernels = HostKernels()
            _add(total, job.run(kernels))
        self.jobs_run += len(jobs)
        return total


def _ray_job(job: Job) -> tuple[Reductions, str]:
    import ray

    return run_job(job), ray.get_runtime_context().get_node_id()


@dataclass
class RayRunner:
    """Jobs as Ray tasks (host kernels) spread over the nodes of the connected cluster.

    Every node must see the scratch folder (one machine, or a shared file system).
    ``nodes`` collects the ids of the nodes that ran jobs.
    """

    nodes: set[str] = field(default_factory=set)
    jobs_run: int = 0

    def run(self, jobs: Sequence[Job]) -> Reductions:
        from ntk_dist.executors.ray import import_ray

        ray = import_ray()
        task = ray.remote(num_cpus=1)(_ray_job).options(scheduling_strategy="SPREAD")
        total: Reductions = {}
        for sums, node in ray.get([task.remote(job) for job in jobs]):
            _add(total, sums)
            self.nodes.add(node)
        self.jobs_run += len(jobs)
        return total


# --------------------------------------------------------------------- cholesky
class _TiledFactor:
    """The ``TileStore`` interface :func:`tiled_cholesky` writes its factor to."""

    def __init__(self, lower: Tiled):
        self.lower = lower

    def done(self) -> set[str]:
        return set()

    def write(self, key: str, index: tuple[slice, ...], data: np.ndarray) -> None:
        self.lower.write_region(index[0], index[1], data)

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        return self.lower.read_region(index[0], index[1])


def cholesky(z: Tiled, out: Tiled, inverses: Tiled, shift: float = 0.0) -> Factor:
    """Lower Cholesky factor of ``z + shift I`` into ``out`` (tiled, in this process).

    ``out`` and ``inverses`` (``b x g b``) are existing files; only the lower tiles of
    ``out`` are written (the others are never read). The padding of the last diagonal
    tile is set to the identity, so that every diagonal tile of the result is invertible;
    their inverses go to ``inverses`` (by LAPACK's trtri, from the same library as the
    factorisation).
    """
    n = z.rows

    def read(rows: slice, cols: slice) -> np.ndarray:
        region = z.read_region(rows, cols)
        if shift:
            r0, c0 = rows.indices(n)[0], cols.indices(n)[0]
            d = np.arange(max(r0, c0), min(r0 + region.shape[0], c0 + region.shape[1]))
            region[d - r0, d - c0] += shift
        return region

    lower = out.with_triangle("lower")
    # panels of one block column: half the working set the tile size was chosen for
    bound = chol.PANELS * n * np.dtype(z.dtype).itemsize * z.tile // 2
    chol.tiled_cholesky(read, n, _TiledFactor(lower), z.tile, memory_bound=bound)
    g, b = lower.grid[0] - 1, lower.tile
    last = lower.read_tiles([(g, g)])[0]
    pad = np.arange(n - g * b, b)
    last[pad, pad] = 1
    lower.write_tiles([(g, g)], [last])
    (trtri,) = scipy.linalg.get_lapack_funcs(("trtri",), (last,))
    diagonal = lower.read_tiles([(j, j) for j in range(g + 1)])
    inverses.write_tiles([(0, j) for j in range(g + 1)], [trtri(t, lower=1)[0] for t in diagonal])
    return Factor(lower, inverses)
