"""Cut a kernel over (x1, x2) into rectangular tiles.

A :class:`TilePlan` is pure bookkeeping: a block grid over ``(n1, n2)``, which
tiles must be computed (all, the upper triangle when ``x2`` is ``x1``, or only
the diagonal for a diagonal-over-batch kernel) and in which order. Block shapes
are given explicitly or chosen from a per-device memory budget. No JAX here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["Tile", "TilePlan", "panel_order"]


@dataclass(frozen=True, order=True)
class Tile:
    """One block of the kernel: block indices and the example ranges it covers.

    ``rows`` index x1 (and the kernel's first axis), ``cols`` index x2. For a
    symmetric plan an off-diagonal tile is also stored, transposed, at (j, i):
    ``mirrored`` says so.
    """

    i: int
    j: int
    row_start: int
    row_stop: int
    col_start: int
    col_stop: int
    mirrored: bool = False

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_stop)

    @property
    def cols(self) -> slice:
        return slice(self.col_start, self.col_stop)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.row_stop - self.row_start, self.col_stop - self.col_start)


@dataclass(frozen=True)
class TilePlan:
    """Block grid over an ``(n1, n2)`` kernel.

    Args:
      n1, n2: number of examples in x1 and x2.
      block_shape: ``(rows, cols)`` of a full tile; last blocks may be smaller.
      symmetric: x2 is x1; only tiles with ``i <= j`` are computed and each
        off-diagonal one is mirrored. Needs ``n1 == n2`` and square blocks.
      diagonal: the kernel is diagonal over the batch axis (``diagonal_axes``
        contains 0); only tiles ``(i, i)`` exist and the result is ``(n, ...)``.
    """

    n1: int
    n2: int
    block_shape: tuple[int, int]
    symmetric: bool = False
    diagonal: bool = False

    def __post_init__(self) -> None:
        bm, bn = self.block_shape
        if self.n1 < 1 or self.n2 < 1:
            raise ValueError(
                f"need at least one example on each side, got n1={self.n1}, n2={self.n2}"
            )
        if bm < 1 or bn < 1:
            raise ValueError(f"block shape must be positive, got {self.block_shape}")
        if (self.symmetric or self.diagonal) and (self.n1 != self.n2 or bm != bn):
            what = "symmetric" if self.symmetric else "diagonal-over-batch"
            raise ValueError(
                f"a {what} plan needs n1 == n2 and square blocks, got n=({self.n1}, "
                f"{self.n2}) and block_shape={self.block_shape}"
            )
        # Clamp to the data so that a huge requested block means "one tile".
        object.__setattr__(self, "block_shape", (min(bm, self.n1), min(bn, self.n2)))

    @classmethod
    def from_budget(
        cls,
        n1: int,
        n2: int,
        *,
        memory_budget: int,
        per_example_bytes: float,
        entry_bytes: float,
        fixed_bytes: float = 0,
        n_devices: int = 1,
        symmetric: bool = False,
        diagonal: bool = False,
    ) -> TilePlan:
        """Largest blocks whose per-device working set fits ``memory_budget`` bytes.

        The cost model of one tile of ``bm x bn`` examples, rows split over
        ``n_devices``, with ``r = ceil(bm / n_devices)`` rows per device, is::

          fixed_bytes + per_example_bytes * (r + bn) + entry_bytes * r * bn

        (``r`` alone for the output of a diagonal plan). ``per_example_bytes`` is
        what the implementation holds per example (Jacobian rows, NTK-vector
        products, activations), ``entry_bytes`` the bytes of one (x1, x2) kernel
        entry (itemsize times the non-batch output size) and ``fixed_bytes``
        what does not scale with the block (replicated params).
        """
        if memory_budget <= 0 or per_example_bytes < 0 or entry_bytes <= 0:
            raise ValueError(
                f"memory_budget and entry_bytes must be positive and per_example_bytes "
                f">= 0, got {memory_budget}, {entry_bytes}, {per_example_bytes}"
            )
        d = max(1, int(n_devices))
        avail = memory_budget - fixed_bytes

        def cost(bm: int, bn: int) -> float:
            r = math.ceil(bm / d)
            if diagonal:
                return per_example_bytes * 2 * r + entry_bytes * r
            return per_example_bytes * (r + bn) + entry_bytes * r * bn

        if cost(1, 1) > avail:
            raise ValueError(
                f"memory_budget={memory_budget} bytes is too small: even a 1x1 tile needs "
                f"about {int(cost(1, 1) + fixed_bytes)} bytes per device; raise the budget"
            )
        square = symmetric or diagonal
        if diagonal:
            b = _largest(lambda b: cost(b, b) <= avail, n1)
            return cls(n1, n2, _round_to_devices(b, b, n1, d, square), symmetric, diagonal)
        b = _largest(lambda b: cost(b, b) <= avail, max(n1, n2))
        bm, bn = min(b, n1), min(b, n2)
        if not square:
            # One side exhausted: spend the rest of the budget on the other.
            if bn == n2:
                bm = _largest(lambda m: cost(m, bn) <= avail, n1)
            elif bm == n1:
                bn = _largest(lambda m: cost(bm, m) <= avail, n2)
        return cls(n1, n2, _round_to_devices(bm, bn, n1, d, square), symmetric, diagonal)

    @property
    def grid(self) -> tuple[int, int]:
        """Number of block rows and block columns."""
        bm, bn = self.block_shape
        return (math.ceil(self.n1 / bm), math.ceil(self.n2 / bn))

    def tile(self, i: int, j: int) -> Tile:
        """The tile at block (i, j), whether or not the plan computes it."""
        nb1, nb2 = self.grid
        if not (0 <= i < nb1 and 0 <= j < nb2):
            raise IndexError(f"block ({i}, {j}) is outside the {nb1}x{nb2} grid")
        bm, bn = self.block_shape
        return Tile(
            i,
            j,
            i * bm,
            min((i + 1) * bm, self.n1),
            j * bn,
            min((j + 1) * bn, self.n2),
            mirrored=self.symmetric and i != j,
        )

    def __iter__(self) -> Iterator[Tile]:
        """Tiles to compute, row-major (i, then j); deterministic."""
        nb1, nb2 = self.grid
        for i in range(nb1):
            if self.diagonal:
                yield self.tile(i, i)
                continue
            for j in range(i if self.symmetric else 0, nb2):
                yield self.tile(i, j)

    def tiles(self) -> list[Tile]:
        return list(self)

    def __len__(self) -> int:
        nb1, nb2 = self.grid
        if self.diagonal:
            return nb1
        if self.symmetric:
            return nb1 * (nb1 + 1) // 2
        return nb1 * nb2

    @property
    def full_tile_shape(self) -> tuple[int, ...]:
        """Leading shape of a full-size tile's kernel: (bm, bn), or (b,) if diagonal."""
        bm, bn = self.block_shape
        return (bm,) if self.diagonal else (bm, bn)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """Leading shape of the whole kernel: (n1, n2), or (n,) if diagonal."""
        return (self.n1,) if self.diagonal else (self.n1, self.n2)


def panel_order(tiles: Iterable[Tile]) -> list[Tile]:
    """Tiles grouped in row panels (ascending i), columns alternating direction per panel.

    Each row block is then needed in one stretch, and the column blocks last used by
    one panel are the first the next panel needs (what a small cache of them keeps).
    """
    panels: dict[int, list[Tile]] = {}
    for t in tiles:
        panels.setdefault(t.i, []).append(t)
    out: list[Tile] = []
    for k, i in enumerate(sorted(panels)):
        out += sorted(panels[i], key=lambda t: t.j, reverse=k % 2 == 1)
    return out


def _largest(fits, upper: int) -> int:
    """Largest b in [1, upper] with fits(b) (fits is monotone decreasing); 1 if none."""
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _round_to_devices(bm: int, bn: int, n1: int, d: int, square: bool) -> tuple[int, int]:
    """Round a partial row block down to a multiple of the device count (less padding)."""
    if d <= bm < n1:
        bm -= bm % d
    return (bm, bm) if square else (bm, bn)
