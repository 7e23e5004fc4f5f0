"""Band to tridiagonal by bulge chasing, compiled, with the reflectors kept in blocks.

Sweep ``i`` annihilates column ``i`` below its subdiagonal with a reflector of length
``b`` (the bandwidth); applied from both sides it fills a ``b x b`` block below the band,
whose first column the next reflector, ``b`` rows further down, annihilates, and so on
down the matrix (the "type 1/2" kernels of LAPACK's sb2st, one column at a time). Each
step touches ``b`` rows and columns; as numpy calls it costs ~58 us (b = 64), so the
whole loop runs as one XLA program per group of ``b`` sweeps (~11 us a step on a CPU
core, ~8 of them with the step's data in cache, the rest moving the band through the
cache once a sweep; ``N^2 / 2b`` steps in all; compiled once per process and size).

The band's lower triangle lives in strips of ``b`` rows, stacked as one ``(rows, 5b)``
array, wide enough for the fill; indices are shifted by ``2b`` so that the first strips
need no special case. At the start of a group strip ``K`` holds rows ``[Kb, Kb + b)`` at
columns ``[(K - 2) b, (K + 3) b)``. The strips follow the sweeps' rows: for sweep ``s``
of the group (from 1) strip ``K`` holds rows ``[Kb + s, Kb + s + b)``, each row joining
the strip above it (its columns moved right by ``b``) as the sweeps pass it, so that a
step reads one strip's rows (``b x 2b``: the last bulge and the diagonal block) and the
``b x b`` block below, without masking half of two strips. Only the lower triangle is
kept (the diagonal block's upper triangle is zero): the step applies its reflector from
the left to the bulge, from both sides to the diagonal block (``D v = L v + L^T v -
diag(L) v``) and from the right to the block below (14 ``b^2`` flops; both triangles
took 24).

The reflectors of a group of ``b`` sweeps at the same depth ``k`` (the ``k``-th step of
each sweep) overlap in rows ``[I + 1 + kb, I + kb + 2b)``; their product is one compact
WY block ``I - V T V^T``. Applying ``Q = H_first ... H_last`` to ``Z`` needs the groups
from the last to the first and, within a group, the depths in increasing order
(reflectors of other depths in between act on other rows: they commute).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["WIDTH", "ChaseGroup", "apply_groups", "tridiagonalize"]

WIDTH = 5  # a strip's width in bandwidths: its rows' band and fill, moved by up to b


@dataclass
class ChaseGroup:
    """The reflectors of sweeps ``[first, first + b)``: at depth ``k`` (the ``k``-th step of
    each sweep) sweep ``first + j``'s reflector ``I - tau u u^T`` has ``u`` on rows
    ``first + 1 + k b + j`` onwards; together ``I - V_k T_k V_k^T`` with ``V_k = v[k]`` of
    shape ``(2b - 1, b)`` (column ``j`` is ``u`` from row ``j``) and ``vt[k] = V_k T_k``
    (formed once, by the compiled sweeps: a gemm with ``T_k`` alone ran at half speed in
    every chunk)."""

    first: int
    v: np.ndarray  # (depths, 2b - 1, b)
    vt: np.ndarray  # (depths, 2b - 1, b)

    def apply(self, z: np.ndarray) -> None:
        """``z <- Q_group z`` in place (``z`` column-major, at least ``first + depths b + 2b``
        rows): as ``z^T <- z^T Q_group^T``, whose products keep ``z``'s layout."""
        b = self.v.shape[2]
        for k in range(self.v.shape[0]):
            rows = z[self.first + 1 + k * b : self.first + k * b + 2 * b].T
            rows -= (rows @ self.v[k]) @ self.vt[k].T


def _depths(n: int, b: int) -> int:
    """Most steps a sweep takes (the compiled loop's room for reflectors)."""
    return math.ceil(n / b) + 1


def _sweeps(n: int, b: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """First row (shifted by ``2b``) and number of steps of sweeps ``[first, first + b)``
    (none for sweeps past ``n - 3``): sweep ``i`` takes rows ``i + 1``, ``i + 1 + b``, ...
    while the row before has more than ``b`` rows below it."""
    start, steps = np.zeros(b, np.int32), np.zeros(b, np.int32)
    for j, i in enumerate(range(first, min(first + b, n - 2))):
        start[j], steps[j] = i + 1 + 2 * b, max(1, math.ceil((n - i - 1 - b) / b) + 1)
    return start, steps


def _at(*index: int | jax.Array) -> tuple[jax.Array, ...]:
    """Start indices of one integer type, as ``dynamic_slice`` requires."""
    return tuple(jnp.asarray(i, jnp.int32) for i in index)


def _reflector(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``v`` (``v[0] = 1``) and ``tau`` with ``(I - tau v v^T) x = beta e_0``; identity if
    ``x`` has nothing below its first entry."""
    alpha, below = x[0], jnp.dot(x[1:], x[1:])
    norm = jnp.sqrt(alpha * alpha + below)
    beta = jnp.where(alpha >= 0, -norm, norm)
    active = below > 0
    scale = jnp.where(active, alpha - beta, 1.0)
    v = jnp.where(active, x / scale, 0.0).at[0].set(1.0)
    return v, jnp.where(active, (beta - alpha) / beta, 0.0)


def _compact_t(gram: jax.Array, taus: jax.Array) -> jax.Array:
    """``T`` (batched, upper triangular) with ``H_1 ... H_m = I - V T V^T`` from ``V^T V``
    and the ``tau``: halves recursively, ``T_12 = -T_1 (V_1^T V_2) T_2``."""
    m = taus.shape[-1]
    if m == 1:
        return taus[..., None]
    h = m // 2
    t1, t2 = _compact_t(gram[:, :h, :h], taus[:, :h]), _compact_t(gram[:, h:, h:], taus[:, h:])
    t12 = -(t1 @ gram[:, :h, h:]) @ t2
    return jnp.concatenate(
        [jnp.concatenate([t1, t12], 2), jnp.concatenate([jnp.zeros_like(t12.mT), t2], 2)], 1
    )


def _compact_wy(blocks: jax.Array, taus: jax.Array) -> jax.Array:
    """``V_k T_k`` for each depth's ``V_k`` (``blocks[k]``) and ``taus[k]``. In the compiled
    program: numpy's products (or XLA's triangular solve, which calls scipy's BLAS) would
    wake OpenBLAS's threads, whose spinning afterwards took the core the sweeps run on."""
    return blocks @ _compact_t(jnp.swapaxes(blocks, 1, 2) @ blocks, taus)


@functools.lru_cache(maxsize=8)
def _group_program(n: int, b: int, dtype: str) -> Callable:
    """The compiled sweeps of one group: ``(strips, start, steps) -> (strips, V, V T)``
    with each sweep's first row and number of steps (the blocks of :class:`ChaseGroup`,
    for the greatest number of steps)."""
    depths = _depths(n, b)

    def step(d: jax.Array, carry: tuple, j: jax.Array, start: jax.Array) -> tuple:
        strips, blocks, taus = carry
        s, pg = j + 1, start + d * b  # this sweep's strips start at rows = s mod b
        # rows [pg, pg + b), columns [pg - b, pg + b): the bulge and the diagonal block
        top = jax.lax.dynamic_slice(strips, _at(pg, s + b), (b, 2 * b))
        col = jnp.where(d == 0, b - 1, 0)  # column i of sweep i, else the last bulge's first
        v, tau = _reflector(jax.lax.dynamic_index_in_dim(top, col, axis=1, keepdims=False))
        # the diagonal block is kept lower triangular (zeros above): D v = L v + L^T v - diag
        lower, diag = jnp.tri(b, dtype=bool), top[:, b:]
        vtop = v @ top
        w = tau * (diag @ v + vtop[b:] - jnp.diagonal(diag) * v)
        w = w - (0.5 * tau * (v @ w)) * v
        bulge = top[:, :b] - tau * jnp.outer(v, vtop[:b])
        diag = jnp.where(lower, diag - jnp.outer(v, w) - jnp.outer(w, v), 0.0)
        strips = jax.lax.dynamic_update_slice(
            strips, jnp.concatenate([bulge, diag], axis=1), _at(pg, s + b)
        )
        # rows [pg + b, pg + 2b), columns [pg, pg + b): the reflector from the right makes
        # the next bulge (read after the write above: a write computed from a read elsewhere
        # in the same array makes XLA copy it whole)
        below = jax.lax.dynamic_slice(strips, _at(pg + b, s + b), (b, b))
        below = below - tau * jnp.outer(below @ v, v)
        strips = jax.lax.dynamic_update_slice(strips, below, _at(pg + b, s + b))
        blocks = jax.lax.dynamic_update_slice(blocks, v[None, :, None], _at(d, j, j))
        return strips, blocks, taus.at[d, j].set(tau)

    def sweep(j: jax.Array, carry: tuple, start: jax.Array, steps: jax.Array) -> tuple:
        strips, blocks, taus = carry
        # row j of every strip joins the strip above it: its columns move right by b
        rows = strips.reshape(-1, b, WIDTH * b)
        moved = jax.lax.dynamic_index_in_dim(rows, j, axis=1)
        moved = jnp.concatenate([jnp.zeros_like(moved[..., :b]), moved[..., :-b]], axis=-1)
        strips = jax.lax.dynamic_update_index_in_dim(rows, moved, j, axis=1).reshape(strips.shape)
        body = functools.partial(step, j=j, start=start[j])
        return jax.lax.fori_loop(0, steps[j], body, (strips, blocks, taus))

    def group(strips: jax.Array, start: jax.Array, steps: jax.Array) -> tuple:
        blocks = jnp.zeros((depths, 2 * b - 1, b), strips.dtype)  # the V_k
        taus = jnp.zeros((depths, b), strips.dtype)
        body = functools.partial(sweep, start=start, steps=steps)
        strips, blocks, taus = jax.lax.fori_loop(0, b, body, (strips, blocks, taus))

        # every row has joined the strip above: back to the strips that start at multiples of
        # b, a strip at a time (in place; a shift of the whole array would copy it)
        def back(k: jax.Array, strips: jax.Array) -> jax.Array:
            rows = jax.lax.dynamic_slice_in_dim(strips, k * b, b)
            rows = jnp.concatenate([rows[:, b:], jnp.zeros_like(rows[:, :b])], axis=1)
            return jax.lax.dynamic_update_slice_in_dim(strips, rows, k * b, axis=0)

        strips = jax.lax.fori_loop(0, strips.shape[0] // b, back, strips)
        return strips, blocks, _compact_wy(blocks, taus)

    return jax.jit(group, donate_argnums=0)


def _to_strips(ab: np.ndarray) -> np.ndarray:
    """Lower band storage ``(b + 1) x n`` -> strips (see the module docstring)."""
    b, n = ab.shape[0] - 1, ab.shape[1]
    count = math.ceil((n + 2 * b) / b) + 4
    strips = np.zeros((count, b, WIDTH * b), ab.dtype)
    for d in range(b + 1):
        cols = np.arange(n - d)
        rg, cg = cols + d + 2 * b, cols + 2 * b
        strips[rg // b, rg % b, cg - (rg // b - 2) * b] = ab[d, cols]
    return strips


def _diagonals(strips: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal and subdiagonal of the band held in strips that start at multiples of b."""
    b = strips.shape[1]
    rows = np.arange(n) + 2 * b
    strip, within = rows // b, rows % b
    d = strips[strip, within, rows - (strip - 2) * b]
    e = strips[strip[1:], within[1:], rows[1:] - 1 - (strip[1:] - 2) * b]
    return d, e


def _group(first: int, depths: int, v: jax.Array, vt: jax.Array) -> ChaseGroup:
    return ChaseGroup(first, np.asarray(v)[:depths], np.asarray(vt)[:depths])


def tridiagonalize(ab: np.ndarray) -> tuple[np.ndarray, np.ndarray, Iterator[ChaseGroup]]:
    """Diagonal and subdiagonal of ``Q^T B Q`` for the band matrix ``ab`` (LAPACK's lower
    band storage), and ``Q``'s reflectors as :class:`ChaseGroup` s, first to last.

    The groups are produced as the sweeps run (a generator, to be consumed before ``d``
    and ``e`` are read: they are filled in when it is exhausted), so that a caller can
    write each group to disk and never hold all of them (``n^2 / 2`` numbers)."""
    b, n = ab.shape[0] - 1, ab.shape[1]
    d, e = np.empty(n, ab.dtype), np.empty(max(n - 1, 0), ab.dtype)

    def groups() -> Iterator[ChaseGroup]:
        strips = _to_strips(ab)
        strips = jax.device_put(strips.reshape(-1, WIDTH * b))  # the host copy goes
        if b > 1:
            program = _group_program(n, b, ab.dtype.name)
            last = None
            for first in range(0, max(n - 2, 0), b):
                start, steps = _sweeps(n, b, first)
                # dispatched, not awaited: the sweeps run while the caller keeps the last group
                strips, v, vt = program(strips, jnp.asarray(start), jnp.asarray(steps))
                if last is not None:
                    yield _group(*last)
                last = (first, int(steps[0]), v, vt)
            if last is not None:
                yield _group(*last)
        d[:], e[:] = _diagonals(np.asarray(strips).reshape(-1, b, WIDTH * b), n)

    return d, e, groups()


def apply_groups(z: np.ndarray, groups: Callable[[int], ChaseGroup], count: int) -> None:
    """``z <- Q z`` in place for the chase's ``Q``; ``groups(g)`` gives the ``g``-th group
    (from disk, say), ``z`` is column-major, padded with ``3 b`` zero rows below."""
    for g in reversed(range(count)):
        groups(g).apply(z)
