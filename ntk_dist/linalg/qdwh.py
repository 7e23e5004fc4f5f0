"""Out-of-core symmetric eigendecomposition: spectral divide and conquer with tiled QDWH.

For a symmetric ``A`` too large for the in-core eigh (Nakatsukasa & Higham 2013):

1. pick a split point ``σ`` in a wide, balanced gap of the spectrum of a sampled
   principal block (Cauchy interlacing bounds the split), then other candidates;
2. polar factor ``U`` of ``A - σI`` by QDWH on ``X0 = (A - σI) / sqrt(|A|_1 |A|_inf)``
   with dynamic weights from the lower bound ``l0 = eps``: while ``c > 100`` the
   QR-based step, its QR done by CholeskyQR2 of ``[sqrt(c) X; I]`` (stable for
   ``cond <= eps^-1/2``), then the Cholesky-based step ``X <- (b/c) X + (a - b/c) X Z^{-1}``
   with ``Z = I + c X^T X``; stop when ``|X_k - X_{k-1}|_F <= (5 eps)^(1/3)``;
3. ``P = (U + I) / 2`` projects onto the eigenspace above ``σ``, of rank ``k = round(tr P)``;
   orthonormal bases of ``range(P)`` and ``range(I - P)`` come from two steps of subspace
   iteration from random starts, each orthonormalised by shifted CholeskyQR then CholeskyQR2;
4. the split is accepted only if the bases are orthogonal to each other and the coupling
   ``Q_2^T A Q_1`` is below ``tol |A|_F`` (else the next ``σ``): degenerate or clustered
   spectra cannot produce a wrong result, only another try;
5. recurse on ``Q_i^T A Q_i`` until a block fits in core (``jnp.linalg.eigh``) and
   assemble eigenvectors ``[Q_2 V_2, Q_1 V_1]`` by tiled products.

Every matrix is a :class:`~ntk_dist.linalg.tiled.Tiled` on scratch disk; tiles follow the
tiled Cholesky's size for the memory bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist.linalg import tiled as tl
from ntk_dist.linalg.operator import NotPositiveDefiniteError

__all__ = ["SplitFailedError", "divide_and_conquer_eigh", "polar_factor"]

IN_CORE_COPIES = 4  # as in ntk_dist.linalg.eigh: K, a symmetrised copy, V, workspace
_QR_CUTOFF = 100.0
_MAX_ITERATIONS = 30
_SPLIT_TRIES = 6


class SplitFailedError(RuntimeError):
    """No split point gave an accurate spectral split of a block."""


def _coefficients(lo: float) -> tuple[float, float, float, float]:
    """QDWH weights ``a, b, c`` for lower bound ``l`` and the next lower bound."""
    l2 = lo * lo
    dd = (4 * (1 - l2) / (l2 * l2)) ** (1 / 3)
    sqd = math.sqrt(1 + dd)
    a = sqd + math.sqrt(max(8 - 4 * dd + 8 * (2 - l2) / (l2 * sqd), 0.0)) / 2
    b = (a - 1) ** 2 / 4
    c = a + b - 1
    return a, b, c, min(1.0, lo * (a + b * l2) / (1 + c * l2))


def _qr_step(x: tl.Tiled, a: float, b: float, c: float) -> tl.Tiled:
    """QR-based QDWH step with the QR of ``[sqrt(c) X; I]`` by CholeskyQR2."""
    sc, n = x.scratch, x.shape[0]
    z = tl.matmul(x, x, trans_a=True)
    z.map_tiles(lambda t, r, cs: c * t + (np.eye(t.shape[0]) if r == cs else 0))
    l1 = tl.cholesky(z)
    q1 = x.combine(x, math.sqrt(c), 0.0)  # sqrt(c) X L1^{-T}
    tl.solve_right(q1, l1, transpose=True)
    q2 = sc.identity(n)  # L1^{-T}
    tl.solve_right(q2, l1, transpose=True)
    g = tl.matmul(q1, q1, trans_a=True)
    g.combine(tl.matmul(q2, q2, trans_a=True), 1.0, 1.0, out=g)
    l2 = tl.cholesky(g)
    tl.solve_right(q1, l2, transpose=True)
    tl.solve_right(q2, l2, transpose=True)
    out = tl.matmul(q1, q2, trans_b=True)
    out.combine(x, (a - b / c) / math.sqrt(c), b / c, out=out)
    for m in (z, l1, q1, q2, g, l2):
        m.release()
    return out


def _cholesky_step(x: tl.Tiled, a: float, b: float, c: float) -> tl.Tiled:
    """Cholesky-based QDWH step ``(b/c) X + (a - b/c) X (I + c X^T X)^{-1}``."""
    z = tl.matmul(x, x, trans_a=True)
    z.map_tiles(lambda t, r, cs: c * t + (np.eye(t.shape[0]) if r == cs else 0))
    lower = tl.cholesky(z)
    y = x.combine(x, 1.0, 0.0)
    tl.solve_right(y, lower, transpose=True)
    tl.solve_right(y, lower, transpose=False)
    y.combine(x, a - b / c, b / c, out=y)
    z.release()
    lower.release()
    return y


def polar_factor(x: tl.Tiled) -> tuple[tl.Tiled, int]:
    """Unitary polar factor of a symmetric tiled matrix by QDWH; returns it and the step count."""
    eps = float(np.finfo(x.scratch.dtype).eps)
    scale = x.max_abs_row_sum()  # |X|_1 = |X|_inf for symmetric X, >= |X|_2
    u = x.combine(x, 1.0 / scale if scale else 1.0, 0.0)
    lo, tol = eps, (5 * eps) ** (1 / 3)
    for step in range(1, _MAX_ITERATIONS + 1):
        a, b, c, l_next = _coefficients(lo) if lo < 1 - 10 * eps else (3.0, 1.0, 3.0, 1.0)
        new = _qr_step(u, a, b, c) if c > _QR_CUTOFF else _cholesky_step(u, a, b, c)
        new.symmetrize()
        change = new.combine(u, 1.0, -1.0)
        delta = change.norm()
        change.release()
        u.release()
        u, lo = new, l_next
        if lo >= 1 - 10 * eps and delta <= tol:
            return u, step
    raise SplitFailedError(f"QDWH did not converge in {_MAX_ITERATIONS} steps")


def _orthonormal(y: tl.Tiled, passes: tuple[bool, ...]) -> tl.Tiled:
    """Orthonormal basis of ``range(y)`` by CholeskyQR passes (True: shifted, for rank safety)."""
    m, k = y.shape
    eps = float(np.finfo(y.scratch.dtype).eps)
    q = y.combine(y, 1.0, 0.0)
    for shifted in passes:
        g = tl.matmul(q, q, trans_a=True)
        if shifted:
            shift = 11 * (m * k + k * (k + 1)) * eps * g.trace()
            g.map_tiles(lambda t, r, c, s=shift: t + (s * np.eye(t.shape[0]) if r == c else 0))
        lower = tl.cholesky(g)
        tl.solve_right(q, lower, transpose=True)
        g.release()
        lower.release()
    return q


def _range_basis(p: tl.Tiled, k: int, seed: int) -> tl.Tiled:
    """Orthonormal ``n x k`` basis of the range of the rank-``k`` projector ``p``.

    Two subspace-iteration steps: ``P Ω`` (as ill-conditioned as a k x k Gaussian) by
    shifted CholeskyQR then CholeskyQR; ``P Q`` (well conditioned) by one CholeskyQR.
    """
    sc, n = p.scratch, p.shape[0]
    rng = np.random.default_rng(seed)
    start = sc.new(n, k)
    start.map_tiles(lambda t, r, c: rng.standard_normal(t.shape))
    q = start
    for passes in ((True, False), (False,)):
        y = tl.matmul(p, q)
        q.release()
        q = _orthonormal(y, passes)
        y.release()
    return q


def _in_core(a: tl.Tiled, memory_bound: int) -> bool:
    n = a.shape[0]
    return IN_CORE_COPIES * n * n * a.scratch.dtype.itemsize <= memory_bound


def _split_points(a: tl.Tiled, memory_bound: int) -> list[float]:
    """Candidate split points, best first, from the spectrum of a sampled principal block.

    By Cauchy interlacing, a point between the ``j``-th and ``j+1``-th eigenvalues ``μ`` of
    an ``m x m`` principal submatrix leaves at least ``j`` and at most ``j + n - m``
    eigenvalues of ``A`` below it. Gaps are ranked by relative width times
    ``min(j, m - j)``: balanced splits away from clusters first; then diagonal statistics.
    """
    n = a.shape[0]
    m = math.isqrt(memory_bound // (IN_CORE_COPIES * a.scratch.dtype.itemsize))
    index = np.unique(np.linspace(0, n - 1, min(n, max(m, 2))).round().astype(int))
    mu = np.linalg.eigvalsh(np.array(a.data[np.ix_(index, index)]))
    size = np.maximum(np.maximum(np.abs(mu[:-1]), np.abs(mu[1:])), np.finfo(mu.dtype).tiny)
    j = np.arange(1, len(mu))
    score = np.diff(mu) / size * np.minimum(j, len(mu) - j)
    points = [float(mu[i] + mu[i + 1]) / 2 for i in np.argsort(-score)[:3]]
    diag = a.diagonal()
    points += [float(np.median(diag)), float(np.mean(diag))]
    points += [float(np.quantile(diag, 0.3)) + 1e-3 * float(diag.max() - diag.min())]
    return points[:_SPLIT_TRIES]


def _try_split(
    a: tl.Tiled, sigma: float, seed: int, tol: float, scale: float
) -> tuple[tl.Tiled, tl.Tiled] | None:
    """Bases ``(Q_below, Q_above)`` of the eigenspaces below/above ``sigma``, or None."""
    n = a.shape[0]
    shifted = a.combine(a, 1.0, 0.0)
    shifted.map_tiles(lambda t, r, c: t - (sigma * np.eye(t.shape[0]) if r == c else 0))
    try:
        u, _ = polar_factor(shifted)
    except (SplitFailedError, NotPositiveDefiniteError):
        return None
    finally:
        shifted.release()
    k = round((u.trace() + n) / 2)
    if k in (0, n):
        u.release()
        return None
    above = u.combine(u, 0.5, 0.0)
    above.map_tiles(lambda t, r, c: t + (0.5 * np.eye(t.shape[0]) if r == c else 0))
    below = u.combine(above, 0.0, -1.0)
    below.map_tiles(lambda t, r, c: t + (np.eye(t.shape[0]) if r == c else 0))
    u.release()
    try:
        q_above = _range_basis(above, k, seed)
        q_below = _range_basis(below, n - k, seed + 1)
    except NotPositiveDefiniteError:  # rank-deficient start: the projector was not clean
        return None
    finally:
        above.release()
        below.release()
    cross = tl.matmul(q_below, q_above, trans_a=True)
    aq = tl.matmul(a, q_above)
    coupling = tl.matmul(q_below, aq, trans_a=True)
    good = cross.norm() <= tol * math.sqrt(n) and coupling.norm() <= tol * scale
    for m in (cross, aq, coupling):
        m.release()
    if not good:
        q_above.release()
        q_below.release()
        return None
    return q_below, q_above


def _eigh(
    a: tl.Tiled, memory_bound: int, depth: int, tol: float, scale: float
) -> tuple[np.ndarray, tl.Tiled]:
    """Eigenvalues and eigenvectors (tiled) of a symmetric tiled matrix.

    ``scale`` is the Frobenius norm of the top-level matrix: errors below ``tol * scale``
    (a block that close to a multiple of ``I``, a coupling that small) are accepted.
    """
    sc, n = a.scratch, a.shape[0]
    if _in_core(a, memory_bound):
        w, v = jnp.linalg.eigh(jnp.asarray(np.array(a.data)))
        out = sc.new(n, n)
        out.data[:] = np.asarray(v)
        return np.asarray(w), out
    off = a.combine(a, 1.0, 0.0)
    mean = a.trace() / n
    off.map_tiles(lambda t, r, c: t - (mean * np.eye(t.shape[0]) if r == c else 0))
    if off.norm() <= tol * scale:  # a multiple of I
        off.release()
        return np.full(n, mean), sc.identity(n)
    off.release()
    for attempt, sigma in enumerate(_split_points(a, memory_bound)):
        seed = 2 * (depth * _SPLIT_TRIES + attempt)
        split = _try_split(a, sigma, seed, tol, scale)
        if split is not None:
            break
    else:
        raise SplitFailedError(
            f"no accurate spectral split of a {n} x {n} block after {_SPLIT_TRIES} split points; "
            "raise memory_bound so that it fits the in-core eigh"
        )
    values, vectors = [], sc.new(n, n)
    col = 0
    for q in split:
        sub = tl.matmul(q, tl.matmul(a, q), trans_a=True)
        sub.symmetrize()
        w, v = _eigh(sub, memory_bound, depth + 1, tol, scale)
        sub.release()
        tl.matmul(q, v, out=vectors, out_cols=col)
        col += q.shape[1]
        values.append(w)
        q.release()
        v.release()
    return np.concatenate(values), vectors


def divide_and_conquer_eigh(
    read: Callable[[slice, slice], np.ndarray],
    n: int,
    dtype: np.dtype,
    tile: int,
    memory_bound: int,
    devices: Sequence[jax.Device] | None = None,
    write_rows: Callable[[slice, np.ndarray], None] | None = None,
    values_out: Callable[[np.ndarray], None] | None = None,
    tol: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Eigendecomposition of the symmetric ``n x n`` matrix given by ``read(rows, cols)``.

    Eigenvalues ascend. Eigenvectors go block row by block row (``tile`` rows) to
    ``write_rows(rows, panel)`` if given, else they are returned as an array.
    """
    sc = tl.Scratch(tile, dtype, devices)
    tol = tol if tol is not None else 1e3 * float(np.finfo(dtype).eps)
    try:
        a = sc.from_reader(read, n)
        a.symmetrize()
        w, v = _eigh(a, memory_bound, 0, tol, max(a.norm(), np.finfo(dtype).tiny))
        order = np.argsort(w, kind="stable")
        if values_out is not None:
            values_out(w[order])
        if write_rows is None:
            return w[order], np.array(v.data)[:, order]
        for rs in v.spans(0):
            write_rows(rs, np.array(v.data[rs])[:, order])
        return w[order], None
    finally:
        sc.close()
