"""KernelStore: round trips with zarr-python, ledger, checksums, refusals."""

import json
import os

import numpy as np
import pytest
import zarr

from ntk_dist.store import KernelStore, NonFiniteTileError, StoreMismatchError
from ntk_dist.tiling import TilePlan


def sym_kernel(n, c=2, seed=0):
    """A symmetric kernel in neural-tangents layout (n, n, c, c): K[a,b,i,j] = K[b,a,j,i]."""
    k = np.random.default_rng(seed).normal(size=(n, n, c, c))
    return k + k.transpose(1, 0, 3, 2)


def make(path, plan, entry_shape=(2, 2), **kw):
    kw = {"dtype": np.float64, "fingerprint": "f0", **kw}
    return KernelStore.create(path, plan=plan, entry_shape=entry_shape, **kw)


def fill(store, k):
    for t in store.plan:
        if store.plan.diagonal:
            store.write_tile(t, k[t.rows])
        else:
            store.write_tile(t, k[t.rows, t.cols])


def test_symmetric_store_round_trips_through_zarr_python(tmp_path):
    k = sym_kernel(7)
    plan = TilePlan(7, 7, (3, 3), symmetric=True)
    store = make(tmp_path / "k", plan, kind="ntk", trace_axes=(), model_name="mlp")
    assert not store.is_complete and len(store.missing_tiles()) == 6
    fill(store, k)
    assert store.is_complete
    np.testing.assert_array_equal(store.to_numpy(), k)
    np.testing.assert_array_equal(store.block(2, 0), k[6:7, 0:3])  # a mirrored block
    np.testing.assert_array_equal(store.rows(2, 5), k[2:5])

    plain = zarr.open(str(tmp_path / "k"), mode="r")
    np.testing.assert_array_equal(plain[...], k)
    assert plain.chunks == (3, 3, 2, 2)
    meta = plain.attrs["ntk_dist"]
    assert meta["kind"] == "ntk" and meta["shape"] == [7, 7, 2, 2]
    assert meta["block_shape"] == [3, 3] and meta["dtype"] == "float64"
    assert meta["fingerprint"] == "f0" and meta["model_name"] == "mlp"

    # Written by zarr-python, read by the store; the checksums notice the change.
    writer = zarr.open_array(str(tmp_path / "k"), mode="r+")
    writer[0:3, 3:6] = 5.0
    np.testing.assert_array_equal(store.block(0, 1), np.full((3, 3, 2, 2), 5.0))
    assert [(t.i, t.j) for t in store.verify()] == [(0, 1)]


def test_reopen_reads_metadata_and_ledger(tmp_path):
    plan = TilePlan(5, 4, (2, 3))
    store = make(tmp_path / "k", plan, entry_shape=(), dtype=np.float32)
    store.write_tile(plan.tile(1, 1), np.ones((2, 1)))
    again = KernelStore.open(tmp_path / "k")
    assert again.plan == plan and again.dtype == np.float32 and again.shape == (5, 4)
    assert [(t.i, t.j) for t in again.completed_tiles()] == [(1, 1)]
    with pytest.raises(FileNotFoundError):
        KernelStore.open(tmp_path / "nothing")


def test_diagonal_store_is_vector_like(tmp_path):
    k = np.random.default_rng(1).normal(size=(10, 2))
    store = make(tmp_path / "d", TilePlan(10, 10, (4, 4), diagonal=True), entry_shape=(2,))
    fill(store, k)
    assert store.shape == (10, 2)
    np.testing.assert_array_equal(zarr.open(str(tmp_path / "d"), mode="r")[...], k)
    np.testing.assert_array_equal(store.block(1), k[4:8])


def test_unfinished_regions_are_refused_and_read_nan_in_plain_zarr(tmp_path):
    plan = TilePlan(4, 4, (2, 2))
    store = make(tmp_path / "k", plan, entry_shape=())
    store.write_tile(plan.tile(0, 0), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"not complete.*\(0, 1\)"):
        store.to_numpy()
    with pytest.raises(ValueError, match="not complete"):
        store.block(1, 1)
    np.testing.assert_array_equal(store.rows(0, 0), np.zeros((0, 4)))
    plain = zarr.open(str(tmp_path / "k"), mode="r")[...]
    assert np.isnan(plain[2:, :]).all() and (plain[:2, :2] == 1).all()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"fingerprint": "other"}, "fingerprint"),
        ({"trace_axes": (-1,)}, "trace_axes"),
        ({"kind": "nngp"}, "kind"),
        ({"dtype": np.float32}, "dtype"),
    ],
)
def test_other_kernel_is_refused_unless_overwrite(tmp_path, change, field):
    plan = TilePlan(4, 4, (2, 2), symmetric=True)
    store = make(tmp_path / "k", plan, trace_axes=())
    fill(store, sym_kernel(4))
    assert make(tmp_path / "k", plan, trace_axes=()).is_complete  # same kernel: resumes
    with pytest.raises(StoreMismatchError, match=f"{field}.*overwrite=True"):
        make(tmp_path / "k", plan, **{"trace_axes": (), **change})
    with pytest.raises(StoreMismatchError, match="block_shape"):
        make(tmp_path / "k", TilePlan(4, 4, (3, 3), symmetric=True), trace_axes=())
    fresh = make(tmp_path / "k", plan, overwrite=True, **{"trace_axes": (), **change})
    assert fresh.completed_tiles() == [] and fresh.metadata[field] != store.metadata[field]


def test_a_directory_that_is_not_a_store_is_never_used_or_deleted(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a kernel store"):
        make(tmp_path / "data", TilePlan(2, 2, (1, 1)), overwrite=True)
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep"


def test_verify_finds_truncated_and_missing_chunks(tmp_path):
    plan = TilePlan(6, 6, (3, 3), symmetric=True)
    store = make(tmp_path / "k", plan)
    fill(store, sym_kernel(6))
    assert store.verify() == []
    os.truncate(tmp_path / "k" / "c" / "1" / "0" / "0" / "0", 100)  # mirror of tile (0, 1)
    os.remove(tmp_path / "k" / "c" / "1" / "1" / "0" / "0")
    assert [(t.i, t.j) for t in store.verify()] == [(0, 1), (1, 1)]
    store.forget_tiles([(0, 1)])
    assert [(t.i, t.j) for t in store.missing_tiles()] == [(0, 1)]


def test_nonfinite_tile_is_reported_with_indices_and_not_written(tmp_path):
    plan = TilePlan(6, 6, (3, 3))
    store = make(tmp_path / "k", plan, entry_shape=(2,))
    block = np.ones((3, 3, 2))
    block[1, 2, 1] = np.inf
    with pytest.raises(NonFiniteTileError, match=r"tile \(1, 0\).*\(4, 2, 1\)") as err:
        store.write_tile(plan.tile(1, 0), block)
    assert err.value.tiles == [(1, 0)]
    assert store.completed_tiles() == []
    assert not (tmp_path / "k" / "c" / "1").exists()
    with pytest.raises(ValueError, match="shape"):
        store.write_tile(plan.tile(0, 0), np.ones((3, 2, 2)))


def test_unwritable_path_fails_cleanly(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="file"):
        make(tmp_path / "file" / "k", TilePlan(2, 2, (1, 1)))
    assert (tmp_path / "file").read_text() == "x"


def test_ledger_entries_are_json_with_checksums(tmp_path):
    plan = TilePlan(4, 4, (2, 2), symmetric=True)
    store = make(tmp_path / "k", plan)
    store.write_tile(plan.tile(0, 1), sym_kernel(4)[0:2, 2:4])
    entry = json.loads((tmp_path / "k" / "ntk_dist_tiles" / "0_1.json").read_text())
    assert (entry["i"], entry["j"]) == (0, 1)
    assert len(entry["sha256"]) == 2 and all(len(s) == 64 for s in entry["sha256"])
