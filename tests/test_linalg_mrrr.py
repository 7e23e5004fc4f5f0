"""MRRR a slice at a time (ntk_dist.linalg.mrrr) against numpy's LAPACK on the dense matrix.

Each tridiagonal matrix's eigenvectors are made in slices, written into buffers with
sentinel rows and workspace columns, and put side by side: the residual, the
orthogonality of all of them (across the slices' borders too) and the eigenvalues
against numpy's eigvalsh.
"""

import numpy as np
import pytest

from ntk_dist.linalg import mrrr


def dense(d, e):
    return np.diag(d) + np.diag(e, 1) + np.diag(e, -1)


def in_slices(d, e, bounds):
    tri = mrrr.Tridiagonal(d, e)
    n = len(d)
    vectors, values = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        out = np.full((n + 3, hi - lo + 2), 7.0, d.dtype, order="F")
        values.append(tri.vectors(lo, hi, out))
        assert (out[n:] == 7.0).all()  # rows from n are left alone
        vectors.append(out[:n, 1:-1])
    return tri, np.hstack(vectors), np.concatenate(values)


def check(d, e, bounds, tol, larre_tol=None):
    tri, v, w = in_slices(d, e, bounds)
    t = dense(d.astype(float), e.astype(float))
    norm = max(np.abs(np.linalg.eigvalsh(t)).max(), np.finfo(float).tiny)
    assert np.abs(t @ v - v * w).max() <= tol * norm
    assert np.abs(v.T @ v - np.eye(len(d))).max() <= tol * len(d)
    expected = np.linalg.eigvalsh(t)
    np.testing.assert_allclose(np.sort(w), expected, rtol=0, atol=tol * norm)
    larre_tol = tol if larre_tol is None else larre_tol
    np.testing.assert_allclose(np.sort(tri.values), expected, rtol=0, atol=larre_tol * norm)
    return tri


def wilkinson(m):
    """W_{2m+1}^+: pairs of eigenvalues that agree to many digits."""
    return np.abs(np.arange(-m, m + 1)).astype(float), np.ones(2 * m)


RNG = np.random.default_rng(0)


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_tiny_matrices_one_column_a_slice(n):
    d, e = RNG.standard_normal(n), RNG.standard_normal(n - 1)
    check(d, e, list(range(n + 1)), 1e-14)


@pytest.mark.parametrize("scale", [1.0, 1e-200, 1e100])
def test_slices_of_a_random_matrix_at_any_scale(scale):
    # stemr's own scaling leaves larrv failing from norms ~1e30 (scipy's eigh_tridiagonal
    # raises there): scaled to norm ~1 by a power of two here
    d, e = RNG.standard_normal(300) * scale, RNG.standard_normal(299) * scale
    check(d, e, [0, 37, 100, 101, 250, 300], 1e-13)


def test_a_matrix_that_splits_into_blocks():
    d, e = RNG.standard_normal(300), RNG.standard_normal(299)
    e[[50, 120, 121]] = 0.0  # four blocks (one of one row): values block by block
    tri = check(d, e, [0, 37, 80, 170, 300], 1e-13)
    assert np.isinf(tri.relative_gaps).sum() == 3
    assert (np.diff(tri.values)[np.isfinite(tri.relative_gaps)] >= 0).all()


@pytest.mark.parametrize("d", [np.zeros(50), np.ones(50)])
def test_a_diagonal_matrix(d):
    check(d, np.zeros(49), [0, 7, 50], 0.0)


def test_slices_cut_between_eigenvalues_that_agree_to_many_digits():
    # W_201^+'s pairs cut apart (gaps down to 1e-14 relative): larrv sees the whole
    # clusters around each cut and makes only the slice's vectors, the same as in one call
    d, e = wilkinson(100)
    check(d, e, list(range(0, 202, 30)) + [201], 1e-13)


def test_float32():
    d, e = RNG.standard_normal(300).astype(np.float32), RNG.standard_normal(299).astype(np.float32)
    # larrv's values as stemr's (~4e-6 here); larre's, which only place the slices and
    # seed larrv, to ~1e-5 of the norm (stemr refines them further when no vectors follow)
    check(d, e, [0, 100, 300], 2e-6, larre_tol=3e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_is_refused(bad):
    with pytest.raises(ValueError, match="NaN or Inf"):
        mrrr.Tridiagonal(np.array([1.0, bad, 2.0]), np.ones(2))


def test_out_must_be_column_major_with_two_workspace_columns():
    tri = mrrr.Tridiagonal(np.ones(5), np.ones(4))
    with pytest.raises(ValueError, match="column-major"):
        tri.vectors(0, 5, np.zeros((5, 7)))  # row-major
    with pytest.raises(ValueError, match="7 columns"):
        tri.vectors(0, 5, np.zeros((5, 5), order="F"))  # no workspace columns


def test_an_even_spectrum_of_twelve_thousand_is_made_in_slices_alone():
    # Clement's matrix: eigenvalues -(n - 1), -(n - 3), ..., n - 1, relative gaps down to
    # ~1 / n. Slices ending at gaps of 8e-5 (> 2e-3 / sqrt(n)) are made alone (seeing the
    # whole spectrum for each slice took minutes at n = 30000) and stay orthogonal across
    # their border.
    n = 12000
    k = np.arange(1, n)
    tri = mrrr.Tridiagonal(np.zeros(n), np.sqrt(k * (n - k)).astype(float))
    # the narrow gaps lie at the end away from larre's root shift
    cuts = [0, 200, 400] if tri.relative_gaps[0] < tri.relative_gaps[-1] else [n - 400, n - 200, n]
    assert all(1e-5 <= tri._gap(c) <= 1e-4 for c in cuts if 0 < c < n)
    vectors, values = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        assert tri.seen(lo, hi) == (lo, hi)
        out = np.zeros((n, hi - lo + 2), order="F")
        values.append(tri.vectors(lo, hi, out))
        vectors.append(out[:, 1:-1])
    v, w = np.hstack(vectors), np.concatenate(values)
    expected = 2.0 * np.arange(cuts[0], cuts[-1]) - (n - 1)
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-11 * n)
    assert np.abs(v.T @ v - np.eye(400)).max() <= 1e-11
    # the residual T v - v w, T applied from its three diagonals
    e = np.sqrt(k * (n - k))
    tv = np.zeros_like(v)
    tv[:-1] += e[:, None] * v[1:]
    tv[1:] += e[:, None] * v[:-1]
    assert np.abs(tv - v * w).max() <= 1e-12 * n


def test_a_slice_cut_inside_a_cluster_sees_the_whole_cluster():
    d, e = wilkinson(100)
    tri = mrrr.Tridiagonal(d, e)
    lo = 1 + int(np.argmin(tri.relative_gaps[100:])) + 100  # a cut inside a close pair
    first, last = tri.seen(lo, lo + 20)
    assert first < lo and tri._gap(first) >= mrrr.MIN_RELATIVE_GAP
