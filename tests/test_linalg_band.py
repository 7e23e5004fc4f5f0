"""Exact eigenvalues out of core by reduction to band form, against numpy LAPACK."""

import json

import numpy as np
import pytest

from ntk_dist.linalg import tiled as tl
from ntk_dist.linalg.band import BANDWIDTH, band_eigenvalues, bandwidth_for
from ntk_dist.linalg.qdwh import divide_and_conquer_eigh
from ntk_dist.linalg.tridiagonal import HOST_LEAF_COPIES


def with_spectrum(n, values, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    a = (q * np.asarray(values)) @ q.T
    return (a + a.T) / 2


SPECTRA = {
    "spread": lambda n: np.linspace(1.0, 10.0, n),
    "power law": lambda n: 1.0 / np.arange(1, n + 1) + 1e-4,
    "indefinite, clustered": lambda n: np.repeat(
        [-2.0, 1e-9, 3.0], [n // 3, n // 3, n - 2 * (n // 3)]
    ),
}


@pytest.mark.parametrize(
    "n, tile, bandwidth",
    [(300, 128, 64), (257, 64, 16), (130, 48, 20), (61, 32, 64), (40, 16, 7), (2, 8, 4), (1, 8, 4)],
)
@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
def test_band_eigenvalues_match_lapack_and_read_only_the_lower_tiles(
    tmp_path, n, tile, bandwidth, spectrum
):
    # ragged tiles, panels that straddle tiles, a band wider than the matrix
    a = (
        with_spectrum(n, SPECTRA[spectrum](n))
        if n > 2
        else np.array([[2.0, 1.0], [1.0, -1.0]])[:n, :n]
    )
    matrix = tl.Tiled(str(tmp_path / "a"), n, n, tile, "float64").create()
    matrix.write_region(slice(None), slice(None), a)
    g = matrix.grid[0]
    upper = [(i, j) for i in range(g) for j in range(i + 1, g)]
    matrix.write_tiles(upper, [np.full((tile, tile), np.nan)] * len(upper))  # never read
    work = tl.Tiled(str(tmp_path / "work"), n, n, tile, "float64")
    w = band_eigenvalues(matrix, work, bandwidth)
    norm = np.abs(np.linalg.eigvalsh(a)).max()
    np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=0, atol=1e-13 * n * norm)
    assert not (tmp_path / "work").exists()
    assert np.isnan(matrix.read_tiles(upper)).all() if upper else True  # the input is kept
    lower = np.tril_indices(n)  # read, never written: the reduction happens in work
    np.testing.assert_array_equal(matrix.read_region(slice(None), slice(None))[lower], a[lower])


@pytest.mark.parametrize("spectrum", ["power law", "spread"])
def test_gapless_spectra_take_one_split_into_two_leaves(tmp_path, spectrum):
    # A sampled principal block misjudges where a power law's median lies (at N = 400 it
    # split 264 / 136, at N = 2048 1304 / 744, so the larger side, above the leaf size,
    # split again); the exact spectrum puts the split where both sides are leaves.
    n, leaf = 400, 220
    bound = int(HOST_LEAF_COPIES * leaf * leaf * 8)
    a = with_spectrum(n, SPECTRA[spectrum](n), seed=1)
    scratch, splits = tmp_path / "scratch", []

    def seen(key):
        if key.startswith("split_"):
            with open(scratch / "ledger" / f"{key}.json") as f:
                splits.append([c["size"] for c in json.load(f)["children"]])

    w, v = divide_and_conquer_eigh(
        lambda r, c: a[r, c],
        n,
        np.float64,
        64,
        bound,
        scratch_dir=str(scratch),
        progress=seen,
        two_stage_blocks=False,  # QDWH's split (two-stage blocks: tests/test_linalg_two_stage.py)
    )
    assert len(splits) == 1 and max(splits[0]) <= leaf, splits
    norm = np.linalg.norm(a, 2)
    assert np.linalg.norm(a @ v - v * w) / norm <= 1e-10
    assert np.linalg.norm(v.T @ v - np.eye(n)) <= 1e-10
    np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * norm)


def test_bandwidth_shrinks_to_fit_the_memory_bound():
    tiles = 3 * 64 * 64 * 8
    assert bandwidth_for(1000, 64, 8, 1 << 30) == BANDWIDTH
    assert bandwidth_for(1000, 64, 8, tiles + 8 * 1000 * 8 * 10) == 10  # 8 n x b arrays
    assert bandwidth_for(1000, 64, 8, tiles) == 1  # the least: a tridiagonal reduction
