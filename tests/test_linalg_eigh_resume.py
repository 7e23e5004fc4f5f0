"""Out-of-core eigh: resumed after SIGKILL from its ledger, on a two-node Ray cluster."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from linalg_helpers import ntk_train, to_2d
from ray_cluster import alive_nodes, two_node_cluster

from ntk_dist.linalg.qdwh import divide_and_conquer_eigh
from ntk_dist.linalg.tiled import LocalRunner, RayRunner
from ntk_dist.linalg.tridiagonal import HOST_LEAF_COPIES

N, TILE, LEAF = 100, 30, 60  # blocks above 60 x 60 are split (the first split halves N)
BOUND = int(HOST_LEAF_COPIES * LEAF * LEAF * 8)


def matrix(gapless=False):
    """A real NTK, 100 x 100 (outlying eigenvalues: the first split is a reflector), or
    one with eigenvalues evenly over [1, 10] (no gap: the first block is two-stage)."""
    if gapless:
        q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((N, N)))
        return (q * np.linspace(1.0, 10.0, N)) @ q.T
    return to_2d(ntk_train(N // 2, seed=3))


def check(a, w, v):
    norm = np.linalg.norm(a, 2)
    assert np.linalg.norm(a @ v - v * w) / norm <= 1e-10
    assert np.linalg.norm(v.T @ v - np.eye(len(a))) <= 1e-10
    np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * norm)


KILLED = """
import sys, time
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_linalg_eigh_resume import BOUND, N, TILE, matrix
from ntk_dist.linalg.qdwh import divide_and_conquer_eigh

two_stage = sys.argv[3] == "True"
a = matrix(two_stage)

def progress(key):  # the parent kills this process while it sleeps after the first split
    if key == "split_r":
        time.sleep(120)

divide_and_conquer_eigh(lambda r, c: a[r, c], N, np.float64, TILE, BOUND,
                        scratch_dir=sys.argv[2], progress=progress,
                        two_stage_blocks=two_stage)
"""


@pytest.mark.parametrize("two_stage", [False, True], ids=["qdwh", "two-stage"])
def test_eigh_killed_after_its_first_split_resumes_without_redoing_it(tmp_path, two_stage):
    # QDWH: killed after the first split, the resumed eigh starts from its halves; two-stage
    # (the root block's method, recorded as its split): it redoes that block, not the input
    # copy or the search for outlying eigenvalues before it
    scratch = tmp_path / "scratch"
    ledger = scratch / "ledger"
    tests = os.path.dirname(__file__)
    child = subprocess.Popen([sys.executable, "-c", KILLED, tests, str(scratch), str(two_stage)])
    try:
        deadline = time.monotonic() + 300
        while not (ledger / "split_r.json").exists():
            assert child.poll() is None, "the eigh ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    before = {p.stem for p in ledger.glob("*.json")}
    assert before == {"input", "split_r"}
    method = json.loads((ledger / "split_r.json").read_text())["method"]
    assert (method == "two-stage") == two_stage

    a = matrix(two_stage)
    resumed, fresh = LocalRunner(), LocalRunner()
    keys = []
    w, v = divide_and_conquer_eigh(
        lambda r, c: a[r, c],
        N,
        np.float64,
        TILE,
        BOUND,
        scratch_dir=str(scratch),
        runner=resumed,
        progress=keys.append,
        two_stage_blocks=two_stage,
    )
    check(a, w, v)
    assert not scratch.exists()  # removed when finished
    assert keys and not set(keys) & before and "done_r" in keys  # nothing recorded redone
    fresh_keys = []
    divide_and_conquer_eigh(
        lambda r, c: a[r, c],
        N,
        np.float64,
        TILE,
        BOUND,
        runner=fresh,
        progress=fresh_keys.append,
        two_stage_blocks=two_stage,
    )
    assert set(fresh_keys) == set(keys) | before
    if not two_stage:  # (a two-stage block runs no tile jobs)
        assert 0 < resumed.jobs_run < fresh.jobs_run  # the first split's jobs were skipped


def test_eigh_tile_jobs_run_as_ray_tasks_on_both_nodes(tmp_path):
    a = matrix()
    runner = RayRunner()
    with two_node_cluster():
        nodes = alive_nodes()
        w, v = divide_and_conquer_eigh(
            lambda r, c: a[r, c],
            N,
            np.float64,
            TILE,
            BOUND,
            scratch_dir=str(tmp_path / "s"),
            runner=runner,
        )
    check(a, w, v)
    assert len(nodes) == 2 and runner.nodes == nodes
