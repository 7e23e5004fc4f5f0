"""compute_kernel: tiled == one call (4 devices), resume after SIGKILL, safety, memory.

Multi-device and resource-limited runs happen in subprocesses (tests/kernel_job.py)
because JAX's device count is fixed when it starts.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from kernel_job import ROOT, counting_executor, data, make_kernel_fn, mlp_params, run_job

from ntk_dist.engine import compute_kernel, kernel_layout
from ntk_dist.store import KernelStore, NonFiniteTileError, StoreMismatchError

CASES = [
    # kind, trace, diag, n1, n2 (None: x2 is x1), block
    ("ntk", [-1], [], 11, None, 4),  # symmetric, ragged, traced
    ("ntk", [], [], 9, 7, [4, 3]),  # rectangular, ragged, untraced (interleaved axes)
    ("ntk", [], [], 10, None, 3),  # symmetric untraced: mirrored pairs of axes
    ("ntk", [], [-1], 8, 8, 4),  # square, not symmetric, diagonal output axis
    ("ntk", [], [-1], 9, None, 4),  # symmetric with a single diagonal axis
    ("ntk", [-1], [0], 10, None, 4),  # diagonal over the batch: vector-like
    ("ntk", [], [0], 10, 10, 3),  # batch diagonal, pairs x1[i] with x2[i]
    ("nngp", [-1], [], 11, None, 4),
    ("nngp", [], [], 6, 13, 5),
]


def test_tiled_kernels_equal_one_call_on_four_devices(tmp_path):
    cases = [dict(kind=k, trace=t, diag=d, n1=n1, n2=n2, block=b) for k, t, d, n1, n2, b in CASES]
    cases.append(dict(kind="ntk", trace=[-1], diag=[], n1=10, n2=None, block=4, attrs=False))
    cases.append(dict(kind="ntk", trace=[], diag=[], n1=10, n2=5, block=3, zarr_input=True))
    for implementation in (1, 2):  # ntk_dist.empirical_ntk_fn: Jacobians, NTK-vector products
        cases.append(
            dict(kind="ntk", trace=[-1], diag=[], n1=9, n2=None, block=4, empirical=implementation)
        )
    out, _ = run_job({"job": "accuracy", "dir": str(tmp_path), "cases": cases}, devices=4)
    for case, res in zip(cases, out["results"], strict=True):
        assert res["devices"] == 4
        assert res["shape_ok"], case
        assert res["dtype"] == "float64"
        for key in ("err_memory", "err_store", "err_zarr"):
            assert res[key] < 1e-10, (case, key, res[key])
        # per call, one program for every tile, ragged ones included; implementation 1
        # (features) runs symmetric plans as one features program and one contraction
        per_run = 2 if case.get("empirical") == 1 else 1
        assert res["compilations"] == 2 * per_run, case
        assert res["tiles"] == 2 * res["n_plan"], case


def test_float32_is_the_default_without_x64(tmp_path):
    cases = [dict(kind="ntk", trace=[], diag=[], n1=7, n2=None, block=3)]
    out, _ = run_job(
        {"job": "accuracy", "dir": str(tmp_path), "cases": cases, "x64": False}, devices=2
    )
    res = out["results"][0]
    assert res["dtype"] == "float32" and res["err_store"] < 1e-5


def test_resume_after_sigkill_computes_only_missing_tiles(tmp_path):
    path = str(tmp_path / "k.zarr")
    job = {"job": "compute", "n": 24, "block": 3, "store": path, "slow": 0.15}
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    )
    child = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "kernel_job.py"), json.dumps(job)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ledger = tmp_path / "k.zarr" / "ntk_dist_tiles"
    deadline = time.time() + 60

    def finished() -> int:  # ledger entries, not the writer's temporary files
        return sum(name.endswith(".json") for name in os.listdir(ledger)) if ledger.exists() else 0

    while time.time() < deadline and finished() < 5:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    store = KernelStore.open(path)
    done = len(store.completed_tiles())
    total = len(store.plan)
    assert total == 36 and 5 <= done < total

    kernel_fn = make_kernel_fn("ntk", (-1,), ())
    x, params = data(1, 24), mlp_params(0)
    executor = counting_executor()
    store = compute_kernel(
        kernel_fn, x, None, params, store=path, executor=executor, progress=False
    )
    assert executor.tiles_run == total - done
    assert store.is_complete and store.verify() == []
    np.testing.assert_allclose(store.to_numpy(), kernel_fn(x, x, params), rtol=1e-10)


@pytest.fixture
def small_store(tmp_path):
    kernel_fn = make_kernel_fn("ntk", (), ())
    x, params = data(1, 10), mlp_params(0)
    path = str(tmp_path / "k.zarr")
    store = compute_kernel(kernel_fn, x, None, params, store=path, block_size=4, progress=False)
    return kernel_fn, x, params, path, store


def test_other_inputs_params_or_spec_are_refused_unless_overwrite(small_store):
    kernel_fn, x, params, path, _ = small_store
    others = [
        (kernel_fn, x + 1, params, {}, "fingerprint"),
        (kernel_fn, x, mlp_params(1), {}, "fingerprint"),
        (kernel_fn, x, params, {"model_name": "resnet"}, "fingerprint"),
        (make_kernel_fn("ntk", (-1,), ()), x, params, {}, "trace_axes"),
        (make_kernel_fn("nngp", (), ()), x, params, {}, "kind"),
        (kernel_fn, x, params, {"block_size": 3}, "block_shape"),
    ]
    for fn, xx, pp, kw, field in others:
        with pytest.raises(StoreMismatchError, match=f"{field}.*overwrite=True"):
            compute_kernel(fn, xx, None, pp, store=path, progress=False, **kw)
    new = compute_kernel(
        kernel_fn, x + 1, None, params, store=path, progress=False, overwrite=True, block_size=4
    )
    np.testing.assert_allclose(new.to_numpy(), kernel_fn(x + 1, x + 1, params), rtol=1e-10)


def test_truncated_chunk_is_found_and_recomputed_on_resume(small_store):
    kernel_fn, x, params, path, store = small_store
    os.truncate(os.path.join(path, "c", "0", "2", "0", "0"), 17)
    assert [(t.i, t.j) for t in store.verify()] == [(0, 2)]
    executor = counting_executor()
    again = compute_kernel(
        kernel_fn, x, None, params, store=path, executor=executor, progress=False
    )
    assert executor.tiles_run == 1
    assert again.verify() == []
    np.testing.assert_allclose(again.to_numpy(), kernel_fn(x, x, params), rtol=1e-10)


def test_nan_tiles_are_reported_and_not_written(tmp_path):
    kernel_fn = make_kernel_fn("ntk", (-1,), ())
    x, params = data(1, 10), mlp_params(0)
    x[5, 1] = np.nan  # row 5 lies in block 1 of 4-row blocks
    path = str(tmp_path / "k.zarr")
    with pytest.raises(NonFiniteTileError, match=r"tile \(0, 1\).*rows 0:4, cols 4:8") as err:
        compute_kernel(kernel_fn, x, None, params, store=path, block_size=4, progress=False)
    assert sorted(err.value.tiles) == [(0, 1), (1, 1), (1, 2)]
    store = KernelStore.open(path)
    assert [(t.i, t.j) for t in store.completed_tiles()] == [(0, 0), (0, 2), (2, 2)]
    assert np.isnan(zarr.open(path, mode="r")[0:4, 4:8]).all()  # fill value: never written
    with pytest.raises(NonFiniteTileError):
        compute_kernel(kernel_fn, x, None, params, block_size=4, progress=False)


def test_unwritable_path_fails_cleanly(tmp_path):
    (tmp_path / "file").write_text("x")
    kernel_fn = make_kernel_fn("ntk", (-1,), ())
    with pytest.raises(OSError, match="kernel store at .*file/k"):
        compute_kernel(
            kernel_fn,
            data(1, 4),
            None,
            mlp_params(0),
            store=str(tmp_path / "file" / "k"),
            block_size=2,
            progress=False,
        )


def test_full_disk_fails_cleanly_with_nothing_marked_complete(tmp_path):
    path = str(tmp_path / "k.zarr")
    # Files above 2 KB cannot be written: metadata and ledger fit, 17x17 float64 chunks do not.
    out, _ = run_job({"job": "compute", "n": 40, "block": 17, "store": path, "fsize_limit": 2048})
    assert out["error"].startswith("OSError: could not write tile (0, 0)")
    assert "not marked complete" in out["error"]
    store = KernelStore.open(path)
    assert store.completed_tiles() == [] and store.verify() == []


def test_jax_inputs_and_default_block_size():
    import jax.numpy as jnp

    kernel_fn = make_kernel_fn("ntk", (), (-1,))
    x1, x2, params = jnp.asarray(data(1, 9)), jnp.asarray(data(2, 5)), mlp_params(0)
    out = compute_kernel(kernel_fn, x1, x2, params, progress=False)
    np.testing.assert_allclose(out, kernel_fn(x1, x2, params), rtol=1e-10)


def test_progress_reports_tiles_rate_and_eta(capsys):
    kernel_fn = make_kernel_fn("nngp", (-1,), ())
    compute_kernel(kernel_fn, data(1, 9), None, mlp_params(0), block_size=3)
    err = capsys.readouterr().err
    assert "tiles 6/6" in err and "kernel entries/s" in err and "ETA" in err


def test_untileable_kernels_are_refused():
    x, params = data(1, 6), mlp_params(0)
    with pytest.raises(ValueError, match="batch axis 0"):
        kernel_layout(make_kernel_fn("ntk", (0,), ()), x, None, params)
    with pytest.raises(ValueError, match="as many x2 as x1"):
        kernel_layout(make_kernel_fn("ntk", (), (0,)), x, data(2, 4), params)

    def summed(x1, x2, p):  # not blockwise: a scalar
        return make_kernel_fn("nngp", (-1,), (), attrs=False)(x1, x2, p).sum()

    with pytest.raises(ValueError, match="tiling needs"):
        compute_kernel(summed, x, None, params, block_size=2, progress=False)

    def two_kernels(x1, x2, p):  # a pytree of kernels: a store holds one array
        k = make_kernel_fn("nngp", (-1,), (), attrs=False)(x1, x2, p)
        return {"a": k, "b": k}

    with pytest.raises(ValueError, match="tile one output of f at a time"):
        compute_kernel(two_kernels, x, None, params, block_size=2, progress=False)


def test_budget_chosen_blocks_bound_peak_memory(tmp_path):
    """Peak RSS growth stays under budget + 96 MB (XLA compiler/runtime, pipeline buffers).

    glibc's mmap threshold is pinned so that freed XLA buffers leave the RSS; the
    same job in one block (what ignoring the budget would do) exceeds the bound.
    """
    budget, overhead = 48_000_000, 96_000_000
    job = {"job": "memory", "d_in": 100, "width": 250, "n1": 960, "n2": 240, "budget": budget}
    env = {"MALLOC_MMAP_THRESHOLD_": "1000000"}
    tiled, _ = run_job({**job, "store": str(tmp_path / "a")}, env=env)
    whole, _ = run_job({**job, "store": str(tmp_path / "b"), "block": [960, 240]}, env=env)
    assert tiled["complete"] and tiled["block_shape"][0] < 960
    assert tiled["after"] - tiled["before"] <= budget + overhead
    assert whole["after"] - whole["before"] > budget + overhead
