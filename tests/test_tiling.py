"""TilePlan: coverage, symmetry, ragged blocks, order and budget-chosen sizes."""

import math

import numpy as np
import pytest

from ntk_dist.tiling import Tile, TilePlan, panel_order


def coverage(plan: TilePlan) -> np.ndarray:
    """How many times each kernel entry is produced by the plan (mirrors included)."""
    count = np.zeros(plan.kernel_shape, int)
    for t in plan:
        if plan.diagonal:
            count[t.rows] += 1
            continue
        count[t.rows, t.cols] += 1
        if t.mirrored:
            count[t.cols, t.rows] += 1
    return count


@pytest.mark.parametrize(
    "n1, n2, block",
    [(10, 7, (4, 3)), (8, 8, (4, 4)), (1, 5, (3, 2)), (9, 2, (100, 100))],
)
def test_rectangular_plans_cover_every_entry_once(n1, n2, block):
    plan = TilePlan(n1, n2, block)
    assert (coverage(plan) == 1).all()
    assert len(plan) == len(plan.tiles()) == math.prod(plan.grid)
    assert all(
        t.shape[0] <= plan.block_shape[0] and t.shape[1] <= plan.block_shape[1] for t in plan
    )
    assert not any(t.mirrored for t in plan)


def test_ragged_last_blocks():
    plan = TilePlan(10, 7, (4, 3))
    assert plan.grid == (3, 3)
    assert plan.tile(2, 2) == Tile(2, 2, 8, 10, 6, 7)
    assert plan.tile(2, 2).shape == (2, 1)
    assert plan.tile(2, 2).rows == slice(8, 10) and plan.tile(2, 2).cols == slice(6, 7)
    with pytest.raises(IndexError, match=r"\(3, 0\)"):
        plan.tile(3, 0)


@pytest.mark.parametrize("n, b", [(11, 4), (12, 4), (5, 5), (3, 1)])
def test_symmetric_plan_computes_upper_triangle_and_mirrors_the_rest(n, b):
    plan = TilePlan(n, n, (b, b), symmetric=True)
    nb = plan.grid[0]
    assert len(plan) == nb * (nb + 1) // 2 == len(plan.tiles())
    assert all(t.i <= t.j for t in plan)
    assert all(t.mirrored == (t.i != t.j) for t in plan)
    assert (coverage(plan) == 1).all()


def test_order_is_deterministic_and_row_major():
    a = TilePlan(11, 11, (3, 3), symmetric=True).tiles()
    b = TilePlan(11, 11, (3, 3), symmetric=True).tiles()
    assert a == b
    assert [(t.i, t.j) for t in a] == sorted((t.i, t.j) for t in a)


def test_diagonal_plan_has_only_diagonal_tiles_and_vector_shape():
    plan = TilePlan(10, 10, (4, 4), diagonal=True)
    assert [(t.i, t.j) for t in plan] == [(0, 0), (1, 1), (2, 2)]
    assert plan.kernel_shape == (10,) and plan.full_tile_shape == (4,)
    assert (coverage(plan) == 1).all()


def test_tiles_are_frozen_hashable_data():
    t = TilePlan(4, 4, (2, 2)).tile(0, 1)
    assert {t: 1}[Tile(0, 1, 0, 2, 2, 4)] == 1
    with pytest.raises(AttributeError):
        t.i = 3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n1=5, n2=6, block_shape=(2, 2), symmetric=True),
        dict(n1=6, n2=6, block_shape=(2, 3), symmetric=True),
        dict(n1=6, n2=5, block_shape=(2, 2), diagonal=True),
        dict(n1=6, n2=6, block_shape=(0, 2)),
        dict(n1=0, n2=6, block_shape=(2, 2)),
    ],
)
def test_inconsistent_plans_are_refused(kwargs):
    with pytest.raises(ValueError):
        TilePlan(**kwargs)


def cost(plan, per_example, entry, fixed, d):
    bm, bn = plan.block_shape
    r = math.ceil(bm / d)
    if plan.diagonal:
        return fixed + per_example * 2 * r + entry * r
    return fixed + per_example * (r + bn) + entry * r * bn


@pytest.mark.parametrize("d", [1, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_budget_blocks_fit_and_are_not_needlessly_small(d, symmetric):
    kw = dict(per_example_bytes=1000.0, entry_bytes=8.0, fixed_bytes=5000.0, n_devices=d)
    budget = 200_000
    plan = TilePlan.from_budget(5000, 5000, memory_budget=budget, symmetric=symmetric, **kw)
    bm, bn = plan.block_shape
    assert cost(plan, 1000, 8, 5000, d) <= budget
    assert bm % d == 0
    bigger = TilePlan(5000, 5000, (bm + d, bn + d))
    assert cost(bigger, 1000, 8, 5000, d) > budget
    if symmetric:
        assert bm == bn


def test_budget_with_a_small_side_spends_the_rest_on_the_other():
    plan = TilePlan.from_budget(
        10_000, 10, memory_budget=1_000_000, per_example_bytes=1000.0, entry_bytes=8.0
    )
    bm, bn = plan.block_shape
    assert bn == 10 and bm > 100
    assert 1000 * (bm + bn) + 8 * bm * bn <= 1_000_000


def test_budget_diagonal_plan_and_huge_budget_is_one_tile():
    plan = TilePlan.from_budget(
        50, 50, memory_budget=10**12, per_example_bytes=10.0, entry_bytes=8.0, diagonal=True
    )
    assert plan.block_shape == (50, 50) and len(plan) == 1


def test_too_small_budget_says_what_is_needed():
    with pytest.raises(ValueError, match="too small"):
        TilePlan.from_budget(10, 10, memory_budget=100, per_example_bytes=1000.0, entry_bytes=8)


def test_panel_order_groups_rows_and_snakes_columns():
    plan = TilePlan(7, 7, (2, 2), symmetric=True)
    order = [(t.i, t.j) for t in panel_order(reversed(plan.tiles()))]
    assert order == [
        (0, 0), (0, 1), (0, 2), (0, 3),
        (1, 3), (1, 2), (1, 1),
        (2, 2), (2, 3),
        (3, 3),
    ]  # fmt: skip
    missing = [plan.tile(0, 2), plan.tile(2, 3), plan.tile(1, 1)]
    assert [(t.i, t.j) for t in panel_order(missing)] == [(0, 2), (1, 1), (2, 3)]
