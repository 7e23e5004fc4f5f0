"""Exact eigenvalues of a tiled symmetric matrix out of core, by reduction to band form.

Panel by panel (``BANDWIDTH`` columns), the Householder
QR of the panel below the band gives a block reflector ``Q = I - V T V^T`` and the
trailing matrix becomes ``Q^T A Q = A - W2 V^T - V W2^T`` with ``W = A V T`` and
``W2 = W - V (T^T V^T W) / 2`` (``4/3 N^3`` flops in all). One pass over the trailing
lower tiles a panel, each tile read and written once: it applies the last panel's update
and forms the next panel's ``W`` (that panel's columns are brought up to date from the
``n x b`` arrays before the pass, so its reflector is known), with eight ``n x b`` arrays
and a tile in memory.
The band matrix (``(b + 1) x N`` numbers) then goes to LAPACK (``eig_banded``), whose
eigenvalues are those of ``A`` to rounding (orthogonal similarity, backward stable).
``KernelOperator.eigvalsh`` of a stored kernel too large for memory uses it.

The spectral divide and conquer of :mod:`ntk_dist.linalg.qdwh` uses them to split each
block where the spectrum has its widest gap near the middle, with QDWH's exact lower
bound: no second split from a misjudged count, no steps from a guessed bound.
"""

from __future__ import annotations

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
PANEL_COPIES = 8  # n x b arrays: the last [W2 V] and [V W2], then V, V T, W, the next columns
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


Reflector = tuple[int, np.ndarray, np.ndarray]  # (first row c1, V, T): Q = I - V T V^T


def _band_of_panel(
    ab: np.ndarray, cols: np.ndarray, c0: int, c1: int, keep: Callable[[Reflector], None] | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Store columns ``[c0, c1)`` (``cols``: their rows from ``c0``, up to date) in ``ab``
    as band form; return ``V, T`` of the reflector of their rows below ``c1`` (none if at
    most one row is left: already within the band)."""
    w = c1 - c0
    for d in range(w):
        ab[d, c0 : c1 - d] = np.diagonal(cols[:w], -d)
    panel = cols[w:]
    if len(panel) == 1:
        ab[w - np.arange(w), np.arange(c0, c1)] = panel[0]
    if len(panel) <= 1:
        return None
    v, t, r = panel_reflector(panel)
    if keep is not None:
        keep((c1, v, t))
    for p in range(r.shape[0]):  # R[p, q] is A[c1 + p, c0 + q], q >= p
        ab[w + p - np.arange(p, w), np.arange(c0 + p, c1)] = r[p, p:]
    return v, t


def _pass(
    work: tl.Tiled,
    source: tl.Tiled,
    first: int,
    update: tuple[int, np.ndarray, np.ndarray] | None,
    product: tuple[int, np.ndarray] | None,
    columns: tuple[int, int],
) -> tuple[np.ndarray | None, np.ndarray]:
    """One pass over the lower tiles of ``source`` from tile row and column ``first``: apply
    ``update`` (``(u, L, R)``: ``A -= L R^T`` on rows and columns from ``u``) and write each
    tile to ``work``; with the updated tile, accumulate ``W = A (V T)`` for ``product``
    (``(p, V T)``, rows from ``p``) and copy out rows ``[e0, n)`` of ``columns = [e0, e1)``
    (entries in upper tiles stay zero: only the lower triangle of the diagonal block is
    used). Products touch only the part of a tile at or after the rows they act on."""
    n, tile = work.rows, work.tile
    e0, e1 = columns
    out = np.zeros((n - e0, e1 - e0), work.dtype)
    w = None if product is None else np.zeros_like(product[1])
    buffer = np.empty((1, tile, tile), work.dtype)
    for i in range(first, work.grid[0]):
        r0, r1 = i * tile, min(n, (i + 1) * tile)
        for j in range(first, i + 1):
            c0, c1 = j * tile, min(n, (j + 1) * tile)
            a = source.read_tiles([(i, j)], buffer)[0]
            if update is not None:
                u, left, right = update
                r, c = max(r0, u), max(c0, u)
                a[r - r0 : r1 - r0, c - c0 : c1 - c0] -= (
                    left[r - u : r1 - u] @ right[c - u : c1 - u].T
                )
                work.write_tiles([(i, j)], [a])
            if product is not None and c1 > product[0]:  # V is zero before its first row
                p, vt = product
                r, c = max(r0, p), max(c0, p)
                block = a[r - r0 : r1 - r0, c - c0 : c1 - c0]
                w[r - p : r1 - p] += block @ vt[c - p : c1 - p]
                if i != j:
                    w[c - p : c1 - p] += block.T @ vt[r - p : r1 - p]
            r, c, stop = max(r0, e0), max(c0, e0), min(c1, e1)
            if c < stop and r < r1:
                out[r - e0 : r1 - e0, c - e0 : stop - e0] = a[r - r0 : r1 - r0, c - c0 : stop - c0]
    return w, out


def reduce_to_band(
    matrix: tl.Tiled,
    bandwidth: int,
    keep: Callable[[Reflector], None] | None = None,
    work: tl.Tiled | None = None,
) -> np.ndarray:
    """The band form ``Q^T A Q`` of the symmetric tiled ``matrix`` (only its lower and
    diagonal tiles are read) in LAPACK's lower band storage (``(bandwidth + 1) x N``),
    reduced in ``work`` (a file of the same shape, overwritten: no copy of ``matrix``
    first) or in place. ``keep`` receives each panel's reflector, in order:
    ``Q = Q_0 Q_1 ...``.

    Each pass over the tiles applies one panel's update and, with the same tiles, forms
    the next panel's ``W``: the next panel's columns are brought up to date first from
    the ``n x b`` arrays alone (they were copied out in the pass before), so their
    reflector is known before the pass. One read and one write of each trailing tile a
    panel (not two reads, a write and a read of the panel's tile column)."""
    n, tile = matrix.rows, matrix.tile
    work, source = work or matrix, matrix  # tiles are read from matrix until written to work
    ab = np.zeros((bandwidth + 1, n), matrix.dtype)
    c0, c1 = 0, min(n, bandwidth)  # equal widths: each R lies in the next panel
    cols = matrix.read_region(slice(0, n), slice(0, c1))
    update = None  # the last panel's (c1, L, R): applied to ``cols``, not yet to the tiles
    while c1 < n:
        reflector = _band_of_panel(ab, cols, c0, c1, keep)
        del cols  # the pass makes the next panel's
        c2 = min(n, c1 + bandwidth)
        first = (update[0] if update is not None else c1) // tile
        product = None if reflector is None else (c1, reflector[0] @ reflector[1])
        w, cols = _pass(work, source, first, update, product, (c1, c2))
        source = work if update is not None else source
        update = product = None  # freed before the next panel's arrays are made
        if reflector is not None:  # rows from c1
            v, t = reflector
            w -= v @ (t.T @ (v.T @ w)) / 2
            left, right = np.hstack([w, v]), np.hstack([v, w])  # W2 V^T + V W2^T: one gemm
            del reflector, v, w
            cols -= left @ right[: c2 - c1].T
            update = (c1, left, right)
        c0, c1 = c1, c2
    _band_of_panel(ab, cols, c0, c1, keep)
    return ab


def band_eigenvalues(
    matrix: tl.Tiled, work: tl.Tiled | None = None, bandwidth: int = BANDWIDTH
) -> np.ndarray:
    """Eigenvalues (ascending) of the symmetric tiled ``matrix`` (only its lower and
    diagonal tiles are read), reduced to band form in place, or in ``work`` (created,
    then deleted) if given."""
    try:
        ab = reduce_to_band(matrix, bandwidth, work=None if work is None else work.create())
    finally:
        if work is not None:
            work.release()
    return scipy.linalg.eig_banded(ab, lower=True, eigvals_only=True, check_finite=False)
