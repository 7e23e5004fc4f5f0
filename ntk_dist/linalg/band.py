"""Exact eigenvalues of a tiled symmetric matrix out of core, by reduction to band form.

Panel by panel (``BANDWIDTH`` columns), the Householder
QR of the panel below the band gives a block reflector ``Q = I - V T V^T`` and the
trailing matrix becomes ``Q^T A Q = A - W2 V^T - V W2^T`` with ``W = A V T`` and
``W2 = W - V (T^T V^T W) / 2``: one pass over the trailing lower tiles for ``W``, one to
update them (``4/3 N^3`` flops in all, with two ``n x b`` arrays and a tile in memory).
The band matrix (``(b + 1) x N`` numbers) then goes to LAPACK (``eig_banded``), whose
eigenvalues are those of ``A`` to rounding (orthogonal similarity, backward stable).
``KernelOperator.eigvalsh`` of a stored kernel too large for memory uses it.

The spectral divide and conquer of :mod:`ntk_dist.linalg.qdwh` uses them to split each
block where the spectrum has its widest gap near the middle, with QDWH's exact lower
bound: no second split from a misjudged count, no steps from a guessed bound.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import numpy as np
import scipy.linalg

from ntk_dist.linalg import tiled as tl

__all__ = [
    "BANDWIDTH",
    "band_eigenvalues",
    "bandwidth_for",
    "compact_wy",
    "panel_reflector",
    "reduce_to_band",
]

BANDWIDTH = 64  # wide enough for gemms, narrow enough for LAPACK's band eigensolver
PANEL_COPIES = 7  # n x b arrays a panel holds: V, V T, W, then [W2 V] and [V W2]
TILE_COPIES = 3  # a tile, its product's temporary, the diagonal block


def bandwidth_for(n: int, tile: int, itemsize: int, memory_bound: int) -> int:
    """``BANDWIDTH``, or less so that a panel's arrays and tiles fit ``memory_bound``."""
    room = memory_bound - TILE_COPIES * tile * tile * itemsize
    return max(1, min(BANDWIDTH, room // (PANEL_COPIES * n * itemsize)))


def compact_wy(v: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """``T`` with ``H_1 H_2 ... H_s = I - V T V^T`` for reflectors ``H_i = I - tau_i v_i v_i^T``
    (the columns of ``V``): upper triangular, as LAPACK's larft forms it. Batched over
    leading axes (``v`` of shape ``(..., m, s)``, ``tau`` of shape ``(..., s)``)."""
    s = v.shape[-1]
    gram = np.swapaxes(v, -1, -2) @ v
    t = np.zeros((*v.shape[:-2], s, s), v.dtype)
    for i in range(s):
        t[..., i, i] = tau[..., i]
        product = (t[..., :i, :i] @ gram[..., :i, i, None])[..., 0]
        t[..., :i, i] = -tau[..., i, None] * product
    return t


def panel_reflector(panel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``V``, ``T`` and ``R`` of the Householder QR ``panel = Q R``, ``Q = I - V T V^T``.

    ``V`` (``m x k``, ``k = min(panel.shape)``) is unit lower trapezoidal, ``T`` upper
    triangular (LAPACK's larft), ``R`` the ``k x w`` upper trapezoidal factor.
    """
    h, tau = np.linalg.qr(panel, mode="raw")  # LAPACK's geqrf output, transposed
    k = min(panel.shape)
    v = np.tril(h.T[:, :k], -1)
    v[np.arange(k), np.arange(k)] = 1
    return v, compact_wy(v, tau[:k]), np.triu(h.T[:k])


def _tile_span(i: int, tile: int, start: int, n: int) -> slice:
    """Rows of tile ``i`` (within the matrix), offset by ``start``."""
    return slice(i * tile - start, min(n, (i + 1) * tile) - start)


Reflector = tuple[int, np.ndarray, np.ndarray]  # (first row c1, V, T): Q = I - V T V^T


def _reduce_panel(
    work: tl.Tiled, ab: np.ndarray, c0: int, c1: int, keep: Callable[[Reflector], None] | None
) -> None:
    """Reduce columns ``[c0, c1)`` to band form: store them in ``ab``, update the trailing
    lower tiles of ``work`` (rows and columns from ``c1``) in place, pass the panel's
    reflector to ``keep``. Only lower and diagonal tiles are read (the upper ones go
    stale)."""
    n, tile = work.rows, work.tile
    diag = work.read_region(slice(c0, c1), slice(c0, c1))
    for d in range(c1 - c0):
        ab[d, c0 : c1 - d] = np.diagonal(diag, -d)
    if n - c1 == 0:
        return
    panel = work.read_region(slice(c1, n), slice(c0, c1))
    w = c1 - c0
    if n - c1 == 1:  # one row below: already within the band
        ab[w - np.arange(w), np.arange(c0, c1)] = panel[0]
        return
    v, t, r = panel_reflector(panel)
    if keep is not None:
        keep((c1, v, t))
    for p in range(r.shape[0]):  # R[p, q] is A[c1 + p, c0 + q], q >= p
        ab[w + p - np.arange(p, w), np.arange(c0 + p, c1)] = r[p, p:]
    start = c1 // tile * tile  # the tiles from here hold the trailing matrix
    vp = np.zeros((n - start, v.shape[1]), v.dtype)  # zero above c1: those rows stay
    vp[c1 - start :] = v
    vt = vp @ t
    wp = np.zeros_like(vp)
    first, last = c1 // tile, work.grid[0]
    for i in range(first, last):
        ri = _tile_span(i, tile, start, n)
        for j in range(first, i + 1):
            rj = _tile_span(j, tile, start, n)
            a = work.read_tiles([(i, j)])[0][: ri.stop - ri.start, : rj.stop - rj.start]
            wp[ri] += a @ vt[rj]
            if i != j:
                wp[rj] += a.T @ vt[ri]
    wp[: c1 - start] = 0
    wp -= vp @ (t.T @ (vp.T @ wp)) / 2
    left, right = np.hstack([wp, vp]), np.hstack([vp, wp])  # W2 V^T + V W2^T: one gemm
    del vp, vt, wp
    for i in range(first, last):
        ri = _tile_span(i, tile, start, n)
        for j in range(first, i + 1):
            rj = _tile_span(j, tile, start, n)
            a = work.read_tiles([(i, j)])[0]
            a[: ri.stop - ri.start, : rj.stop - rj.start] -= left[ri] @ right[rj].T
            work.write_tiles([(i, j)], [a])


def reduce_to_band(
    matrix: tl.Tiled, bandwidth: int, keep: Callable[[Reflector], None] | None = None
) -> np.ndarray:
    """The band form ``Q^T A Q`` of the symmetric tiled ``matrix`` (reduced in place; only
    its lower and diagonal tiles are read) in LAPACK's lower band storage
    (``(bandwidth + 1) x N``). ``keep`` receives each panel's reflector, in order:
    ``Q = Q_0 Q_1 ...``."""
    ab = np.zeros((bandwidth + 1, matrix.rows), matrix.dtype)
    for c0 in range(0, matrix.rows, bandwidth):  # equal widths: each R lies in the next panel
        _reduce_panel(matrix, ab, c0, min(matrix.rows, c0 + bandwidth), keep)
    return ab


def band_eigenvalues(
    matrix: tl.Tiled, work: tl.Tiled | None = None, bandwidth: int = BANDWIDTH
) -> np.ndarray:
    """Eigenvalues (ascending) of the symmetric tiled ``matrix`` (only its lower and
    diagonal tiles are read), reduced to band form in place, or in ``work`` (a file copy,
    deleted at the end) if given."""
    if work is not None:
        shutil.copyfile(matrix.path, work.path)
    try:
        ab = reduce_to_band(work or matrix, bandwidth)
    finally:
        if work is not None:
            work.release()
    return scipy.linalg.eig_banded(ab, lower=True, eigvals_only=True, check_finite=False)
