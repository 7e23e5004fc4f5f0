"""RayExecutor on a real two-node local Ray cluster: results, placement and faults.

One cluster serves the module (``ray.cluster_utils.Cluster``, one CPU per node).
Every job runs under a time limit: in a daemon thread here, or in a subprocess
(this file run as a script) when the test kills the driver.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import kernel_job
import numpy as np
import pytest
from kernel_job import ROOT, data, make_kernel_fn, mlp, mlp_params
from ray_cluster import alive_nodes, two_node_cluster

import ntk_dist
from ntk_dist.engine import compute_kernel
from ntk_dist.executors.ray import RayExecutor, executor_from_flag
from ntk_dist.store import KernelStore, NonFiniteTileError

JOB_TIMEOUT = 120


@pytest.fixture(scope="module")
def cluster():
    import ray.cloudpickle

    # Workers cannot import the tests' helper module: ship it with the functions.
    ray.cloudpickle.register_pickle_by_value(kernel_job)
    with two_node_cluster() as head:
        yield head


def within(seconds: float, fn, *args, **kwargs):
    """Run fn in a daemon thread; fail the test (instead of hanging) past ``seconds``."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"job still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def slow_kernel_fn(seconds: float):
    """The oracle kernel, each tile held up by ``seconds`` (a host callback that sleeps)."""
    kernel_fn = make_kernel_fn("ntk", (-1,), ())

    def wait(k):
        time.sleep(seconds)
        return np.zeros((), k.dtype)

    def slow(x1, x2, params):
        k = kernel_fn(x1, x2, params)
        return k + jax.pure_callback(wait, jax.ShapeDtypeStruct((), k.dtype), k[0, 0])

    for attr in ("kind", "trace_axes", "diagonal_axes", "implementation"):
        setattr(slow, attr, getattr(kernel_fn, attr))
    return slow


def relative_error(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def test_stored_kernel_equals_one_call_and_both_nodes_computed_tiles(cluster, tmp_path):
    kernel_fn = make_kernel_fn("ntk", (), ())
    x, params = data(1, 14), mlp_params(0)
    executor = RayExecutor()
    store = within(
        JOB_TIMEOUT,
        compute_kernel,
        kernel_fn,
        x,
        None,
        params,
        block_size=3,
        store=str(tmp_path / "k.zarr"),
        executor=executor,
        progress=False,
    )
    ref = np.asarray(kernel_fn(x, x, params))
    assert store.dtype == np.float64
    assert relative_error(store.to_numpy(), ref) < 1e-10
    records = KernelStore.open(store.path).tile_records()
    assert len(records) == len(store.plan) == executor.tiles_computed
    assert {r["node"] for r in records.values()} == alive_nodes()
    assert len(executor.workers) == 2


def test_in_memory_and_library_kernel_functions(cluster, tmp_path):
    params = mlp_params(0)
    x1, x2 = data(1, 10), data(2, 7)
    kernel_fn = make_kernel_fn("nngp", (), ())
    mem = within(
        JOB_TIMEOUT,
        compute_kernel,
        kernel_fn,
        x1,
        x2,
        params,
        block_size=(4, 3),
        executor=RayExecutor(),
        progress=False,
    )
    assert relative_error(mem, np.asarray(kernel_fn(x1, x2, params))) < 1e-10
    ntk_fn = ntk_dist.empirical_ntk_fn(mlp, (-1,), (), implementation=2)
    store = within(
        JOB_TIMEOUT,
        compute_kernel,
        ntk_fn,
        x1,
        None,
        params,
        block_size=4,
        store=str(tmp_path / "e.zarr"),
        executor=RayExecutor(),
        progress=False,
    )
    assert relative_error(store.to_numpy(), np.asarray(ntk_fn(x1, None, params))) < 1e-10


def test_workers_take_row_panels_and_compute_each_row_block_once(cluster, tmp_path):
    x1, x2, params = data(1, 12), data(2, 10), mlp_params(0)
    ntk_fn = ntk_dist.empirical_ntk_fn(mlp, (), (), vmap_axes=0)  # per-block Jacobians
    executor = RayExecutor()
    store = within(
        JOB_TIMEOUT,
        compute_kernel,
        ntk_fn,
        x1,
        x2,
        params,
        block_size=(3, 4),  # 4 row panels of 3 column tiles, the last 2 columns wide
        store=str(tmp_path / "k.zarr"),
        executor=executor,
        progress=False,
    )
    oracle = np.asarray(make_kernel_fn("ntk", (), ())(x1, x2, params))
    assert relative_error(store.to_numpy(), oracle) < 1e-10
    assert relative_error(store.to_numpy(), np.asarray(ntk_fn(x1, x2, params))) < 1e-10
    reuse = executor.reuse
    assert reuse.mode == "panels" and executor.tiles_computed == 12
    assert reuse.rows == 1.0  # each row block's Jacobians once, for its whole panel
    assert 1.0 <= reuse.cols <= 2.0  # each worker computes a column block at most once
    # each node took a whole panel: all tiles of a row block come from one node
    nodes = {}
    for (i, _), record in KernelStore.open(store.path).tile_records().items():
        nodes.setdefault(i, set()).add(record["node"])
    assert all(len(n) == 1 for n in nodes.values())
    assert set().union(*nodes.values()) == alive_nodes()

    # one row block, two workers: its panel is cut in two (one each), so its features are
    # computed twice
    x_test = data(3, 3)
    mem = within(
        JOB_TIMEOUT,
        compute_kernel,
        ntk_fn,
        x_test,
        x2,
        params,
        block_size=(3, 4),
        executor=executor,
        progress=False,
    )
    oracle = np.asarray(make_kernel_fn("ntk", (), ())(x_test, x2, params))
    assert relative_error(mem, oracle) < 1e-10
    assert executor.tiles_computed == 3 and executor.reuse.rows == 2.0


def test_killed_worker_is_replaced_and_the_store_completes_correctly(cluster, tmp_path):
    kernel_fn = slow_kernel_fn(0.25)
    x, params = data(3, 24), mlp_params(1)
    path = tmp_path / "k.zarr"
    executor = RayExecutor()
    box: dict = {}
    thread = threading.Thread(
        target=lambda: box.update(
            store=compute_kernel(
                kernel_fn,
                x,
                None,
                params,
                block_size=3,
                store=str(path),
                executor=executor,
                progress=False,
            )
        ),
        daemon=True,
    )
    thread.start()
    ledger = path / "ntk_dist_tiles"
    deadline = time.time() + JOB_TIMEOUT
    while not (ledger.is_dir() and len(os.listdir(ledger)) >= 3 and executor.workers):
        assert time.time() < deadline and thread.is_alive(), "the job did not start"
        time.sleep(0.05)
    victim = executor.workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    done_at_kill = len(os.listdir(ledger))
    thread.join(JOB_TIMEOUT)
    assert not thread.is_alive(), "job hung after a worker was killed"
    store = box["store"]
    assert done_at_kill < len(store.plan)
    assert executor.restarts >= 1
    assert victim.pid not in {w.pid for w in executor.workers}
    assert store.is_complete and store.verify() == []
    assert relative_error(store.to_numpy(), np.asarray(kernel_fn(x, x, params))) < 1e-10


def test_killed_driver_leaves_a_store_the_next_run_resumes(cluster, tmp_path):
    path = tmp_path / "k.zarr"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    driver = subprocess.Popen(
        [sys.executable, __file__, json.dumps({"address": cluster.address, "store": str(path)})],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ledger = path / "ntk_dist_tiles"
    try:
        deadline = time.time() + JOB_TIMEOUT
        while not (ledger.is_dir() and len(os.listdir(ledger)) >= 3):
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the driver wrote no tiles"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        driver.kill()
        driver.stderr.close()
    kernel_fn, x, params = slow_kernel_fn(0.2), data(4, 21), mlp_params(2)
    missing = len(KernelStore.open(str(path)).missing_tiles())
    executor = RayExecutor()
    store = within(
        JOB_TIMEOUT,
        compute_kernel,
        kernel_fn,
        x,
        None,
        params,
        block_size=3,
        store=str(path),
        executor=executor,
        progress=False,
    )
    assert 0 < missing < len(store.plan)
    # only missing tiles were computed (the old driver's workers may finish a few more)
    assert 0 < executor.tiles_computed <= missing
    assert store.is_complete and store.verify() == []
    assert relative_error(store.to_numpy(), np.asarray(kernel_fn(x, x, params))) < 1e-10


def test_nan_tile_fails_the_job_with_its_indices(cluster, tmp_path):
    kernel_fn = make_kernel_fn("ntk", (-1,), ())
    x1, x2 = data(1, 9), data(2, 8)
    x2[5, 1] = np.nan  # column block 1 (block 4) is NaN in every row block
    with pytest.raises(NonFiniteTileError, match=r"tile \(\d, 1\)") as info:
        within(
            JOB_TIMEOUT,
            compute_kernel,
            kernel_fn,
            x1,
            x2,
            mlp_params(0),
            block_size=4,
            store=str(tmp_path / "k.zarr"),
            executor=RayExecutor(),
            progress=False,
        )
    assert info.value.tiles and all(j == 1 for _, j in info.value.tiles)
    done = KernelStore.open(str(tmp_path / "k.zarr")).tile_records()
    assert not any(j == 1 for _, j in done), "a NaN tile was marked complete"


def test_cli_kernel_on_the_ray_cluster(cluster, tmp_path, capsys):
    from ntk_dist import models
    from ntk_dist.cli import main

    f, params = models.digits_cnn()
    x = np.random.default_rng(3).normal(size=(10, 8, 8, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    argv = ["kernel", "--model", "ntk_dist.models:digits_cnn", "--x1", str(tmp_path / "x.npy")]
    argv += ["--out", str(tmp_path / "k.zarr"), "--block-size", "4", "--vmap-axes", "0"]
    argv += ["--ray", cluster.address, "--no-progress"]
    assert within(JOB_TIMEOUT, main, argv) == 0
    assert "Ray worker(s)" in capsys.readouterr().out
    ref = np.asarray(ntk_dist.empirical_ntk_fn(f, vmap_axes=0)(x, None, params))
    store = KernelStore.open(tmp_path / "k.zarr")
    assert relative_error(store.to_numpy(), ref) < 1e-5
    assert {r["node"] for r in store.tile_records().values()} == alive_nodes()


def test_executor_from_flag():
    assert executor_from_flag(None) is None
    ex = executor_from_flag("auto")
    assert isinstance(ex, RayExecutor) and ex.address == "auto"
    with pytest.raises(ValueError, match="workers_per_node"):
        RayExecutor(workers_per_node=0)


def _driver(job: dict) -> None:
    """A driver that the test SIGKILLs mid-job."""
    import ray
    import ray.cloudpickle

    jax.config.update("jax_enable_x64", True)
    ray.cloudpickle.register_pickle_by_value(kernel_job)
    ray.init(address=job["address"], log_to_driver=False)
    compute_kernel(
        slow_kernel_fn(0.2),
        data(4, 21),
        None,
        mlp_params(2),
        block_size=3,
        store=job["store"],
        executor=RayExecutor(),
        progress=False,
    )


if __name__ == "__main__":
    _driver(json.loads(sys.argv[1]))
