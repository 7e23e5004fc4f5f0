"""Multi-process JAX mode: two ``jax.distributed`` processes on localhost fill one store.

The test runs this file as a script in two child processes (process 0 and 1).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from kernel_job import ROOT, data, make_kernel_fn, mlp_params

from ntk_dist.executors import ProcessShardExecutor
from ntk_dist.store import KernelStore
from ntk_dist.tiling import TilePlan

N, BLOCK = 17, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_one_store_equal_to_one_call(tmp_path):
    path = str(tmp_path / "k.zarr")
    port = _free_port()
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
    )
    children = [
        subprocess.Popen(
            [sys.executable, __file__, str(port), str(i), path],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for child in children:
            out, err = child.communicate(timeout=180)
            assert child.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            child.kill()
            child.wait()

    kernel_fn = make_kernel_fn("ntk", (), ())
    x, params = data(1, N), mlp_params(0)
    ref = np.asarray(kernel_fn(x, x, params))
    store = KernelStore.open(path)
    assert store.is_complete
    assert np.abs(store.to_numpy() - ref).max() <= 1e-10 * np.abs(ref).max()
    # the deterministic split: each process computed exactly its own share
    plan = store.plan
    nodes = {ij: rec["node"] for ij, rec in store.tile_records().items()}
    for i, out in enumerate(outputs):
        share = ProcessShardExecutor(i, 2).share(plan)
        assert out["computed"] == len(share) > 0
        assert all(nodes[(t.i, t.j)].endswith(f":process{i}") for t in share)
        assert out["complete_seen"], f"process {i} returned before the store was complete"
        assert out["local_devices"] == 2 and out["process_count"] == 2


def test_share_is_a_deterministic_partition_of_the_plan():
    plan = TilePlan(10, 10, (3, 3), symmetric=True)
    shares = [ProcessShardExecutor(i, 3).share(plan) for i in range(3)]
    flat = [t for s in shares for t in s]
    assert sorted(flat) == sorted(plan.tiles()) and len(flat) == len(plan)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _child(port: int, index: int, path: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, index, initialization_timeout=60)
    from ntk_dist.engine import compute_kernel

    executor = ProcessShardExecutor(timeout=120, poll=0.1)
    store = compute_kernel(
        make_kernel_fn("ntk", (), ()),
        data(1, N),
        None,
        mlp_params(0),
        block_size=BLOCK,
        store=path,
        executor=executor,
        progress=False,
    )
    result = {
        "computed": executor.tiles_computed,
        "complete_seen": store.is_complete,
        "local_devices": len(jax.local_devices()),
        "process_count": jax.process_count(),
    }
    print(json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
