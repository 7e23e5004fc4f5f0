"""Two-stage tridiagonalisation for the out-of-core eigh on the host, against numpy LAPACK.

The bulge chase (ntk_dist.linalg.chase) is checked by forming its Q densely: orthogonal,
and Q^T B Q equal to the tridiagonal matrix it returns, whose eigenvalues are B's
(numpy's eigvalsh). two_stage_eigh and the eigh that uses it are checked as every
eigh here: residual, orthogonality and eigenvalues against LAPACK.
"""

import json
import os

import numpy as np
import pytest
from linalg_helpers import store_kernel
from test_linalg_eigh_out_of_core import check, clustered

from ntk_dist.linalg import StoredKernelOperator, chase, mrrr, two_stage
from ntk_dist.linalg import tiled as tl
from ntk_dist.linalg.factor_store import FactorStore
from ntk_dist.linalg.qdwh import divide_and_conquer_eigh
from ntk_dist.linalg.tridiagonal import HOST_LEAF_COPIES
from ntk_dist.store import KernelStore


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
    q = np.zeros((n + 3 * b, n), order="F")
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


def relative_gaps(w):
    return np.diff(w) / np.maximum(np.abs(w[1:]), np.abs(w[:-1]))


def test_chunks_end_at_the_widest_gap_within_reach():
    w = np.concatenate([np.linspace(1, 2, 60), np.linspace(3, 4, 40)])  # a gap after 60
    assert two_stage.chunk_bounds(relative_gaps(w), 70) == [0, 60, 100]
    bounds = two_stage.chunk_bounds(relative_gaps(np.linspace(1, 2, 100)), 30)  # no gap
    assert bounds[0] == 0 and bounds[-1] == 100
    assert all(0 < hi - lo <= 30 for lo, hi in zip(bounds, bounds[1:], strict=False))
    assert len(bounds) == 5
    assert two_stage.chunk_bounds(relative_gaps(np.arange(1.0, 4.0)), 1) == [0, 1, 2, 3]
    # an infinite gap (between blocks of a split tridiagonal matrix) is the widest
    gaps = np.r_[np.full(30, 1e-3), np.inf, np.full(30, 1e-3)]
    assert two_stage.chunk_bounds(gaps, 40) == [0, 31, 62]


def test_chunks_end_on_multiples_of_the_alignment_where_the_gap_is_safe():
    gaps = relative_gaps(np.linspace(1, 2, 1000))  # all ~1e-3
    assert two_stage.chunk_bounds(gaps, 420, 128, 1e-4) == [0, 384, 768, 1000]
    assert two_stage.chunk_bounds(gaps, 400, 400, 1e-4) == [0, 400, 800, 1000]
    # unsafe everywhere but at 300: the widest gap, as without alignment
    narrow = np.full(999, 1e-6)
    narrow[299] = 1e-5
    assert two_stage.chunk_bounds(narrow, 420, 128, 1e-4)[:2] == [0, 300]
    narrow[255] = 1e-4  # boundary 256, safe
    assert two_stage.chunk_bounds(narrow, 420, 128, 1e-4)[:2] == [0, 256]


class Chunks:
    """A two-stage sink that keeps every chunk: each column written once, in order."""

    alignment = 1

    def __init__(self, n):
        self.v, self.chunks, self.values = np.full((n, n), np.nan), 0, None

    def start(self, values):
        assert self.values is None and self.chunks == 0
        self.values = values.copy()

    def write(self, first, vectors):
        assert vectors.shape[0] == len(self.v) and vectors.strides[0] == vectors.itemsize
        assert np.isnan(self.v[:, first:]).all() and not np.isnan(self.v[:, :first]).any()
        self.v[:, first : first + vectors.shape[1]] = vectors
        self.chunks += 1


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

    sink = Chunks(n)
    w = two_stage.two_stage_eigh(work, str(tmp_path / "r"), bandwidth, bound, sink)
    assert sink.chunks >= 2 and not (tmp_path / "r").exists()
    np.testing.assert_allclose(sink.values, w, rtol=0, atol=1e-8 * np.abs(w).max())
    order = np.argsort(w)
    check(a, w[order], sink.v[:, order])


def test_a_cluster_wider_than_a_chunk_stays_orthogonal(tmp_path):
    # 90 eigenvalues within 1e-12, chunks of ~25 columns: MRRR makes the cut clusters'
    # vectors whole (the same vectors as in one call), so they meet across chunks at ~eps
    n, tile = 120, 40
    values = np.repeat([1.0, 2.0], [90, 30]) + 1e-12 * np.random.default_rng(0).random(n)
    a = clustered(n, values)
    work = tl.Tiled(str(tmp_path / "a"), n, n, tile, "float64").create()
    work.write_region(slice(None), slice(None), a)

    sink = Chunks(n)
    w = two_stage.two_stage_eigh(work, str(tmp_path / "r"), 8, 40 * n * 8 * 3, sink)
    assert sink.chunks >= 3 and not (tmp_path / "r").exists()
    order = np.argsort(w)
    check(a, w[order], sink.v[:, order])


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


@pytest.mark.parametrize("larrv_fails", [False, True])
def test_a_tight_cluster_goes_two_stage_unless_mrrr_fails(tmp_path, monkeypatch, larrv_fails):
    # 200 eigenvalues within 1e-12 of each other, chunks of ~40 columns: two-stage (MRRR
    # keeps the vectors orthogonal across chunks); if LAPACK's larrv reports a failure
    # (injected: no matrix known here makes it fail), the block falls back to QDWH's
    # split from the exact spectrum
    n = 260
    values = np.concatenate([np.ones(200) + 1e-12 * np.arange(200), np.linspace(2, 3, 60)])
    a = clustered(n, values, seed=3)
    if larrv_fails:

        def failing(self, lo, hi, out):
            raise mrrr.MRRRError(f"LAPACK larrv: info -2 for eigenvectors {lo}..{hi - 1}")

        monkeypatch.setattr(mrrr.Tridiagonal, "vectors", failing)
    scratch = tmp_path / "scratch"
    methods, seen = split_methods(scratch)
    bound = int(HOST_LEAF_COPIES * 90 * 90 * 8)
    w, v = divide_and_conquer_eigh(
        lambda r, c: a[r, c], n, np.float64, 32, bound, scratch_dir=str(scratch), progress=seen
    )
    if larrv_fails:
        assert methods[0] == "two-stage" and len(methods) >= 2 and methods[1] != "two-stage"
    else:
        assert methods == ["two-stage"]
    check(a, w, v)


def test_a_gapless_store_gets_its_eigenvectors_written_straight_as_columns(tmp_path):
    # the whole matrix two-stage: its chunks go straight into the stored eigenvectors (a
    # ledger entry for each column range; no parts, no assembly), ending on the edges of
    # the store's chunks; they count as complete only while the ranges cover every column
    n = 400
    a = clustered(n, SPECTRA["spread"](n), seed=2)
    store = store_kernel(tmp_path / "k", a, block=64)
    bound = 1_900_000  # out of core (1.5 n^2 x 8 bytes do not fit), chunks of 65 columns
    op = StoredKernelOperator(store, memory_bound=bound)
    eig = op.eigh()
    check(a, np.asarray(eig.values), eig.vectors_dense())
    vectors = FactorStore.open(store, op.factor_name("eigenvectors"))
    ranges = sorted(tuple(map(int, k.split("_")[1:])) for k in vectors.done())
    assert len(ranges) >= 2 and all(k.startswith("cols_") for k in vectors.done())
    assert [lo for lo, _ in ranges] == [0] + [hi for _, hi in ranges[:-1]] and ranges[-1][1] == n
    width = vectors.array.chunk_layout.write_chunk.shape[1]  # whole chunks: the gaps allow
    assert width < n and all(hi % width == 0 for _, hi in ranges[:-1])
    again = StoredKernelOperator(KernelStore.open(tmp_path / "k"), memory_bound=bound)
    again.eigh()
    assert again.reused == {"eigh": 1} and again.factorizations == {}
    lo, hi = ranges[1]  # as if killed before that range was recorded
    os.remove(os.path.join(vectors.path, "ntk_dist_tiles", f"cols_{lo}_{hi}.json"))
    third = StoredKernelOperator(KernelStore.open(tmp_path / "k"), memory_bound=bound)
    check(a, np.asarray(third.eigh().values), third.eigh().vectors_dense())
    assert third.factorizations == {"eigh": 1}


@pytest.mark.parametrize("width", [1e-14, 0.0])
def test_a_tight_cluster_written_straight_as_columns_ascends(width):
    # 200 eigenvalues within 1e-14 (or equal: the tridiagonal matrix may split, and its
    # blocks' eigenvalues do not ascend across them: then part files and the assembly),
    # chunks cut inside the cluster: the columns written ascend with the values returned
    n = 260
    values = np.concatenate([np.ones(200) + width * np.arange(200), np.linspace(2, 3, 60)])
    a = clustered(n, values, seed=3)
    v = np.full((n, n), np.nan)
    how = set()

    def rows(r, panel):
        v[r] = panel
        how.add("rows")

    def columns(c, block):
        v[:, c] = block
        how.add("columns")

    bound = int(HOST_LEAF_COPIES * 90 * 90 * 8)
    w, _ = divide_and_conquer_eigh(
        lambda r, c: a[r, c], n, np.float64, 32, bound, write_rows=rows,
        write_columns=columns, column_chunk=32,
    )  # fmt: skip
    assert len(how) == 1 and (how == {"columns"} or width == 0.0)
    assert (np.diff(w) >= 0).all()
    check(a, w, v)
