"""The tiled Cholesky's device tile backend on 4 CPU devices, against numpy LAPACK.

Two subprocesses (JAX needs the device count before it starts): one factorisation
killed after three block columns, then one run of every check, whose factors the test
compares with numpy's and with the host backend's stored factor.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import zarr
from linalg_helpers import KILLED_CHOLESKY, ill_conditioned, ntk_train, rel, store_kernel, to_2d

from ntk_dist.linalg import StoredKernelOperator
from ntk_dist.linalg.cholesky import PANELS, choose_tile_backend

BOTH = ("host", "device")
FOUR_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}

CHECKS = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from ntk_dist.linalg import NotPositiveDefiniteError, StoredKernelOperator
from ntk_dist.linalg import cholesky as chol
from ntk_dist.store import KernelStore

folder, cases = sys.argv[1], json.loads(sys.argv[2])
out = {"devices": len(jax.local_devices())}
for name, (bound, backend) in cases.items():
    progress = []
    op = StoredKernelOperator(KernelStore.open(f"{folder}/{name}"), memory_bound=bound,
                              tile_backend=backend, progress=lambda d, t: progress.append(d))
    try:
        np.save(f"{folder}/{name}.lower.npy", op.cholesky().to_dense())
        out[name] = progress
    except NotPositiveDefiniteError as e:
        out[name] = {"pivot": e.pivot, "message": str(e)}
out["compiled"] = {
    f.__name__: f._cache_size()
    for f in (chol._potrf_tile, chol._trsm_tile, chol._syrk_update, chol._gemm_update)
}
print(json.dumps(out))
"""


def bound_for(n2d, tile):
    """A memory bound whose tiled Cholesky uses tiles of edge `tile` (and is not in core)."""
    return PANELS * n2d * 8 * tile


def not_positive_definite(n, pivot):
    a = ill_conditioned(n, cond=10)
    a[pivot, :] = a[:, pivot] = 0.0
    a[pivot, pivot] = -1.0  # LAPACK fails exactly at this global pivot
    return a


def test_device_tile_backend_on_four_cpu_devices(tmp_path):
    ntk = ntk_train(50)  # a real untraced NTK, 100 x 100 in 2-D
    ill = ill_conditioned(90, cond=1e8)
    resumed = ill_conditioned(100, cond=1e6, seed=3)
    kernels = {  # name: (kernel, store block, tile, backend); every size ragged in its tile
        "ntk_device": (ntk, 7, 23, "device"),
        "ntk_host": (ntk, 7, 23, "host"),
        "ill_device": (ill, 9, 16, "device"),
        "resumed": (resumed, 9, 12, "device"),
        "pivot41_device": (not_positive_definite(60, 41), 8, 16, "device"),
        "pivot41_host": (not_positive_definite(60, 41), 8, 16, "host"),
        "pivot55_device": (not_positive_definite(60, 55), 8, 16, "device"),  # ragged tile
    }
    cases = {}
    for name, (k, block, tile, backend) in kernels.items():
        store_kernel(tmp_path / name, k, block=block)
        cases[name] = (bound_for(len(to_2d(k)), tile), backend)

    script = tmp_path / "killed.py"
    script.write_text(KILLED_CHOLESKY)
    killed = [
        sys.executable,
        str(script),
        str(tmp_path / "resumed"),
        str(cases["resumed"][0]),
        "device",
    ]
    assert subprocess.run(killed, env=FOUR_DEVICES).returncode == -9
    script = tmp_path / "checks.py"
    script.write_text(CHECKS)
    run = [sys.executable, str(script), str(tmp_path), json.dumps(cases)]
    proc = subprocess.run(run, env=FOUR_DEVICES, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["devices"] == 4

    for name in ["ntk_device", "ntk_host", "ill_device", "resumed"]:
        a = to_2d(kernels[name][0])
        lower = np.load(tmp_path / f"{name}.lower.npy")
        assert rel(lower @ lower.T, a) <= 1e-12, name
        np.testing.assert_allclose(lower, np.linalg.cholesky(a), rtol=0, atol=1e-9)
    assert out["resumed"] == list(range(4, 10))  # columns 1-3 came from the killed run
    assert out["ntk_device"] == list(range(1, 6))  # 100 = 4 x 23 + 8

    # The same stored layout from both backends: array metadata and ledger.
    factors = [tmp_path / f"ntk_{b}/ntk_dist_linalg/cholesky-float64-shift0x0.0p+0" for b in BOTH]
    host, device = (zarr.open_array(str(path), mode="r") for path in factors)
    assert (host.shape, host.chunks, host.dtype) == (device.shape, device.chunks, device.dtype)
    ledgers = [sorted(os.listdir(path / "ntk_dist_tiles")) for path in factors]
    assert ledgers[0] == ledgers[1] and len(ledgers[0]) == 15  # 5 x 6 / 2 lower tiles
    assert np.isnan(device[0, 99]) and np.isnan(host[0, 99])  # upper tiles never written

    for name, pivot in [("pivot41_device", 41), ("pivot41_host", 41), ("pivot55_device", 55)]:
        assert out[name]["pivot"] == pivot, name
        assert f"pivot {pivot} " in out[name]["message"] and "diag_reg" in out[name]["message"]

    # One fixed tile shape per tile size: each kernel compiled at most once per device and
    # tile size (23, 16, 12 here), however ragged the last tiles and wide the panels.
    assert all(0 < count <= 4 * 3 for count in out["compiled"].values()), out["compiled"]


def test_tile_backend_is_checked_and_auto_is_host_on_cpu(tmp_path):
    assert choose_tile_backend("auto", jax.local_devices()) == "host"
    assert choose_tile_backend("device", jax.local_devices()) == "device"
    store = store_kernel(tmp_path / "k", ill_conditioned(8), block=4)
    with pytest.raises(ValueError, match="tile_backend='gpu' is not one of"):
        StoredKernelOperator(store, tile_backend="gpu")
