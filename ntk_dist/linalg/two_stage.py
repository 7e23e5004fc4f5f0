"""Out-of-core eigh on the host by two-stage tridiagonalisation: ~5 N^3 flops, as LAPACK.

1. Reduction to band form out of core (:func:`~ntk_dist.linalg.band.reduce_to_band`,
   ``4/3 N^3`` flops as tile gemms); each panel's reflector ``(V, T)`` goes to disk.
2. Band to tridiagonal by bulge chasing (:mod:`ntk_dist.linalg.chase`, compiled); its
   reflectors go to disk in compact WY blocks, a group of sweeps at a time.
3. The tridiagonal matrix's eigenvalues and eigenvectors by MRRR (:mod:`ntk_dist.linalg.
   mrrr`): a chunk of columns at a time, as many as the memory bound holds, each chunk
   ending at a wide relative gap; the vectors either side of each chunk's end are checked
   for orthogonality (MRRR makes a chunk's own vectors orthogonal, clusters included).
4. Each chunk ``Z`` becomes ``Q1 Q2 Z`` (stage two's blocks, ``~4 N^2`` flops a column,
   then stage one's, ``2 N^2``) and goes to the caller's :class:`VectorSink`.

Memory: a panel of the band reduction, the band in strips (``5 N b`` numbers) and one
chunk of columns with what works on it (one group of stage two's reflectors and one
pair of stage one's panels, the reflectors' temporaries or a tile of its write:
:func:`chunk_width`). Disk: the reflectors (about one matrix).
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Protocol

import numpy as np
import scipy.linalg

from ntk_dist.linalg import chase, mrrr
from ntk_dist.linalg import tiled as tl
from ntk_dist.linalg.band import reduce_to_band

__all__ = [
    "TridiagonalVectorsError",
    "VectorSink",
    "chunk_bounds",
    "chunk_width",
    "two_stage_eigh",
]

_SLAB = 512  # rows of a chunk updated at once by a panel's reflector
_CHECKED = 16  # vectors on each side of a chunk boundary checked for orthogonality


class TridiagonalVectorsError(ArithmeticError):
    """The tridiagonal matrix's eigenvectors could not be made chunk by chunk (MRRR failed,
    or two chunks' vectors are not orthogonal across their boundary, as inside a cluster
    wider than a chunk); ``eigenvalues`` (ascending, exact) are the matrix's, for another
    method."""

    def __init__(self, message: str, eigenvalues: np.ndarray):
        super().__init__(message)
        self.eigenvalues = eigenvalues


class VectorSink(Protocol):
    """Where :func:`two_stage_eigh` puts the eigenvectors, a chunk of columns at a time;
    chunks end at multiples of ``alignment`` (read after :meth:`start`) where the gaps
    allow it."""

    alignment: int

    def start(self, values: np.ndarray) -> None:
        """The eigenvalues in the columns' order (larre's: refined later), before any chunk."""

    def write(self, first: int, vectors: np.ndarray) -> None:
        """Columns ``first .. first + m - 1`` (``vectors``: ``n x m``, column-major)."""


def chunk_bounds(
    relative_gaps: np.ndarray, width: int, align: int = 1, safe: float = math.inf
) -> list[int]:
    """Chunk boundaries ``0 = j_0 < j_1 < ... = n`` of ``n`` eigenvalues separated by
    ``relative_gaps`` (``n - 1``), at most ``width`` apart, each in the last half of its
    reach: the farthest multiple of ``align`` there with a gap of at least ``safe`` before
    it (chunks that fill whole chunks of the output), else at the widest gap (the farthest
    within half of the widest), so that the vectors of separate chunks stay orthogonal."""
    n, bounds = len(relative_gaps) + 1, [0]
    while n - bounds[-1] > width:
        lo = bounds[-1] + max(1, width // 2)
        gaps = relative_gaps[lo - 1 : bounds[-1] + width]  # gap before boundary lo + i
        wide = np.flatnonzero(((lo + np.arange(len(gaps))) % align == 0) & (gaps >= safe))
        if not len(wide):
            wide = np.flatnonzero(gaps >= gaps.max() / 2)
        bounds.append(lo + int(wide[-1]))
    return bounds + [n]


def two_stage_eigh(
    matrix: tl.Tiled,
    folder: str,
    bandwidth: int,
    memory_bound: int,
    sink: VectorSink,
    work: tl.Tiled | None = None,
) -> np.ndarray:
    """Eigenvectors of the symmetric tiled ``matrix``, chunk by chunk to ``sink``, and
    the eigenvalues in the same column order. ``matrix`` is reduced in ``work`` (a file of
    its shape, overwritten) if given, else in place; ``folder`` (created, then removed)
    holds the reflectors.

    Raises :class:`TridiagonalVectorsError` if MRRR fails or two chunks' vectors are not
    orthogonal (the caller then decomposes the matrix another way).
    """
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    try:
        reflectors = _Reflectors(folder)
        ab = reduce_to_band(matrix, bandwidth, reflectors.keep_panel, work)
        d, e, groups = chase.tridiagonalize(ab)
        for group in groups:
            reflectors.keep_group(group)
        reflectors.pair_panels()
        try:
            tri = mrrr.Tridiagonal(d, e)
        except mrrr.MRRRError as error:
            w = scipy.linalg.eigvalsh_tridiagonal(d, e, check_finite=False)
            raise TridiagonalVectorsError(str(error), w) from error
        sink.start(tri.values)
        return _chunks(tri, reflectors, bandwidth, memory_bound, matrix.tile, sink)
    finally:
        shutil.rmtree(folder)


class _Reflectors:
    """Both stages' reflectors in ``folder`` as raw files (read once per chunk): stage
    one's panels ``(first row, V, T)`` (then in pairs), stage two's groups ``(first sweep,
    V, V T)``. Pairs and groups are read into buffers kept from one read to the next (the
    first of each kind is about the largest): fresh arrays for every read cost page faults."""

    def __init__(self, folder: str):
        self.folder = folder
        self.items: dict[str, list[tuple]] = {"panel": [], "pair": [], "group": []}
        self.buffers: dict[tuple[str, str], np.ndarray] = {}
        self.dtype = np.dtype(np.float64)

    def _path(self, kind: str, i: int, what: str) -> str:
        return os.path.join(self.folder, f"{kind}-{i}.{what}")

    def _keep(self, kind: str, first: int, v: np.ndarray, other: np.ndarray) -> None:
        i, self.dtype = len(self.items[kind]), v.dtype
        v.tofile(self._path(kind, i, "v"))
        other.tofile(self._path(kind, i, "other"))
        self.items[kind].append((first, v.shape, other.shape))

    def _read(self, kind: str, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        first, *shapes = self.items[kind][i]
        arrays = []
        for what, shape in zip(("v", "other"), shapes, strict=True):
            if kind == "panel":  # (two at a time, once)
                out = np.empty(shape, self.dtype)
            else:
                key, size = (kind, what), math.prod(shape)
                if key not in self.buffers or self.buffers[key].size < size:
                    self.buffers[key] = np.empty(size, self.dtype)
                out = self.buffers[key][:size].reshape(shape)
            with open(self._path(kind, i, what), "rb", buffering=0) as f:
                if f.readinto(out) != out.nbytes:
                    raise OSError(f"short read from {f.name}")
            arrays.append(out)
        return first, *arrays

    def keep_panel(self, reflector: tuple[int, np.ndarray, np.ndarray]) -> None:
        self._keep("panel", *reflector)

    def pair_panels(self) -> None:
        """Stage one's panels two by two as one reflector ``I - V T V^T`` each (``T_12 =
        -T_1 V_1^T V_2 T_2``): half as many passes over a chunk, products twice as deep
        (0.22 -> 0.20 s at N = 2048)."""
        panels = len(self.items["panel"])
        for p in range(0, panels, 2):
            first, v, t = self._read("panel", p)
            if p + 1 < panels:
                second, v2, t2 = self._read("panel", p + 1)
                v = np.concatenate([v, np.zeros((len(v), v2.shape[1]), v.dtype)], axis=1)
                v[second - first :, t.shape[0] :] = v2
                cross = -t @ (v[second - first :, : t.shape[0]].T @ v2) @ t2
                t = np.block([[t, cross], [np.zeros_like(cross.T), t2]])
            self._keep("pair", first, v, t)
        for p in range(panels):
            for what in ("v", "other"):
                os.remove(self._path("panel", p, what))
        self.items["panel"] = []

    def keep_group(self, group: chase.ChaseGroup) -> None:
        self._keep("group", group.first, group.v, group.vt)

    def apply(self, z: np.ndarray, n: int) -> np.ndarray:
        """``Q1 Q2 z`` in place; ``z`` is column-major with zero rows below the first ``n``
        (the chase's blocks reach past the matrix); returns its first ``n`` rows."""
        groups = len(self.items["group"])
        chase.apply_groups(z, lambda g: chase.ChaseGroup(*self._read("group", g)), groups)
        z = z[:n]
        for p in reversed(range(len(self.items["pair"]))):  # Q1 = Q_0 Q_1 ...: last first
            first, v, t = self._read("pair", p)
            rows = z[first:].T  # as z^T <- z^T Q_p^T: the products keep z's layout
            w = (rows @ v) @ t.T
            for r in range(0, n - first, _SLAB):  # no temporary as large as the chunk
                rows[:, r : r + _SLAB] -= w @ v[r : r + _SLAB].T
        return z


def chunk_width(n: int, b: int, tile: int, itemsize: int, memory_bound: int) -> int:
    """Columns of eigenvectors made at once under ``memory_bound``: the chunk (``n + 3b``
    rows; two more columns for MRRR's workspace; the columns either side of the last
    chunk's end kept for the orthogonality check) beside one group of stage two's blocks
    (``V`` and ``V T``, ``(2b - 1) x b`` a depth) and one pair of stage one's panels
    (``n x 2b``), and the larger of what works on it: a padded tile of the write, or a block's
    temporaries with stage one's slab product (``3b + _SLAB`` rows)."""
    fixed = 4 * (n // b + 2) * b * b + 2 * n * b + 2 * _CHECKED * n + 2 * (n + 3 * b)
    free = memory_bound // itemsize - fixed
    return max(1, min((free - tile * tile) // (n + 3 * b), free // (n + 3 * b + 3 * b + _SLAB)))


def _chunks(
    tri: mrrr.Tridiagonal,
    reflectors: _Reflectors,
    b: int,
    memory_bound: int,
    tile: int,
    sink: VectorSink,
) -> np.ndarray:
    """Eigenvectors a chunk of columns at a time, each chunk's checked against the last's;
    the eigenvalues in the same order."""
    n = tri.n
    width = chunk_width(n, b, tile, tri.dtype.itemsize, memory_bound)
    bounds = chunk_bounds(tri.relative_gaps, width, sink.alignment, tri.safe_gap)
    limit = 1e3 * math.sqrt(n) * float(np.finfo(tri.dtype).eps)
    widest = max(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True))
    # column-major, for MRRR to write into; one buffer for every chunk (fresh pages cost
    # faults); its rows below n stay zero
    buffer = np.zeros((n + 3 * b, widest + 2), tri.dtype, order="F")  # + MRRR's workspace
    values, tail = [], None
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        z = buffer[:, 1 : hi - lo + 1]
        try:
            values.append(tri.vectors(lo, hi, buffer[:, : hi - lo + 2]))
        except mrrr.MRRRError as error:
            raise TridiagonalVectorsError(str(error), np.sort(tri.values)) from error
        head = z[:n, :_CHECKED]
        if tail is not None and np.abs(tail.T @ head).max() > limit:
            raise TridiagonalVectorsError(
                f"eigenvectors {lo - tail.shape[1]}..{lo + head.shape[1] - 1} of two chunks "
                "are not orthogonal",
                np.sort(tri.values),
            )
        tail = z[:n, -_CHECKED:].copy()
        sink.write(lo, reflectors.apply(z, n))
    return np.concatenate(values)
