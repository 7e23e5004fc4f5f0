"""Two-stage tridiagonalisation for the out-of-core eigh on the host, against numpy LAPACK.

The bulge chase (ntk_dist.linalg.chase) is checked by forming its Q densely: orthogonal,
and Q^T B Q equal to the tridiagonal matrix it returns, whose eigenvalues are B's
(numpy's eigvalsh). two_stage_eigh and the eigh that uses it are checked as every
eigh here: residual, orthogonality and eigenvalues against LAPACK.
"""

import json

import numpy as np
import pytest
from test_linalg_eigh_out_of_core import check, clustered

from ntk_dist.linalg import chase, two_stage
from ntk_dist.linalg import tiled as tl
from ntk_dist.linalg.qdwh import divide_and_conquer_eigh
from ntk_dist.linalg.tridiagonal import HOST_LEAF_COPIES


def band_matrix(n, b, seed=0):
    """A random symmetric matrix of bandwidth b and its lower band storage."""
    g = np.random.default_rng(seed).standard_normal((n, n))
    a = np.triu(np.tril(g + g.T, b), -b) / 2
    ab = np.zeros((b + 1, n))
    for d in range(min(b, n - 1) + 1):
        ab[d, : n - d] = np.diagonal(a, -d)
    return a, ab


@pytest.mark.parametrize(
    "n, b", [(1, 3), (2, 3), (3, 1), (10, 4), (50, 4), (64, 16), (301, 7), (257, 64), (40, 60)]
)
def test_chase_gives_an_orthogonal_similarity_to_a_tridiagonal_matrix(n, b):
    # ragged n, a band as wide as the matrix, already tridiagonal, tiny matrices
    a, ab = band_matrix(n, b)
    d, e, groups = chase.tridiagonalize(ab)
    kept = list(groups)
    q = np.zeros((n + 3 * b, n))
    q[:n] = np.eye(n)
    chase.apply_groups(q, lambda g: kept[g], len(kept))
    assert not q[n:].any()  # the blocks reach past the matrix only over zero rows
    q = q[:n]
    tri = np.diag(d) + np.diag(e, -1) + np.diag(e, 1)
    norm = max(np.linalg.norm(a), 1.0)
    assert np.linalg.norm(q.T @ q - np.eye(n)) <= 1e-13 * n
    assert np.linalg.norm(q.T @ a @ q - tri) <= 1e-14 * n * norm
    np.testing.assert_allclose(
        np.linalg.eigvalsh(tri), np.linalg.eigvalsh(a), rtol=0, atol=1e-13 * n * norm
    )


def test_chunks_end_at_the_widest_gap_within_reach():
    w = np.concatenate([np.linspace(1, 2, 60), np.linspace(3, 4, 40)])  # a gap after 60
    assert two_stage.chunk_bounds(w, 70) == [0, 60, 100]
    bounds = two_stage.chunk_bounds(np.linspace(1, 2, 100), 30)  # no gap: full chunks
    assert bounds[0] == 0 and bounds[-1] == 100
    assert all(0 < hi - lo <= 30 for lo, hi in zip(bounds, bounds[1:], strict=False))
    assert len(bounds) == 5
    assert two_stage.chunk_bounds(np.arange(3.0), 1) == [0, 1, 2, 3]


def test_stein_calls_end_at_every_safe_gap_and_split_clusters_at_gaps():
    # eigenvalues 1e-3 of the radius apart need no orthogonalising: one call each
    assert two_stage.stein_calls(np.linspace(1, 10, 50), 8) == list(range(51))
    # two tight clusters 1 apart (gaps 1e-7): each in calls of <= 8, split at its widest gap
    rng = np.random.default_rng(0)
    first, second = 1 + np.sort(rng.random(12)) * 1e-5, 2 + np.sort(rng.random(5)) * 1e-5
    w = np.concatenate([first, second])
    bounds = two_stage.stein_calls(w, 8)
    assert all(0 < hi - lo <= 8 for lo, hi in zip(bounds, bounds[1:], strict=False))
    assert bounds == [*two_stage.chunk_bounds(first, 8), 17]
    assert len(bounds) == 4  # 0, inside the first cluster, between the clusters, the end
    assert two_stage.stein_calls(np.zeros(20), 8) == two_stage.chunk_bounds(np.zeros(20), 8)


SPECTRA = {
    "spread": lambda n: np.linspace(1.0, 10.0, n),
    "power law": lambda n: 1.0 / np.arange(1, n + 1) + 1e-4,
    "indefinite": lambda n: np.linspace(-3.0, 2.0, n) ** 3,
}


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize(
    "n, tile, bandwidth, bound", [(300, 64, 16, 300 * 300 * 4), (203, 48, 7, 10**5)]
)
def test_two_stage_eigh_matches_lapack_in_chunks(tmp_path, spectrum, n, tile, bandwidth, bound):
    # half the matrix (a few chunks), and a bound that leaves chunks of a few columns
    a = clustered(n, SPECTRA[spectrum](n), seed=1)
    work = tl.Tiled(str(tmp_path / "a"), n, n, tile, "float64").create()
    work.write_region(slice(None), slice(None), a)
    g = work.grid[0]
    upper = [(i, j) for i in range(g) for j in range(i + 1, g)]
    work.write_tiles(upper, [np.full((tile, tile), np.nan)] * len(upper))  # never read

    def part(j, cols):
        return tl.Tiled(str(tmp_path / f"v{j}"), n, cols, tile, "float64").create()

    parts, w = two_stage.two_stage_eigh(work, str(tmp_path / "r"), bandwidth, bound, part)
    assert len(parts) >= 2 and not (tmp_path / "r").exists()
    v = np.hstack([p.read_region(slice(None), slice(None)) for p in parts])
    order = np.argsort(w)
    check(a, w[order], v[:, order])


def test_a_cluster_wider_than_a_chunk_is_refused_with_its_eigenvalues(tmp_path):
    n, tile = 120, 40
    values = np.repeat([1.0, 2.0], [90, 30]) + 1e-12 * np.random.default_rng(0).random(n)
    a = clustered(n, values)
    work = tl.Tiled(str(tmp_path / "a"), n, n, tile, "float64").create()
    work.write_region(slice(None), slice(None), a)

    def part(j, cols):
        return tl.Tiled(str(tmp_path / f"v{j}"), n, cols, tile, "float64").create()

    with pytest.raises(two_stage.ChunksNotOrthogonalError) as raised:
        two_stage.two_stage_eigh(work, str(tmp_path / "r"), 8, 40 * n * 8 * 3, part)
    np.testing.assert_allclose(raised.value.eigenvalues, np.sort(values), rtol=0, atol=1e-13)
    assert not (tmp_path / "r").exists()


def split_methods(scratch):
    methods = []

    def seen(key):
        if key.startswith("split_"):
            with open(scratch / "ledger" / f"{key}.json") as f:
                methods.append(json.load(f)["method"])

    return methods, seen


@pytest.mark.parametrize("spectrum", ["spread", "power law"])
def test_gapless_blocks_go_two_stage(tmp_path, spectrum):
    n, leaf = 400, 150
    a = clustered(n, SPECTRA[spectrum](n), seed=2)
    scratch = tmp_path / "scratch"
    methods, seen = split_methods(scratch)
    bound = int(HOST_LEAF_COPIES * leaf * leaf * 8)
    w, v = divide_and_conquer_eigh(
        lambda r, c: a[r, c], n, np.float64, 64, bound, scratch_dir=str(scratch), progress=seen
    )
    assert methods == ["two-stage"]
    check(a, w, v)


@pytest.mark.parametrize("bulk, first", [("flat", "reflector"), ("spread", "two-stage")])
def test_outliers_split_off_only_over_a_flat_bulk(tmp_path, bulk, first):
    # 8 outliers over a bulk at 1 (what remains is 1 * I: done at once) or spread over
    # [1, 2] (what remains would need a two-stage eigh anyway: the whole block goes)
    n = 400
    rest = np.ones(n - 8) if bulk == "flat" else np.linspace(1.0, 2.0, n - 8)
    a = clustered(n, np.concatenate([rest, 100.0 + np.arange(8.0)]), seed=4)
    scratch = tmp_path / "scratch"
    methods, seen = split_methods(scratch)
    bound = int(HOST_LEAF_COPIES * 150 * 150 * 8)
    w, v = divide_and_conquer_eigh(
        lambda r, c: a[r, c], n, np.float64, 64, bound, scratch_dir=str(scratch), progress=seen
    )
    assert methods[0] == first
    check(a, w, v)


def test_a_cluster_wider_than_a_chunk_takes_qdwh_from_the_exact_spectrum(tmp_path):
    # 200 eigenvalues within 1e-12 of each other, chunks of ~40 columns: stein's vectors
    # of separate chunks are not orthogonal there, so the block falls back to QDWH's split
    n = 260
    values = np.concatenate([np.ones(200) + 1e-12 * np.arange(200), np.linspace(2, 3, 60)])
    a = clustered(n, values, seed=3)
    scratch = tmp_path / "scratch"
    methods, seen = split_methods(scratch)
    bound = int(HOST_LEAF_COPIES * 90 * 90 * 8)
    w, v = divide_and_conquer_eigh(
        lambda r, c: a[r, c], n, np.float64, 32, bound, scratch_dir=str(scratch), progress=seen
    )
    assert methods[0] == "two-stage" and len(methods) >= 2 and methods[1] != "two-stage"
    check(a, w, v)
