"""Tiled dense matrices on scratch disk and the few tiled operations the out-of-core eigh needs.

A :class:`Tiled` matrix is a ``numpy.memmap`` in a scratch folder cut into ``b x b``
tiles; operations read a handful of tiles at a time, run them as jitted kernels on the
local devices (output tiles round-robin, so JAX runs them concurrently) and write the
result tiles back. The working set is a few tiles per device, whatever the matrix size.
The Cholesky factorisations reuse :func:`ntk_dist.linalg.cholesky.tiled_cholesky`.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist.linalg import cholesky as chol

__all__ = ["Scratch", "Tiled"]


@jax.jit
def _gemm(a: jax.Array, b: jax.Array) -> jax.Array:
    return a @ b


@jax.jit
def _trsm_lt(ljj: jax.Array, acc: jax.Array) -> jax.Array:  # acc L^{-T}
    return jax.scipy.linalg.solve_triangular(ljj, acc.T, lower=True).T


@jax.jit
def _trsm_l(ljj: jax.Array, acc: jax.Array) -> jax.Array:  # acc L^{-1}
    return jax.scipy.linalg.solve_triangular(ljj, acc.T, lower=True, trans="T").T


class _MemmapFactor:
    """The ``FactorStore`` interface :func:`tiled_cholesky` writes to, over a scratch memmap."""

    def __init__(self, array: np.ndarray):
        self.array, self._done = array, set()

    def done(self) -> set[str]:
        return set(self._done)

    def write(self, key: str, index: tuple[slice, ...], data: np.ndarray) -> None:
        self.array[index] = data
        self._done.add(key)

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        return np.array(self.array[index])


class Scratch:
    """A temporary folder of tiled matrices sharing one tile size, dtype and device list."""

    def __init__(
        self,
        tile: int,
        dtype: np.dtype,
        devices: Sequence[jax.Device] | None = None,
        directory: str | None = None,
    ):
        self.tile, self.dtype = tile, np.dtype(dtype)
        self.devices = list(devices or jax.local_devices())
        self._dir = tempfile.TemporaryDirectory(prefix="ntk_dist_eigh_", dir=directory)
        self._count = 0

    def close(self) -> None:
        """Delete every scratch matrix."""
        self._dir.cleanup()

    def new(self, rows: int, cols: int) -> Tiled:
        """A zero-filled ``rows x cols`` matrix on scratch disk."""
        self._count += 1
        path = os.path.join(self._dir.name, f"m{self._count}.bin")
        data = np.memmap(path, self.dtype, "w+", shape=(max(rows, 1), max(cols, 1)))
        return Tiled(self, data[:rows, :cols], path)

    def from_reader(self, read: Callable[[slice, slice], np.ndarray], n: int) -> Tiled:
        """Copy an ``n x n`` matrix given by ``read(rows, cols)`` onto scratch, tile by tile."""
        out = self.new(n, n)
        for rs in out.spans(0):
            for cs in out.spans(1):
                out.data[rs, cs] = read(rs, cs)
        return out

    def identity(self, n: int) -> Tiled:
        out = self.new(n, n)
        out.data[np.diag_indices(n)] = 1
        return out

    def device(self, k: int) -> jax.Device:
        return self.devices[k % len(self.devices)]


class Tiled:
    """A dense matrix on scratch disk, read and written one tile at a time."""

    def __init__(self, scratch: Scratch, data: np.ndarray, path: str):
        self.scratch, self.data, self.path = scratch, data, path

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape

    def spans(self, axis: int) -> list[slice]:
        n, b = self.shape[axis], self.scratch.tile
        return [slice(s, min(n, s + b)) for s in range(0, n, b)]

    def tile(self, rows: slice, cols: slice, transpose: bool = False) -> np.ndarray:
        return np.array(self.data[cols, rows].T if transpose else self.data[rows, cols])

    def release(self) -> None:
        """Delete this matrix's file now (the scratch folder would at the end)."""
        self.data = None
        if os.path.exists(self.path):
            os.remove(self.path)

    # ------------------------------------------------------------ tilewise
    def map_tiles(self, fn: Callable[[np.ndarray, slice, slice], np.ndarray]) -> None:
        """In place: ``tile <- fn(tile, rows, cols)`` for every tile."""
        for rs in self.spans(0):
            for cs in self.spans(1):
                self.data[rs, cs] = fn(self.tile(rs, cs), rs, cs)

    def reduce_tiles(self, fn: Callable[[np.ndarray, slice, slice], float]) -> float:
        return float(
            sum(fn(self.tile(rs, cs), rs, cs) for rs in self.spans(0) for cs in self.spans(1))
        )

    def norm(self) -> float:
        """Frobenius norm."""
        return math.sqrt(self.reduce_tiles(lambda t, r, c: float(np.sum(t * t))))

    def trace(self) -> float:
        return self.reduce_tiles(lambda t, r, c: float(np.trace(t)) if r == c else 0.0)

    def diagonal(self) -> np.ndarray:
        return np.concatenate([np.diagonal(self.tile(s, s)) for s in self.spans(0)])

    def max_abs_row_sum(self) -> float:
        """The infinity norm."""
        sums = np.zeros(self.shape[0])
        for rs in self.spans(0):
            for cs in self.spans(1):
                sums[rs] += np.abs(self.tile(rs, cs)).sum(axis=1)
        return float(sums.max(initial=0.0))

    def combine(self, other: Tiled, alpha: float, beta: float, out: Tiled | None = None) -> Tiled:
        """``alpha * self + beta * other`` (into ``out``, default a new matrix)."""
        out = out or self.scratch.new(*self.shape)
        for rs in self.spans(0):
            for cs in self.spans(1):
                out.data[rs, cs] = alpha * self.tile(rs, cs) + beta * other.tile(rs, cs)
        return out

    def symmetrize(self) -> None:
        """In place ``(X + X^T) / 2`` of a square matrix."""
        spans = self.spans(0)
        for i, rs in enumerate(spans):
            for cs in spans[: i + 1]:
                t = (self.tile(rs, cs) + self.tile(cs, rs).T) / 2
                self.data[rs, cs], self.data[cs, rs] = t, t.T


def matmul(
    a: Tiled,
    b: Tiled,
    *,
    trans_a: bool = False,
    trans_b: bool = False,
    out: Tiled | None = None,
    out_cols: int = 0,
) -> Tiled:
    """``op(a) @ op(b)``, written into ``out`` from column ``out_cols`` (or a new matrix).

    Each output tile is one product of a row panel of ``op(a)`` and a column panel of
    ``op(b)`` (``b x inner`` entries each, within the tiled Cholesky's panel budget).
    """
    sc = a.scratch
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    out = out or sc.new(m, n)
    t = sc.tile
    jobs = [
        (slice(r, min(m, r + t)), slice(c, min(n, c + t)))
        for r in range(0, m, t)
        for c in range(0, n, t)
    ]
    everything = slice(None)
    for start in range(0, len(jobs), len(sc.devices)):
        batch = jobs[start : start + len(sc.devices)]
        results = []
        for k, (rs, cs) in enumerate(batch):
            dev = sc.device(k)
            at = a.tile(everything, rs).T if trans_a else a.tile(rs, everything)
            bt = b.tile(cs, everything).T if trans_b else b.tile(everything, cs)
            results.append(_gemm(jax.device_put(at, dev), jax.device_put(bt, dev)))
        for (rs, cs), res in zip(batch, results, strict=True):
            out.data[rs, out_cols + cs.start : out_cols + cs.stop] = np.asarray(res)
    return out


def cholesky(z: Tiled) -> Tiled:
    """Lower Cholesky factor of a symmetric positive definite tiled matrix (tiled algorithm)."""
    n = z.shape[0]
    lower = z.scratch.new(n, n)
    chol.tiled_cholesky(
        lambda r, c: z.tile(r, c), n, _MemmapFactor(lower.data), z.scratch.tile, z.scratch.devices
    )
    return lower


def solve_right(x: Tiled, lower: Tiled, transpose: bool) -> None:
    """In place ``X <- X L^{-T}`` (``transpose``) or ``X <- X L^{-1}``, one block row at a time.

    A block row of ``X`` and one block row (or column) of ``L`` are held; unsolved
    columns of the block row's solution are zero, so each tile is one fixed-shape gemm.
    """
    sc = x.scratch
    spans = lower.spans(0)
    order = list(range(len(spans))) if transpose else list(reversed(range(len(spans))))
    everything = slice(None)
    for k_row, rs in enumerate(x.spans(0)):
        dev = sc.device(k_row)
        row = jax.device_put(x.tile(rs, everything), dev)
        solved = jnp.zeros_like(row)
        for j in order:
            # transpose: X_ij - sum_k<j Y_ik L_jk^T; else: X_ij - sum_k>j Z_ik L_kj
            panel = (
                lower.tile(spans[j], everything)
                if transpose
                else lower.tile(everything, spans[j]).T
            )
            ljj = lower.tile(spans[j], spans[j])
            solved = _solve_tile(
                row,
                solved,
                jax.device_put(panel, dev),
                jax.device_put(ljj, dev),
                np.int32(spans[j].start),
                transpose,
            )
        x.data[rs] = np.asarray(solved)


@functools.partial(jax.jit, static_argnums=(5,))
def _solve_tile(
    row: jax.Array, solved: jax.Array, panel: jax.Array, ljj: jax.Array, start: int, transpose: bool
) -> jax.Array:
    width = ljj.shape[0]
    acc = jax.lax.dynamic_slice_in_dim(row, start, width, axis=1) - solved @ panel.T
    tile = _trsm_lt(ljj, acc) if transpose else _trsm_l(ljj, acc)
    return jax.lax.dynamic_update_slice_in_dim(solved, tile, start, axis=1)
