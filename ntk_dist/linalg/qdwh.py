"""Out-of-core symmetric eigendecomposition: spectral divide and conquer with tiled QDWH.

For a symmetric ``A`` too large for the in-core eigh (Nakatsukasa & Higham 2013):

1. if a few eigenvalues at one end of the spectrum of a sampled principal block (or of
   the block's exact spectrum, once known) lie far from the rest, their invariant
   subspace comes from subspace iteration (a few passes over ``A``) and the split from
   one block reflector (step 3), with no QDWH at all (where two-stage blocks are
   allowed, only if the rest of the sampled spectrum is flat: what remains is then a
   multiple of the identity);
2. otherwise, with host tile kernels and this process as the runner, the block is
   decomposed by two-stage tridiagonalisation (:mod:`ntk_dist.linalg.two_stage`, ~5 N^3
   flops as LAPACK's; recorded as the split method ``"two-stage"``) unless its
   eigenvectors come out in chunks that are not orthogonal (a cluster wider than a
   chunk): then, and on devices or Ray, the polar factor ``U`` of ``A - σI`` by QDWH on
   ``X0 = (A - σI) / α``. With
   host tile kernels, the block's exact eigenvalues (:mod:`ntk_dist.linalg.band`, 4/3 N^3
   flops; the children's are slices of them) give the cheapest split point
   (:func:`_exact_tries`: both sides leaves if possible, in the widest such gap), the
   exact ``α = |A - σI|_2`` and the exact lower bound ``l0`` of the singular values of
   ``X0``. On devices (where QDWH's flops are cheap next to a host band reduction) the
   split points come from the sample's gaps (Cauchy interlacing bounds the split), ``α``
   from the ends of the spectrum (Lanczos, 20 passes over ``A``) and ``l0`` is an
   estimate from the sampled gap if it is at least ``1e-4``, then a hundredth of the
   eigenvalue spacing near ``σ`` that the sample suggests (at most ``1e-5``). An exact
   or estimated ``l0`` first runs the fast QDWH (stopping when ``l_k`` reaches 1 and
   ``|X|_F^2 = n``; if the split then fails its check, the safe try follows); the safe
   one runs on until a step changes ``X`` by at most ``(5 eps)^(1/3)`` (a smaller
   singular value only takes more steps). While ``c``
   exceeds a cutoff the QR-based step, its QR done by CholeskyQR2 of ``[sqrt(c) X; I]``
   (stable for ``cond <= eps^-1/2``), then the Cholesky-based step
   ``X <- (b/c) X + (a - b/c) X Z^{-1}`` with ``Z = I + c X^T X`` (half the flops; X stays
   symmetric, so is the result). The cutoff is 100 (where the Cholesky-based step is
   stable) in the safe try, and ``1e5`` from an estimate: its error grows like ``c eps``
   only for singular values near ``c^-1/2``, which a wide gap does not have, and the
   split's check catches it when one does (then the safe try follows). The scaling,
   combination and norms are fused into the products and solves;
3. ``P = (U + I) / 2`` projects onto the eigenspace above ``σ``, of rank ``k = round(tr P)``;
   if the smaller side's ``n x s`` arrays fit the bound, one block reflector
   ``Q = I - V T V^T`` from the Householder QR of ``P Ω`` (or ``(I - P) Ω``) gives both
   sub-blocks of ``Q^T A Q`` in two passes over ``A`` (:func:`_reflector_split`);
   otherwise orthonormal bases of ``range(P)`` and ``range(I - P)`` come from ``P Ω`` and
   ``(I - P) Ω'`` (Gaussian ``Ω``, ``Ω'``) by CholeskyQR2 (shifted CholeskyQR3 if that
   breaks down), with one more subspace-iteration step only if the check below fails;
4. the split is accepted only if the coupling ``Q_2^T A Q_1`` is below ``tol |A|_F``
   (and two bases are orthogonal to each other; a reflector is orthogonal by
   construction), else the next ``σ``: degenerate or clustered spectra cannot produce
   a wrong result, only another try;
5. recurse on ``Q_i^T A Q_i`` until a block fits in core (on the host 1.5 copies of it:
   :func:`~ntk_dist.linalg.tridiagonal.host_eigh`; ``jnp.linalg.eigh`` on a device) or
   is a multiple of ``I``; a block's eigenvectors are kept as column parts
   ``Q_i V_part`` (one per leaf), so nothing is ever written at an unaligned column
   offset.

Every matrix is a :class:`~ntk_dist.linalg.tiled.Tiled` in a scratch folder; the
products and solves run as tile-row jobs through a runner (this process, or Ray
tasks). A ledger in the scratch folder records the input copy, each accepted split
(its bases or reflector, and sub-blocks) and each finished block (its eigenvector parts and
eigenvalues); a rerun with the same ``scratch_dir`` after a kill skips all of them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist.linalg import tiled as tl
from ntk_dist.linalg import tridiagonal, two_stage
from ntk_dist.linalg.band import band_eigenvalues, bandwidth_for, panel_reflector
from ntk_dist.linalg.lanczos import ritz_values
from ntk_dist.linalg.operator import NotPositiveDefiniteError

__all__ = [
    "SplitFailedError",
    "divide_and_conquer_eigh",
    "polar_factor",
    "scratch_bytes",
]

IN_CORE_COPIES = 4  # as in ntk_dist.linalg.eigh: K, a symmetrised copy, V, workspace
REFLECTOR_COPIES = 8  # n x s arrays a reflector split holds: V, W2, [V W2], [W2 V], rows
_SUBSPACE_OVERSAMPLING = 16  # extra columns of a subspace iteration (fewer if the bound is tight)
_SUBSPACE_MAX_RATE = 0.1  # estimated convergence per pass above which QDWH is used
_SUBSPACE_MAX_PASSES = 30
SCRATCH_MATRICES = 12  # n x n matrices the scratch folder holds at most (see scratch_bytes)
_QR_CUTOFF = 100.0  # the QR-based QDWH step while c exceeds this (safe) ...
_MIN_ESTIMATED_BOUND = 1e-4  # a smaller estimate of l0 is not tried (one step saved, if right)
_QR_CUTOFF_ESTIMATED = 1e5  # ... or this, from an estimated lower bound (checked by the split)
_ASSUMED_BOUND = 1e-5  # the largest lower bound assumed without a gap: one QR-based step
_UNIT_SUMSQ = 1e-13  # |X|_F^2 within this of n (relative): every singular value reached 1
_LANCZOS_STEPS = 20  # for the ends of a block's spectrum (the scale of A - σI)
_MAX_ITERATIONS = 30
_SPLIT_TRIES = 6
_IDENTITY = "identity"  # an eigenvector part equal to I (a block that is a multiple of I)


class SplitFailedError(RuntimeError):
    """No split point gave an accurate spectral split of a block."""


def scratch_bytes(n: int, itemsize: int) -> int:
    """Disk the scratch folder of an ``n x n`` out-of-core eigh needs at most, in bytes.

    The input copy, the current block's bases and sub-blocks down the recursion
    (geometric: at most twice the top level's) and the QDWH iterates in flight.
    """
    return SCRATCH_MATRICES * n * n * itemsize


def _coefficients(lo: float) -> tuple[float, float, float, float]:
    """QDWH weights ``a, b, c`` for lower bound ``l`` and the next lower bound."""
    l2 = lo * lo
    dd = (4 * (1 - l2) / (l2 * l2)) ** (1 / 3)
    sqd = math.sqrt(1 + dd)
    a = sqd + math.sqrt(max(8 - 4 * dd + 8 * (2 - l2) / (l2 * sqd), 0.0)) / 2
    b = (a - 1) ** 2 / 4
    c = a + b - 1
    return a, b, c, min(1.0, lo * (a + b * l2) / (1 + c * l2))


@dataclass
class _Context:
    """What every step of one eigh shares: scratch folder, runner, ledger, bound, tolerances."""

    folder: str
    tile: int
    dtype: np.dtype
    memory_bound: int
    tol: float
    runner: tl.TileRunner
    device: jax.Device | None  # in-core leaves on this JAX device, else host LAPACK
    progress: Callable[[str], None] | None
    two_stage: bool = False  # gapless blocks by two-stage tridiagonalisation (host, local)
    # the whole matrix's two-stage chunks straight into the stored eigenvectors (columns),
    # whose chunks are this many columns wide
    write_columns: Callable[[slice, np.ndarray], None] | None = None
    column_chunk: int = 1
    scale: float = 1.0
    temps: int = 0
    recorded: list[str] = field(default_factory=list)
    free: list[str] = field(default_factory=list)  # released files, reused by new()

    # ----------------------------------------------------------- matrices
    def matrix(self, name: str, rows: int, cols: int, triangle: str | None = None) -> tl.Tiled:
        path = os.path.join(self.folder, name)
        return tl.Tiled(path, rows, cols, self.tile, self.dtype.name, triangle)

    def new(self, name: str, rows: int, cols: int, triangle: str | None = None) -> tl.Tiled:
        """Matrix ``name`` on the smallest released file that holds it, else a new file.

        Its tiles hold stale data until written (every job writes each tile of the rows
        it makes, so none is read before). Writing over a file's cached pages is ~40x
        faster than into a new (sparse) file here.
        """
        matrix = self.matrix(name, rows, cols, triangle)
        fits = [f for f in self.free if os.path.getsize(f) >= matrix.nbytes]
        if not fits:
            return matrix.create()
        recycled = min(fits, key=os.path.getsize)
        self.free.remove(recycled)
        os.replace(recycled, matrix.path)
        return matrix

    def temp(self, rows: int, cols: int, triangle: str | None = None) -> tl.Tiled:
        self.temps += 1
        return self.new(f"tmp/{self.temps}", rows, cols, triangle)

    def release(self, *matrices: tl.Tiled | tl.Factor) -> None:
        """Keep the files of ``matrices`` (in ``tmp/``, wiped on a rerun) for :meth:`new`."""
        for m in matrices:
            if isinstance(m, tl.Factor):
                self.release(m.lower, m.inverses)
            elif os.path.exists(m.path):
                self.temps += 1
                self.free.append(os.path.join(self.folder, "tmp", f"free-{self.temps}"))
                os.replace(m.path, self.free[-1])

    # ------------------------------------------------------------- ledger
    def done(self, key: str) -> dict | None:
        path = os.path.join(self.folder, "ledger", key + ".json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def record(self, key: str, info: dict) -> None:
        """Record ``key`` as finished (atomically: a killed write leaves no entry)."""
        path = os.path.join(self.folder, "ledger", key + ".json")
        with open(path + ".part", "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".part", path)
        self.recorded.append(key)
        if self.progress is not None:
            self.progress(key)

    # --------------------------------------------------------------- jobs
    def product(
        self,
        term: tl.Term,
        out: tl.Tiled | None,
        lower: bool = False,
        add: tl.Tiled | None = None,
        beta: float = 0.0,
        gamma: float = 0.0,
    ) -> tl.Reductions:
        rows = term.a.grid[1] if term.trans_a else term.a.grid[0]
        jobs = [tl.ProductJob(term, out, i, lower, add, beta, gamma) for i in range(rows)]
        return self.runner.run(jobs)

    def solve(
        self,
        x: tl.Tiled | None,
        factors: Sequence[tuple[tl.Factor, bool]],
        out: tl.Tiled,
        alpha: float = 1.0,
        beta: float = 0.0,
        symmetric: bool = False,
    ) -> tl.Reductions:
        jobs = [
            tl.SolveJob(x, tuple(factors), out, i, alpha, beta, symmetric)
            for i in range(out.grid[0])
        ]
        return self.runner.run(jobs)

    def combine(self, a: tl.Tiled, out: tl.Tiled | None, alpha: float, gamma: float) -> float:
        """``out = alpha A + gamma I``; returns ``|alpha A + gamma I|_F^2``."""
        jobs = [tl.CombineJob(a, out, i, alpha, gamma) for i in range(a.grid[0])]
        return self.runner.run(jobs)["sumsq"]

    def random(self, rows: int, cols: int, seed: int) -> tl.Tiled:
        out = self.temp(rows, cols)
        self.runner.run([tl.RandomJob(out, i, seed) for i in range(out.grid[0])])
        return out

    def reflector_columns(self, n: int) -> int:
        """How many columns of ``n`` rows a reflector split may hold (``REFLECTOR_COPIES``)."""
        return self.memory_bound // (REFLECTOR_COPIES * n * self.dtype.itemsize)

    def leaf_size(self) -> int:
        """The largest block decomposed in core (``HOST_LEAF_COPIES`` or, on a device,
        ``IN_CORE_COPIES`` copies of it fit the bound)."""
        copies = tridiagonal.HOST_LEAF_COPIES if self.device is None else IN_CORE_COPIES
        return math.isqrt(int(self.memory_bound // (copies * self.dtype.itemsize)))

    def cholesky(self, z: tl.Tiled, shift: float = 0.0) -> tl.Factor:
        inverses = self.temp(self.tile, z.grid[0] * self.tile)
        return tl.cholesky(z, self.temp(z.rows, z.cols), inverses, shift)


# ------------------------------------------------------------------------ QDWH
def polar_factor(
    ctx: _Context, x: tl.Tiled, scale: float, lower_bound: float, estimated: bool = False
) -> tuple[tl.Tiled, float, int]:
    """Unitary polar factor of ``x`` by QDWH; it, its trace and the step count.

    ``scale``: about ``|x|_2`` (an underestimate costs steps: singular values of
    ``x / scale`` above 1 are brought down to 1 by the last steps). The iteration starts
    from ``x / scale`` (the division is fused into the first step). ``lower_bound``: of
    the singular values of ``x / scale`` (at least eps is used); a smaller singular value
    only takes more steps (each of the last ones triples it). The iteration runs until a
    step changes ``X`` by at most ``(5 eps)^(1/3)`` in the Frobenius norm. ``estimated``:
    the bound comes from a gap (Cholesky-based steps from ``c <= 1e5`` on, and the
    iteration stops once the bound reaches 1 if ``|X|_F^2 = n``; a bound that is too
    large may lose accuracy: the split's check then fails).
    ``x`` is consumed (released).
    """
    n, w = x.rows, 1.0 / scale
    eps = float(np.finfo(ctx.dtype).eps)
    lo, tol = min(max(lower_bound, eps), 1.0), (5 * eps) ** (1 / 3)
    for step in range(1, _MAX_ITERATIONS + 1):
        a, b, c, l_next = _coefficients(lo) if lo < 1 - 10 * eps else (3.0, 1.0, 3.0, 1.0)
        z = ctx.temp(n, n)
        ctx.product(tl.Term(x, x, c * w * w, trans_a=True), z, lower=True, gamma=1.0)
        try:
            l1 = ctx.cholesky(z)
        finally:
            ctx.release(z)
        new = ctx.temp(n, n)
        if c > (_QR_CUTOFF_ESTIMATED if estimated else _QR_CUTOFF):  # CholeskyQR2
            q1, q2 = ctx.temp(n, n), ctx.temp(n, n, "upper")
            ctx.solve(x, [(l1, True)], q1, alpha=math.sqrt(c) * w)  # sqrt(c) X L1^-T
            ctx.solve(None, [(l1, True)], q2)  # L1^-T
            ctx.release(l1)
            g = ctx.temp(n, n)
            ctx.product(tl.Term(q1, q1, trans_a=True), g, lower=True)
            ctx.product(tl.Term(q2, q2, trans_a=True), g, lower=True, add=g, beta=1.0)
            try:
                l2 = ctx.cholesky(g)
            finally:
                ctx.release(g)
            ctx.solve(q1, [(l2, True)], q1)
            ctx.solve(q2, [(l2, True)], q2)
            ctx.release(l2)
            weight = (a - b / c) / math.sqrt(c)
            sums = ctx.product(  # symmetric, as X: the lower tiles, mirrored
                tl.Term(q1, q2, weight, trans_b=True), new, True, x, b / c * w
            )
            ctx.release(q1, q2)
        else:  # (b/c) X + (a - b/c) X L^-T L^-1
            sums = ctx.solve(  # X and Z^{-1} commute: the result is symmetric
                x, [(l1, True), (l1, False)], new, (a - b / c) * w, b / c * w, symmetric=True
            )
            ctx.release(l1)
        ctx.release(x)
        x, lo, w = new, l_next, 1.0
        # converged once the lower bound reaches 1 and the step was small enough; from
        # an estimate, already if |X|_F^2 = n (every singular value reached 1: the
        # split's check decides the rest), else the estimate was too large: more steps
        if lo >= 1 - 10 * eps and (
            math.sqrt(sums["diffsq"]) <= tol
            or (estimated and abs(sums["sumsq"] - n) <= _UNIT_SUMSQ * n)
        ):
            return x, sums["trace"], step
    ctx.release(x)
    raise SplitFailedError(f"QDWH did not converge in {_MAX_ITERATIONS} steps")


def _orthonormalize(ctx: _Context, y: tl.Tiled, passes: Sequence[bool]) -> None:
    """In place: ``y <- y R^{-1}`` by CholeskyQR passes (True: shifted, for rank safety)."""
    m, k = y.rows, y.cols
    eps = float(np.finfo(ctx.dtype).eps)
    for shifted in passes:
        g = ctx.temp(k, k)
        sums = ctx.product(tl.Term(y, y, trans_a=True), g, lower=True)
        shift = 11 * (m * k + k * (k + 1)) * eps * sums["trace"] if shifted else 0.0
        try:
            lower = ctx.cholesky(g, shift)
        finally:
            ctx.release(g)
        ctx.solve(y, [(lower, True)], y)
        ctx.release(lower)


def _projected(ctx: _Context, u: tl.Tiled, cols: int, above: bool, seed: int) -> tl.Tiled:
    """``P Ω`` (``above``) or ``(I - P) Ω`` for ``P = (U + I) / 2``, ``Ω`` Gaussian ``n x cols``."""
    omega = ctx.random(u.rows, cols, seed)
    y = ctx.temp(u.rows, cols)
    ctx.product(tl.Term(u, omega, 0.5 if above else -0.5), y, add=omega, beta=0.5)
    ctx.release(omega)
    return y


def _range_bases(
    ctx: _Context, a: tl.Tiled, u: tl.Tiled, k: int, seed: int
) -> tuple[tl.Tiled, tl.Tiled, tl.Tiled] | None:
    """``(Q_below, Q_above, A Q_above)`` for the polar factor ``u`` of ``A - σI``, or None.

    None if the bases are not orthogonal to each other or do not split ``A`` to the
    tolerance after one subspace-iteration step and one refinement.
    """
    n = a.rows
    below = _projected(ctx, u, n - k, False, seed + 1)  # (I - P) Ω'
    above = _projected(ctx, u, k, True, seed)  # P Ω
    try:
        for refine in (False, True):
            for q in (below, above):
                if refine:  # one more step of subspace iteration: q <- P q (or (I - P) q)
                    y = ctx.temp(q.rows, q.cols)
                    sign = 0.5 if q is above else -0.5
                    ctx.product(tl.Term(u, q, sign), y, add=q, beta=0.5)
                    os.replace(y.path, q.path)
                if refine:
                    _orthonormalize(ctx, q, (False,))
                    continue
                try:  # CholeskyQR2: P Ω is as well conditioned as a square Gaussian matrix
                    _orthonormalize(ctx, q, (False, False))
                except NotPositiveDefiniteError:  # unless unlucky: shifted CholeskyQR3
                    _orthonormalize(ctx, q, (True, False, False))
            aq = ctx.temp(n, k)
            ctx.product(tl.Term(a, above), aq)
            cross = ctx.product(tl.Term(below, above, trans_a=True), None)["sumsq"]
            coupling = ctx.product(tl.Term(below, aq, trans_a=True), None)["sumsq"]
            if math.sqrt(cross) <= ctx.tol * math.sqrt(n) and math.sqrt(coupling) <= (
                ctx.tol * ctx.scale
            ):
                return below, above, aq
            ctx.release(aq)
    except NotPositiveDefiniteError:  # a rank-deficient start: the projector was not clean
        pass
    ctx.release(below, above)
    return None


def _sample_spectrum(a: tl.Tiled, memory_bound: int) -> np.ndarray:
    """Eigenvalues (ascending) of a principal block of ``A`` on evenly spaced indices,
    as large as the in-core eigh allows."""
    n, b = a.rows, a.tile
    m = math.isqrt(memory_bound // (IN_CORE_COPIES * np.dtype(a.dtype).itemsize))
    index = np.unique(np.linspace(0, n - 1, min(n, max(m, 2))).round().astype(int))
    sample = np.empty((len(index), len(index)), a.dtype)
    for i in np.unique(index // b):  # a tile at a time
        rows = index // b == i
        for j in np.unique(index // b):
            cols = index // b == j
            tile = a.read_tiles([(i, j)])[0]
            sample[np.ix_(rows, cols)] = tile[np.ix_(index[rows] - i * b, index[cols] - j * b)]
    return np.linalg.eigvalsh(sample)


def _spacing_near(mu: np.ndarray, sigma: float) -> float:
    """The gap of the sampled spectrum ``mu`` around ``σ`` (0 outside it)."""
    j = int(np.searchsorted(mu, sigma))
    return float(mu[j] - mu[j - 1]) if 0 < j < len(mu) else 0.0


def _split_points(a: tl.Tiled, mu: np.ndarray) -> list[tuple[float, float]]:
    """Candidate split points ``σ``, best first, and each one's estimated distance to the
    spectrum of ``A`` (0: unknown), from the spectrum ``mu`` of a sampled principal block.

    By Cauchy interlacing, a point between the ``j``-th and ``j+1``-th eigenvalues ``μ`` of
    an ``m x m`` principal submatrix leaves at least ``j`` and at most ``j + n - m``
    eigenvalues of ``A`` below it. Gaps are ranked by relative width times
    ``min(j, m - j)^2``: balanced splits away from clusters first (a balanced split
    leaves two blocks of an eighth of the work each; subspace iteration takes the
    unbalanced splits of outliers); then diagonal statistics.
    The distance of a gap's midpoint is a tenth of the gap's half-width: an estimate, not
    a bound (the sample's eigenvalues need not be close to ``A``'s).
    """
    size = np.maximum(np.maximum(np.abs(mu[:-1]), np.abs(mu[1:])), np.finfo(mu.dtype).tiny)
    j = np.arange(1, len(mu))
    score = np.diff(mu) / size * np.minimum(j, len(mu) - j) ** 2
    points = [
        (float(mu[i] + mu[i + 1]) / 2, float(mu[i + 1] - mu[i]) / 20)
        for i in np.argsort(-score)[:3]
    ]
    diag = a.diagonal()
    points += [(float(np.median(diag)), 0.0), (float(np.mean(diag)), 0.0)]
    points += [(float(np.quantile(diag, 0.3)) + 1e-3 * float(diag.max() - diag.min()), 0.0)]
    return points[:_SPLIT_TRIES]


def _reflector_split(
    ctx: _Context, name: str, a: tl.Tiled, basis: np.ndarray, small_above: bool
) -> dict | None:
    """A split by one block reflector from the smaller side's ``n x s`` basis, or None.

    ``basis`` spans (to the tolerance) the invariant subspace of the ``s`` eigenvalues
    above (``small_above``) or below the rest. ``Q = I - V T V^T`` from its Householder
    QR (rows reversed, so that it is spanned by the last ``s`` columns of ``Q``).
    ``Q^T A Q = A - W2 V^T - V W2^T`` with ``W = A V T`` and ``W2 = W - V (T^T V^T W) / 2``
    takes two passes over ``A`` and ``4 n^2 s`` flops, instead of forming,
    orthonormalising and projecting onto an ``n x (n - s)`` basis of the larger side. Its
    leading ``m = n - s`` block is the larger child, its last ``s`` rows hold the smaller
    child and the coupling (None if that is above the tolerance).
    """
    n, s = basis.shape
    m = n - s
    v, t, _ = panel_reflector(basis[::-1])
    v = np.ascontiguousarray(v[::-1])
    vt = ctx.temp(n, s)
    vt.write_region(slice(None), slice(None), v @ t)
    w = ctx.temp(n, s)
    ctx.product(tl.Term(a, vt), w)
    ctx.release(vt)
    w2 = w.read_region(slice(None), slice(None))
    ctx.release(w)
    w2 -= v @ (t.T @ (v.T @ w2)) / 2
    last = a.read_region(slice(m, n), slice(None)) - w2[m:] @ v.T - v[m:] @ w2.T
    if np.linalg.norm(last[:, :m]) > ctx.tol * ctx.scale:
        return None
    small = (last[:, m:] + last[:, m:].T) / 2
    left, right = ctx.temp(m, 2 * s), ctx.temp(m, 2 * s)
    left.write_region(slice(None), slice(None), np.hstack([v[:m], w2[:m]]))
    right.write_region(slice(None), slice(None), -np.hstack([w2[:m], v[:m]]))
    big_name, small_name = (name + "0", name + "1") if small_above else (name + "1", name + "0")
    big_sums = ctx.product(
        tl.Term(left, right, trans_b=True), ctx.new(big_name + ".a", m, m), True, a, 1.0
    )
    ctx.release(left, right)
    ctx.new(small_name + ".a", s, s).write_region(slice(None), slice(None), small)
    np.save(os.path.join(ctx.folder, name + ".v.npy"), v)
    np.save(os.path.join(ctx.folder, name + ".t.npy"), t)
    small_sums = {"sumsq": float(np.sum(small * small)), "trace": float(np.trace(small))}
    return {
        "k": s if small_above else m,
        "method": "reflector",
        "children": [
            {"name": big_name, "size": m, **big_sums},
            {"name": small_name, "size": s, "last": True, **small_sums},
        ],
    }


def _polar_basis(ctx: _Context, u: tl.Tiled, k: int, seed: int) -> tuple[np.ndarray, bool]:
    """``P Ω`` (or ``(I - P) Ω``, the smaller side) for the polar factor ``u``, in memory."""
    small_above = k <= u.rows - k
    y = _projected(ctx, u, min(k, u.rows - k), small_above, seed)
    basis = y.read_region(slice(None), slice(None))
    ctx.release(y)
    return basis, small_above


def _shifted_product(a: tl.Tiled, y: np.ndarray, shift: float) -> np.ndarray:
    """``(A - shift I) y`` for an in-memory ``n x r`` block ``y``, a tile row of ``A`` at a time."""
    n, b = a.rows, a.tile
    out = np.empty_like(y)
    for i in range(a.grid[0]):
        rows = slice(i * b, min(n, (i + 1) * b))
        panel = a.op_row(i, range(a.grid[1]), False)
        out[rows] = panel[: rows.stop - rows.start, :n] @ y
    return out - shift * y


def _subspace_group(mu: np.ndarray, most: int) -> tuple[float, int, bool]:
    """The group of at most ``most`` sampled eigenvalues at either end of ``mu`` that
    subspace iteration separates fastest: its rate, size and side (True: the top).

    For a group of ``s`` with the rest of ``mu`` in ``[lo, hi]``, ``Y <- (A - τ I) Y``
    with ``τ = (lo + hi) / 2`` converges at ``((hi - lo) / 2) / |near - τ|`` per pass,
    ``near`` the group's eigenvalue closest to the rest; infinite if the group does not
    lie outside ``[lo, hi]``.
    """
    m = len(mu)
    sizes = np.arange(1, min(most, m - 1) + 1)
    best = (math.inf, 0, True)
    for top in (True, False):
        lo = np.full(len(sizes), mu[0]) if top else mu[sizes]
        hi = mu[m - sizes - 1] if top else np.full(len(sizes), mu[-1])
        near = mu[m - sizes] if top else mu[sizes - 1]
        shift, half = (lo + hi) / 2, (hi - lo) / 2
        apart = np.abs(near - shift)
        rate = np.where(apart > half, half / np.maximum(apart, np.finfo(mu.dtype).tiny), np.inf)
        if len(rate) and rate.min() < best[0]:
            i = int(np.argmin(rate))
            best = (float(rate[i]), int(sizes[i]), top)
    return best


def _flat_beside_outliers(ctx: _Context, mu: np.ndarray, n: int) -> bool:
    """Whether the sampled spectrum ``mu`` has outliers that subspace iteration splits
    off (:func:`_subspace_group`) and the rest of it is flat (within ``tol |A|_F``): the
    remaining block is then a multiple of the identity, done at once."""
    rate, s, small_above = _subspace_group(mu, min(ctx.reflector_columns(n), n - 1) - 2)
    rest = mu[: len(mu) - s] if small_above else mu[s:]
    return rate <= _SUBSPACE_MAX_RATE and float(rest[-1] - rest[0]) <= ctx.tol * ctx.scale


def _subspace_basis(
    ctx: _Context, a: tl.Tiled, mu: np.ndarray, seed: int
) -> tuple[np.ndarray, bool] | None:
    """A basis of a few outlying eigenvalues by subspace iteration, or None.

    The group comes from the sample ``mu`` (:func:`_subspace_group`; ``s + p`` columns
    must fit the bound, ``2 <= p <= 16``). If its rate is at most ``_SUBSPACE_MAX_RATE``,
    passes of ``Y <- (A - τ I) Y`` (``2 n^2 (s + p)`` flops each, one read of ``A``)
    converge to eps: far cheaper than QDWH. Rayleigh-Ritz picks the Ritz vectors beyond
    the middle of the gap; None if every Ritz value is beyond it (the group of ``A`` may
    be larger than the sample's). The split's check decides the rest.
    """
    n = a.rows
    fit = ctx.reflector_columns(n)
    rate, s, small_above = _subspace_group(mu, min(fit, n - 1) - 2)
    if rate > _SUBSPACE_MAX_RATE:
        return None
    m = len(mu)
    rest = mu[: m - s] if small_above else mu[s:]
    shift = (rest[0] + rest[-1]) / 2
    sigma = (mu[m - s - 1] + mu[m - s]) / 2 if small_above else (mu[s - 1] + mu[s]) / 2
    r = min(s + _SUBSPACE_OVERSAMPLING, fit, n - 1)
    passes = min(
        _SUBSPACE_MAX_PASSES,
        2 + math.ceil(math.log(np.finfo(ctx.dtype).eps) / math.log(max(rate, 1e-300))),
    )
    y = np.random.default_rng(seed).standard_normal((n, r)).astype(ctx.dtype)
    for _ in range(passes):
        y, _ = np.linalg.qr(_shifted_product(a, y, shift))
    theta, vectors = np.linalg.eigh(y.T @ _shifted_product(a, y, 0.0))
    beyond = theta > sigma if small_above else theta <= sigma
    if not 0 < np.sum(beyond) < r:
        return None
    return y @ vectors[:, beyond], small_above


def _bases_split(
    ctx: _Context, name: str, a: tl.Tiled, u: tl.Tiled, k: int, seed: int
) -> dict | None:
    """A split by orthonormal bases of both sides (``Q_i``, ``n x size``), or None."""
    n = a.rows
    found = _range_bases(ctx, a, u, k, seed)
    if found is None:
        return None
    below, above, aq_above = found
    info: dict = {"k": k, "method": "bases", "children": []}
    for child, q, aq in ((name + "0", below, None), (name + "1", above, aq_above)):
        if aq is None:
            aq = ctx.temp(n, q.cols)
            ctx.product(tl.Term(a, q), aq)
        block = ctx.new(child + ".a", q.cols, q.cols)
        child_sums = ctx.product(tl.Term(q, aq, trans_a=True), block, lower=True)
        ctx.release(aq)
        os.replace(q.path, os.path.join(ctx.folder, child + ".q"))
        info["children"].append({"name": child, "size": q.cols, **child_sums})
    return info


@dataclass(frozen=True)
class _SplitTry:
    """A split point ``σ`` and how QDWH starts from it: the distance from ``σ`` to the
    spectrum (0: unknown), whether it is ``exact`` (else an estimate), whether to run the
    ``fast`` QDWH on it (see :func:`polar_factor`'s ``estimated``), and the spectrum's
    ends (exact, or Ritz values, which lie inside it)."""

    sigma: float
    distance: float
    exact: bool
    fast: bool
    low: float
    high: float


def _estimated_tries(a: tl.Tiled, mu: np.ndarray, depth: int) -> list[_SplitTry]:
    """Split points from the sample ``mu`` (:func:`_split_points`): each estimate, then
    the safe try; the ends of the spectrum from 20 Lanczos steps."""
    theta = ritz_values(
        lambda v: _shifted_product(a, v[:, None], 0.0)[:, 0], a.rows, _LANCZOS_STEPS, seed=depth + 1
    )
    return [
        _SplitTry(sigma, d, False, d > 0, theta[0], theta[-1])
        for sigma, distance in _split_points(a, mu)
        for d in ((distance, 0.0) if distance > 0 else (0.0,))
    ]


def _qdwh_units(bound: np.ndarray) -> np.ndarray:
    """Cost of the fast QDWH from lower bounds ``bound``, in Cholesky-based steps (a
    QR-based one, while ``c > 1e5``, counts two): the scalar recurrence on a grid."""
    grid = np.logspace(-16, 0, 65)
    units = np.zeros(len(grid))
    for g, lo in enumerate(grid):
        while lo < 1 - 1e-15:
            _, _, c, lo = _coefficients(lo)
            units[g] += 2 if c > _QR_CUTOFF_ESTIMATED else 1
    at = np.searchsorted(grid, np.clip(bound, grid[0], 1.0), side="right") - 1
    return units[np.clip(at, 0, len(grid) - 1)]


def _exact_tries(w: np.ndarray, leaf: int, thin: int, flat: float) -> list[_SplitTry]:
    """Split points in the gaps of the exact spectrum ``w`` (ascending), cheapest first
    (each with the fast QDWH, then the safe one on the same bound).

    The cost of splitting after ``j`` eigenvalues, in Cholesky-based QDWH steps on this
    block: the steps from QDWH's lower bound (half the gap less the eigenvalues' error,
    over ``|A - σI|_2``), the split (half a step for a reflector when a side has at most
    ``thin`` eigenvalues, three for bases of both) and, for each side that is neither a
    leaf of at most ``leaf`` nor flat (eigenvalues within ``flat``: a multiple of I),
    eight steps scaled by its size cubed (its own split). Ties go to the wider gap, then
    to balance. Splits inside a cluster fail the coupling check (measured: the middle of
    50 eigenvalues within 1e-5 of 1.0 beside others at 0.5 and 3.0, and of an NTK's 52
    eigenvalues in [4e-6, 7e-6] below 96, at every bound), so gaps below ``1e-6 |σ|`` are
    not used while others exist, and the tie-break prefers a cluster's edge.
    """
    n = len(w)
    error = n * float(np.finfo(w.dtype).eps) * float(np.max(np.abs(w)))
    sigma = (w[:-1] + w[1:]) / 2
    gap = np.diff(w)
    bound = (gap / 2 - error) / np.maximum(w[-1] - sigma, sigma - w[0])
    below = np.arange(1, n)  # eigenvalues below each split point
    cost = _qdwh_units(bound) + np.where(np.minimum(below, n - below) <= thin, 0.5, 3.0)
    for size, spread in ((below, w[below - 1] - w[0]), (n - below, w[-1] - w[below])):
        cost += np.where((size <= leaf) | (spread <= flat), 0.0, 8.0 * (size / n) ** 3)
    usable = bound > 0
    # ties (the step counts are coarse) go to the wider gap, then to the balanced split
    cost += -0.01 * np.log10(np.where(usable, bound, 1.0)) + 0.1 * np.abs(2 * below / n - 1)
    wide = usable & (gap >= 1e-6 * np.abs(sigma))
    cost = np.where(wide if wide.any() else usable, cost, np.inf)
    best = [i for i in np.argsort(cost, kind="stable")[: _SPLIT_TRIES // 2] if cost[i] < np.inf]
    return [
        _SplitTry(float(sigma[i]), float(gap[i]) / 2 - error, True, fast, w[0], w[-1])
        for i in best
        for fast in (True, False)
    ]


def _known_spectrum(ctx: _Context, name: str) -> np.ndarray | None:
    path = os.path.join(ctx.folder, name + ".spectrum.npy")
    return np.load(path) if os.path.exists(path) else None


def _save_spectrum(ctx: _Context, name: str, w: np.ndarray) -> None:
    path = os.path.join(ctx.folder, name + ".spectrum.npy")
    with open(path + ".part", "wb") as f:
        np.save(f, w)
    os.replace(path + ".part", path)


def _accept(ctx: _Context, name: str, info: dict, spectrum: np.ndarray | None) -> dict:
    """Record the split ``info`` of block ``name``; its children's spectra first, if known."""
    if spectrum is not None:
        cut = len(spectrum) - info["k"]
        _save_spectrum(ctx, name + "0", spectrum[:cut])
        _save_spectrum(ctx, name + "1", spectrum[cut:])
    ctx.record(f"split_{name}", info)
    return info


def _split(ctx: _Context, name: str, a: tl.Tiled, sums: tl.Reductions, depth: int) -> dict:
    """Find and store an accepted split of block ``name``: its method and both sub-blocks.

    First a few outlying eigenvalues by subspace iteration (:func:`_subspace_basis`) and
    a block reflector; where two-stage blocks are allowed, only if the rest of the sampled
    spectrum is flat, else the whole block goes two-stage. Else QDWH's polar factor at
    each split point, from the exact spectrum
    (:func:`~ntk_dist.linalg.band.band_eigenvalues`, passed on to the children) when the
    tile kernels run on the host, else from the sample's estimates (on a device
    QDWH's flops cost less than the host's band reduction): the block-reflector split
    when the smaller side fits :meth:`_Context.reflector_columns`, else (or if it fails
    its check) bases of both sides.
    """
    n = a.rows
    exact = _known_spectrum(ctx, name)
    mu = exact if exact is not None else _sample_spectrum(a, ctx.memory_bound)
    two_stage_block = ctx.two_stage and exact is None
    # with two-stage blocks, outliers over a spread bulk are not split off: what they leave
    # would need a two-stage eigh of nearly the same size, and their reflector on top
    found = None
    if not two_stage_block or _flat_beside_outliers(ctx, mu, n):
        found = _subspace_basis(ctx, a, mu, 4 * depth * 16 + 3)
    info = None if found is None else _reflector_split(ctx, name, a, *found)
    if info is not None:
        return _accept(ctx, name, {**info, "basis": "subspace iteration"}, exact)
    if two_stage_block:
        return _accept(ctx, name, {"method": "two-stage"}, None)
    if exact is None and ctx.device is None:
        width = bandwidth_for(n, ctx.tile, ctx.dtype.itemsize, ctx.memory_bound)
        exact = band_eigenvalues(a, ctx.matrix(name + ".band", n, n), width)
        _save_spectrum(ctx, name, exact)

    def tries() -> Iterator[_SplitTry]:  # the sample's only if the exact ones all fail
        if exact is not None:
            leaf, thin, flat = ctx.leaf_size(), ctx.reflector_columns(n), ctx.tol * ctx.scale
            yield from _exact_tries(exact, leaf, thin, flat)
        yield from _estimated_tries(a, mu, depth)

    attempt = -1
    for attempt, split in enumerate(tries()):
        x0 = ctx.temp(n, n)
        frobenius = math.sqrt(ctx.combine(a, x0, 1.0, -split.sigma))
        # |A - σI|_2 from the ends of the spectrum (Ritz values lie inside it: a margin);
        # the Frobenius norm bounds it. An underestimate costs a step or two, not accuracy.
        margin = 1 + 1e-8 if split.exact else 1.1
        reach = max(split.high - split.sigma, split.sigma - split.low, 0.0)
        scale = max(min(frobenius, margin * reach) or frobenius, float(np.finfo(ctx.dtype).tiny))
        bound = split.distance / scale
        if not split.exact and 0 < bound < _MIN_ESTIMATED_BOUND:  # saves a step at most
            ctx.release(x0)
            continue
        if split.distance == 0:  # a hundredth of A's eigenvalue spacing near σ (the sample's)
            spacing = _spacing_near(mu, split.sigma) * len(mu) / n
            bound = min(_ASSUMED_BOUND, spacing / 100 / scale)
        try:
            u, trace, _ = polar_factor(ctx, x0, scale, bound, split.fast)
        except (SplitFailedError, NotPositiveDefiniteError):
            continue
        k = round((trace + n) / 2)
        seed = 4 * (depth * 16 + attempt)
        info = None
        if k not in (0, n) and min(k, n - k) <= ctx.reflector_columns(n):
            info = _reflector_split(ctx, name, a, *_polar_basis(ctx, u, k, seed))
        if info is None and k not in (0, n):
            info = _bases_split(ctx, name, a, u, k, seed)
        ctx.release(u)
        if info is not None:
            return _accept(ctx, name, {**info, "basis": "polar factor"}, exact)
    raise SplitFailedError(
        f"no accurate spectral split of a {n} x {n} block after {attempt + 1} tries; "
        "raise memory_bound so that it fits the in-core eigh"
    )


def _block(ctx: _Context, name: str, n: int, sums: tl.Reductions, depth: int) -> dict:
    """Eigenvector parts and eigenvalues of block ``name`` (from the ledger if finished)."""
    done = ctx.done(f"done_{name}")
    if done is not None:
        return done
    a = ctx.matrix(name + ".a", n, n)
    values_file = name + ".w.npy"
    if n <= ctx.leaf_size():
        if ctx.device is None:
            w, v = tridiagonal.host_eigh(lambda: a.read_region(slice(None), slice(None)))
        else:
            dense = jax.device_put(a.read_region(slice(None), slice(None)), ctx.device)
            w, v = map(np.asarray, jnp.linalg.eigh(dense))
            del dense
        ctx.new(name + ".v0", n, n).write_region(slice(None), slice(None), v)
        del v
        info = {"parts": [name + ".v0"], "sizes": [n], "values": values_file}
    else:
        mean = sums["trace"] / n
        if math.sqrt(ctx.combine(a, None, 1.0, -mean)) <= ctx.tol * ctx.scale:  # mean * I
            w = np.full(n, mean)
            info = {"parts": [_IDENTITY], "sizes": [n], "values": values_file}
        else:
            info = _assemble(ctx, name, a, sums, depth)
            w = np.concatenate([np.load(os.path.join(ctx.folder, c)) for c in info.pop("_values")])
    np.save(os.path.join(ctx.folder, values_file), w)
    used = info.pop("_used", [])
    ctx.record(f"done_{name}", info)
    for f in used:  # the children's files, now that this block's parts replace them
        ctx.release(ctx.matrix(f, 0, 0))
    return info


def _assemble(ctx: _Context, name: str, a: tl.Tiled, sums: tl.Reductions, depth: int) -> dict:
    """Split block ``name``, solve both halves, and form its parts ``Q_i V_part``."""
    split = ctx.done(f"split_{name}") or _split(ctx, name, a, sums, depth)
    if split.get("method") == "two-stage":
        info = _two_stage_block(ctx, name, a)
        if info is not None:
            return info
        split = _split(ctx, name, a, sums, depth)  # QDWH, from the exact spectrum saved
    n = a.rows
    parts, sizes, values, used = [], [], [], []
    for child in split["children"]:
        info = _block(ctx, child["name"], child["size"], child, depth + 1)
        q = ctx.matrix(child["name"] + ".q", n, child["size"])
        for part, size in zip(info["parts"], info["sizes"], strict=True):
            out = ctx.new(f"{name}.v{len(parts)}", n, size)
            if split.get("method") == "reflector":
                _reflect_part(ctx, name, child.get("last", False), part, out)
            elif part == _IDENTITY:
                shutil.copyfile(q.path, out.path)
            else:
                ctx.product(tl.Term(q, ctx.matrix(part, child["size"], size)), out)
            if part != _IDENTITY:
                used.append(part)
            parts.append(out.path.removeprefix(ctx.folder + os.sep))
            sizes.append(size)
        values.append(info["values"])
        used += [child["name"] + ".q", child["name"] + ".a"]
    used += values + [name + ".v.npy", name + ".t.npy", name + ".spectrum.npy"]
    info = {"parts": parts, "sizes": sizes, "values": name + ".w.npy"}
    return {**info, "_values": values, "_used": used}  # _used: deleted once this is recorded


def _two_stage_block(ctx: _Context, name: str, a: tl.Tiled) -> dict | None:
    """Parts and eigenvalues of block ``name`` by :func:`~ntk_dist.linalg.two_stage.
    two_stage_eigh` (reduced in a work file); None (its exact spectrum saved for QDWH's split) if
    MRRR failed or the eigenvectors of separate chunks were not orthogonal, as in a cluster
    wider than a chunk."""
    n = a.rows
    work = ctx.new(name + ".band", n, n)
    width = bandwidth_for(n, ctx.tile, ctx.dtype.itemsize, ctx.memory_bound)
    sink = _TwoStageSink(ctx, name, n)
    folder = os.path.join(ctx.folder, name + ".two-stage")
    try:
        w = two_stage.two_stage_eigh(a, folder, width, ctx.memory_bound, sink, work)
    except two_stage.TridiagonalVectorsError as e:
        _save_spectrum(ctx, name, e.eigenvalues)  # so _split takes QDWH's path from it
        ctx.release(*sink.parts)
        return None
    finally:
        ctx.release(work)
    np.save(os.path.join(ctx.folder, name + ".tw.npy"), w)
    names = [p.path.removeprefix(ctx.folder + os.sep) for p in sink.parts]
    info = {"parts": names, "sizes": [p.cols for p in sink.parts], "values": name + ".w.npy"}
    if sink.direct:
        info["written"] = True  # the eigenvectors are in place: no parts to assemble
    return {**info, "_values": [name + ".tw.npy"], "_used": [name + ".tw.npy"]}


class _TwoStageSink:
    """Where a two-stage block's chunks go: straight into the stored eigenvectors if the
    block is the whole matrix and its eigenvalues ascend (unless the tridiagonal matrix
    splits, they do: the chunks are then columns of the result, no assembly needed), else
    into part files."""

    def __init__(self, ctx: _Context, name: str, n: int):
        self.ctx, self.name, self.n = ctx, name, n
        self.parts: list[tl.Tiled] = []
        self.direct, self.alignment = False, 1

    def start(self, values: np.ndarray) -> None:
        ascending = bool(np.all(np.diff(values) >= 0))
        self.direct = self.name == "r" and self.ctx.write_columns is not None and ascending
        self.alignment = self.ctx.column_chunk if self.direct else 1

    def write(self, first: int, vectors: np.ndarray) -> None:
        if self.direct:
            self.ctx.write_columns(slice(first, first + vectors.shape[1]), vectors)
            return
        part = self.ctx.new(f"{self.name}.v{len(self.parts)}", self.n, vectors.shape[1])
        part.write_region(slice(None), slice(None), vectors)
        self.parts.append(part)


def _reflect_part(ctx: _Context, name: str, last: bool, part: str, out: tl.Tiled) -> None:
    """``out = Q_child part`` for a reflector split (``Q = I - V T V^T`` of block ``name``).

    The larger child holds the first ``m`` coordinates: ``[part; 0] - V (T (V_m^T part))``,
    two passes of products. The smaller child (``last``, ``s`` coordinates, a leaf) is
    done in memory: ``(E_last - V T V[m:]^T) part``.
    """
    v = np.load(os.path.join(ctx.folder, name + ".v.npy"))
    t = np.load(os.path.join(ctx.folder, name + ".t.npy"))
    n, s = v.shape
    m = n - s
    if last:
        q = -v @ (t @ v[m:].T)
        q[m:] += np.eye(s, dtype=q.dtype)
        if part != _IDENTITY:
            q = q @ ctx.matrix(part, s, out.cols).read_region(slice(None), slice(None))
        out.write_region(slice(None), slice(None), q)
        return
    v_all = ctx.temp(n, s)
    v_all.write_region(slice(None), slice(None), v)
    y = ctx.temp(s, out.cols)
    if part == _IDENTITY:  # Q[:, :m] = E_m - V T V[:m]^T
        y.write_region(slice(None), slice(None), t @ v[:m].T)
        ctx.product(tl.Term(v_all, y, -1.0), out, gamma=1.0)
    else:
        block = ctx.matrix(part, m, out.cols)
        v_top = ctx.temp(m, s)
        v_top.write_region(slice(None), slice(None), v[:m])
        ctx.product(tl.Term(v_top, block, trans_a=True), y)
        ctx.release(v_top)
        y.write_region(slice(None), slice(None), t @ y.read_region(slice(None), slice(None)))
        ctx.product(tl.Term(v_all, y, -1.0), out, add=block, beta=1.0)
    ctx.release(v_all, y)


def _input(
    ctx: _Context, read: Callable[[slice, slice], np.ndarray], n: int
) -> tuple[tl.Tiled, tl.Reductions]:
    """Copy ``(A + A^T) / 2`` to scratch, one pair of tiles at a time (skipped if recorded)."""
    a = ctx.matrix("r.a", n, n)
    done = ctx.done("input")
    if done is not None:
        return a, done
    sums = tl.write_symmetrised(read, a.create())
    ctx.record("input", sums)
    return a, sums


def _identity_rows(rows: slice, n: int, dtype: np.dtype) -> np.ndarray:
    out = np.zeros((rows.stop - rows.start, n), dtype)
    out[np.arange(rows.stop - rows.start), np.arange(rows.start, rows.stop)] = 1
    return out


def _open_scratch(folder: str, meta: dict) -> None:
    """Use ``folder`` for this eigh: keep its ledger if it is for the same problem, else wipe."""
    path = os.path.join(folder, "meta.json")
    if os.path.exists(path):
        with open(path) as f:
            same = json.load(f) == meta
        if not same:
            shutil.rmtree(folder)
    os.makedirs(os.path.join(folder, "ledger"), exist_ok=True)
    shutil.rmtree(os.path.join(folder, "tmp"), ignore_errors=True)  # a killed run's iterates
    os.makedirs(os.path.join(folder, "tmp"))
    with open(path, "w") as f:
        json.dump(meta, f)


def divide_and_conquer_eigh(
    read: Callable[[slice, slice], np.ndarray],
    n: int,
    dtype: np.dtype,
    tile: int,
    memory_bound: int,
    devices: Sequence[jax.Device] | None = None,
    write_rows: Callable[[slice, np.ndarray], None] | None = None,
    values_out: Callable[[np.ndarray], None] | None = None,
    write_columns: Callable[[slice, np.ndarray], None] | None = None,
    column_chunk: int = 1,
    tol: float | None = None,
    scratch_dir: str | None = None,
    runner: tl.TileRunner | None = None,
    kernels: str = "auto",
    progress: Callable[[str], None] | None = None,
    two_stage_blocks: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Eigendecomposition of the symmetric ``n x n`` matrix given by ``read(rows, cols)``.

    Eigenvalues ascend. Eigenvectors go block row by block row (``tile`` rows) to
    ``write_rows(rows, panel)`` if given, else they are returned as an array; with
    ``write_rows``, a matrix decomposed whole by two-stage tridiagonalisation sends its
    eigenvectors to ``write_columns(columns, block)`` instead (all rows), if given, in
    blocks that end at multiples of ``column_chunk`` where the spectrum allows it.

    ``scratch_dir``: the folder for the tiles and the ledger (default a temporary
    folder); it needs at most :func:`scratch_bytes` of disk (12 N^2 x itemsize: 384 MiB
    for N = 2048 in float64) and is removed when the eigh finishes. A rerun with the
    same folder after an interruption skips every recorded split and block.
    ``runner``: where the tile jobs run (default :class:`~ntk_dist.linalg.tiled.LocalRunner`).
    ``kernels``: "host" (numpy/scipy BLAS and LAPACK), "device" (jitted JAX on
    ``devices``, round robin) or "auto" (device unless the devices are CPUs).
    ``two_stage_blocks``: with host kernels and the local runner, decompose a block with
    no outlying eigenvalues by two-stage tridiagonalisation (False: QDWH's splits, as
    on devices).
    ``progress(key)`` is called after each ledger record ("input", "split_<block>",
    "done_<block>"; blocks are named "r", "r0", "r1", "r01", ...).
    """
    dtype = np.dtype(dtype)
    devices = list(devices or jax.local_devices())
    if kernels not in ("auto", "host", "device"):
        raise ValueError(f"kernels must be 'auto', 'host' or 'device'; got {kernels!r}")
    on_device = kernels == "device" or (kernels == "auto" and devices[0].platform != "cpu")
    runner = runner or tl.LocalRunner(devices if on_device else None)
    folder = scratch_dir or tempfile.mkdtemp(prefix="ntk_dist_eigh_")
    tol = tol if tol is not None else 1e3 * float(np.finfo(dtype).eps)
    meta = {"n": n, "dtype": dtype.name, "tile": tile, "memory_bound": memory_bound, "tol": tol}
    _open_scratch(folder, meta)
    two_stage_here = two_stage_blocks and not on_device and isinstance(runner, tl.LocalRunner)
    device = devices[0] if on_device else None
    ctx = _Context(folder, tile, dtype, memory_bound, tol, runner, device, progress, two_stage_here)
    ctx.write_columns = write_columns if write_rows is not None else None
    ctx.column_chunk = column_chunk
    a, sums = _input(ctx, read, n)
    ctx.scale = max(math.sqrt(sums["sumsq"]), float(np.finfo(dtype).tiny))
    info = _block(ctx, "r", n, sums, 0)
    w = np.load(os.path.join(folder, info["values"]))
    out = None
    if not info.get("written"):  # (if written, the columns ascend already)
        w, out = _assemble_vectors(ctx, info, w, a.grid[0], write_rows)
    if values_out is not None:
        values_out(w)
    shutil.rmtree(folder)
    return w, out


def _assemble_vectors(
    ctx: _Context,
    info: dict,
    w: np.ndarray,
    tile_rows: int,
    write_rows: Callable[[slice, np.ndarray], None] | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The root block's parts put together, eigenvalues ascending, block row by block row
    to ``write_rows`` (else into the returned array); the eigenvalues in that order."""
    n, tile, dtype = len(w), ctx.tile, ctx.dtype
    order = np.argsort(w, kind="stable")
    # column c of the parts goes to column position[c] of V (eigenvalues ascending)
    position = np.empty(n, int)
    position[order] = np.arange(n)
    out = None if write_rows is not None else np.empty((n, n), dtype)
    for i in range(tile_rows):
        rows = slice(i * tile, min(n, (i + 1) * tile))
        panel = np.empty((rows.stop - rows.start, n), dtype)
        col = 0
        for part, size in zip(info["parts"], info["sizes"], strict=True):
            where = position[col : col + size]
            if part == _IDENTITY:
                panel[:, where] = _identity_rows(rows, n, dtype)
            else:
                matrix = ctx.matrix(part, n, size)
                for j in range(matrix.grid[1]):  # a tile at a time
                    cols = where[j * tile : (j + 1) * tile]
                    tiles = matrix.read_tiles([(i, j)])
                    panel[:, cols] = tiles[0, : panel.shape[0], : len(cols)]
            col += size
        if out is not None:
            out[rows] = panel
        else:
            write_rows(rows, panel)
    return w[order], out
