"""Out-of-core eigh on the host by two-stage tridiagonalisation: ~5 N^3 flops, as LAPACK.

1. Reduction to band form out of core (:func:`~ntk_dist.linalg.band.reduce_to_band`,
   ``4/3 N^3`` flops as tile gemms); each panel's reflector ``(V, T)`` goes to disk.
2. Band to tridiagonal by bulge chasing (:mod:`ntk_dist.linalg.chase`, compiled); its
   reflectors go to disk in compact WY blocks, a group of sweeps at a time.
3. The tridiagonal matrix's eigenvalues (dqds), then its eigenvectors by inverse iteration
   (LAPACK's stein) a chunk of columns at a time, as many as the memory bound holds, in
   calls that end at every gap wider than ``SAFE_GAP`` times the spectral radius and
   inside longer clusters after at most ``STEIN_COLUMNS``, where the spectrum has its
   widest relative gap; the vectors either side of each call's end are checked for
   orthogonality (those of separate calls are not orthogonalised against each other,
   which matters inside a tight cluster).
4. Each chunk ``Z`` becomes ``Q1 Q2 Z`` (stage two's blocks, ``~4 N^2`` flops a column,
   then stage one's, ``2 N^2``) and is written as one part of the eigenvectors.

Memory: a panel of the band reduction, the band in strips (``5 N b`` numbers) and one
chunk of columns with what works on it (one group of stage two's reflectors and one
panel of stage one's, stein's output of one call, the reflectors' temporaries, a tile of
its write: :func:`chunk_width`). Disk: a copy of the matrix, the reflectors (about one
matrix) and the parts.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable

import numpy as np
import scipy.linalg

from ntk_dist.linalg import chase
from ntk_dist.linalg import tiled as tl
from ntk_dist.linalg.band import reduce_to_band

__all__ = [
    "ChunksNotOrthogonalError",
    "chunk_bounds",
    "chunk_width",
    "stein_calls",
    "two_stage_eigh",
]

STEIN_COLUMNS = 64  # eigenvectors per call of stein, which orthogonalises each against
# the others of its cluster in the call (O(columns^2 n)): short calls, each ending at a gap
SAFE_GAP = 1e-4  # inverse iteration's vectors either side of a gap this wide (relative to
# the spectral radius) are orthogonal to ~eps / SAFE_GAP without orthogonalising them:
# a call ends there (stein would orthogonalise across gaps up to 1e-3 of its norm)
_SLAB = 512  # rows of a chunk updated at once by a panel's reflector
_CHECKED = 16  # vectors on each side of a chunk boundary checked for orthogonality


class ChunksNotOrthogonalError(ArithmeticError):
    """Eigenvectors from two calls are not orthogonal across their boundary;
    ``eigenvalues`` (ascending, exact) are those of the matrix, for another method."""

    def __init__(self, message: str, eigenvalues: np.ndarray):
        super().__init__(message)
        self.eigenvalues = eigenvalues


def chunk_bounds(w: np.ndarray, width: int) -> list[int]:
    """Chunk boundaries ``0 = j_0 < j_1 < ... = n`` of the ascending eigenvalues ``w``,
    at most ``width`` apart: each ends at the widest relative gap in the last half of
    its reach (the farthest gap within half of the widest), so that the vectors of
    separate chunks stay orthogonal."""
    n, bounds = len(w), [0]
    scale = np.maximum(np.abs(w[1:]), np.abs(w[:-1]))
    relative_gap = (w[1:] - w[:-1]) / np.where(scale > 0, scale, 1.0)
    while n - bounds[-1] > width:
        lo = bounds[-1] + max(1, width // 2)
        gaps = relative_gap[lo - 1 : bounds[-1] + width]  # gap before boundary lo + i
        wide = np.flatnonzero(gaps >= gaps.max() / 2)
        bounds.append(lo + int(wide[-1]))
    return bounds + [n]


def stein_calls(w: np.ndarray, width: int) -> list[int]:
    """Boundaries of the calls of stein for the ascending eigenvalues ``w``: at every gap
    wider than ``SAFE_GAP`` times the spectral radius (none if it is 0), and by
    :func:`chunk_bounds` inside runs longer than ``width`` without one."""
    n = len(w)
    scale = float(np.abs(w).max()) if n else 0.0
    safe = [0, *(np.flatnonzero(np.diff(w) > SAFE_GAP * scale) + 1).tolist(), n]
    bounds = [0]
    for lo, hi in zip(safe[:-1], safe[1:], strict=True):
        bounds += [lo + j for j in chunk_bounds(w[lo:hi], width)[1:]]
    return bounds


def _tridiagonal_vectors(d: np.ndarray, e: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Eigenvectors (``n x len(w)``) of the tridiagonal matrix for its eigenvalues ``w``
    by inverse iteration (LAPACK's stein: vectors in a cluster are orthogonalised; MRRR
    through scipy allocates ``n x n`` for any subset)."""
    stein = scipy.linalg.get_lapack_funcs("stein", (d,))
    n = len(d)
    block, split = np.zeros(n, np.int32), np.zeros(n, np.int32)
    block[: len(w)], split[0] = 1, n  # one block: the whole matrix
    z, info = stein(d, e, w, block, split)
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK stein: {info} eigenvectors failed to converge")
    return z


def two_stage_eigh(
    work: tl.Tiled,
    folder: str,
    bandwidth: int,
    memory_bound: int,
    part: Callable[[int, int], tl.Tiled],
) -> tuple[list[tl.Tiled], np.ndarray]:
    """Eigenvectors of the symmetric tiled matrix ``work`` (reduced in place: pass a
    copy) as parts ``part(j, columns)`` (``n x columns`` each), and the eigenvalues in
    the parts' column order. ``folder`` (created, then removed) holds the reflectors.

    Raises :class:`ChunksNotOrthogonalError` if two chunks' vectors are not orthogonal
    (the caller then decomposes the matrix another way).
    """
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    try:
        reflectors = _Reflectors(folder)
        ab = reduce_to_band(work, bandwidth, reflectors.keep_panel)
        d, e, groups = chase.tridiagonalize(ab)
        for group in groups:
            reflectors.keep_group(group)
        w = scipy.linalg.eigvalsh_tridiagonal(d, e, check_finite=False)
        return _parts(d, e, w, reflectors, bandwidth, memory_bound, work.tile, part), w
    finally:
        shutil.rmtree(folder)


class _Reflectors:
    """Both stages' reflectors in ``folder`` as plain ``.npy`` files (read once per chunk):
    stage one's panels ``(first row, V, V T)``, stage two's groups ``(first sweep, V, V T)``."""

    def __init__(self, folder: str):
        self.folder = folder
        self.firsts: dict[str, list[int]] = {"panel": [], "group": []}

    def _path(self, kind: str, i: int, what: str) -> str:
        return os.path.join(self.folder, f"{kind}-{i}.{what}.npy")

    def _keep(self, kind: str, first: int, v: np.ndarray, vt: np.ndarray) -> None:
        i = len(self.firsts[kind])
        np.save(self._path(kind, i, "v"), v)
        np.save(self._path(kind, i, "vt"), vt)
        self.firsts[kind].append(first)

    def _read(self, kind: str, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        first = self.firsts[kind][i]
        return first, np.load(self._path(kind, i, "v")), np.load(self._path(kind, i, "vt"))

    def keep_panel(self, reflector: tuple[int, np.ndarray, np.ndarray]) -> None:
        first, v, t = reflector
        self._keep("panel", first, v, v @ t)  # once, not once a chunk

    def keep_group(self, group: chase.ChaseGroup) -> None:
        self._keep("group", group.first, group.v, group.vt)

    def apply(self, z: np.ndarray, n: int) -> np.ndarray:
        """``Q1 Q2 z`` in place; ``z`` has zero rows below the first ``n`` (the chase's
        blocks reach past the matrix); returns its first ``n`` rows."""
        groups = len(self.firsts["group"])
        chase.apply_groups(z, lambda g: chase.ChaseGroup(*self._read("group", g)), groups)
        z = z[:n]
        for p in reversed(range(len(self.firsts["panel"]))):  # Q1 = Q_0 Q_1 ...: last first
            first, v, vt = self._read("panel", p)
            w = v.T @ z[first:]
            for r in range(0, n - first, _SLAB):  # no temporary as large as the chunk
                z[first + r : first + r + _SLAB] -= vt[r : r + _SLAB] @ w
        return z


def chunk_width(n: int, b: int, tile: int, itemsize: int, memory_bound: int) -> int:
    """Columns of eigenvectors made at once under ``memory_bound``: the chunk (``n + 3b``
    rows) beside one group of stage two's blocks (``V`` and ``V T``, ``(2b - 1) x b`` a
    depth) and one panel of stage one's (``n x b`` twice), and the largest of what works
    on it: stein's output of one call with the columns staged before the chunk, a padded
    tile of the write, and a block's temporaries with stage one's slab product
    (``3b + _SLAB`` rows)."""
    fixed = 4 * (n // b + 2) * b * b + 2 * n * b
    room = max(n * (2 * min(n, STEIN_COLUMNS) + _CHECKED), tile * tile)
    free = memory_bound // itemsize - fixed
    return max(1, min((free - room) // (n + 3 * b), free // (n + 3 * b + 3 * b + _SLAB)))


def _parts(
    d: np.ndarray,
    e: np.ndarray,
    w: np.ndarray,
    reflectors: _Reflectors,
    b: int,
    memory_bound: int,
    tile: int,
    part: Callable[[int, int], tl.Tiled],
) -> list[tl.Tiled]:
    """Eigenvectors a chunk of columns at a time, each call's checked against the last's."""
    n = len(d)
    width = chunk_width(n, b, tile, d.dtype.itemsize, memory_bound)
    calls = stein_calls(w, int(min(n, width, STEIN_COLUMNS)))
    limit = 1e3 * math.sqrt(n) * float(np.finfo(d.dtype).eps)
    parts, tail = [], np.zeros((n, 0), d.dtype)
    chunks = _chunks(calls, width)
    # one buffer for every chunk (fresh pages cost faults); its rows below n stay zero
    buffer = np.zeros((n + 3 * b, max(hi - lo for lo, hi in chunks)), d.dtype)
    for j, (lo, hi) in enumerate(chunks):
        # stein's columns gathered column-major, then copied into the chunk a block at a
        # time (a column at a time wrote one number per cache line of the chunk)
        z, staged = buffer[:, : hi - lo], lo  # columns from `staged` are in `stage`
        stage = np.empty((n, min(n, width, STEIN_COLUMNS)), d.dtype, order="F")
        for c0, c1 in zip(calls[:-1], calls[1:], strict=True):
            if not lo <= c0 < hi:
                continue
            if c1 - staged > stage.shape[1]:
                z[:n, staged - lo : c0 - lo], staged = stage[:, : c0 - staged], c0
            vectors = _tridiagonal_vectors(d, e, w[c0:c1])
            stage[:, c0 - staged : c1 - staged] = vectors
            head = vectors[:, :_CHECKED]
            if tail.size and np.abs(tail.T @ head).max() > limit:
                raise ChunksNotOrthogonalError(
                    f"eigenvectors {c0 - tail.shape[1]}..{c0 + head.shape[1]} of two calls "
                    "of stein are not orthogonal",
                    w,
                )
            tail = vectors[:, -_CHECKED:].copy()
        z[:n, staged - lo :] = stage[:, : hi - staged]
        del stage, vectors
        out = part(j, hi - lo)
        out.write_region(slice(None), slice(None), reflectors.apply(z, n))
        parts.append(out)
    return parts


def _chunks(calls: list[int], width: int) -> list[tuple[int, int]]:
    """Consecutive calls grouped into chunks of at most ``width`` columns (or one call)."""
    chunks, lo = [], 0
    for end, after in zip(calls[1:], [*calls[2:], None], strict=True):
        if after is None or after - lo > width:
            chunks.append((lo, end))
            lo = end
    return chunks
