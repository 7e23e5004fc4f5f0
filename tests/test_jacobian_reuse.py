"""Jacobian reuse across tiles: panel runs equal one call and count feature evaluations.

The kernels run on 4 CPU devices in a subprocess (this file run as a script), against
the explicit-Jacobian oracle of tests/kernel_job.py and one in-memory call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from kernel_job import ROOT

CASES = [
    # kind, trace, diag, n1, n2 (None: x2 is x1), block, vmap_axes
    ("ntk", [-1], [], 11, None, 4, 0),  # symmetric, ragged, traced
    ("ntk", [], [], 9, 7, [4, 3], 0),  # rectangular, ragged, untraced
    ("ntk", [], [], 10, None, 3, None),  # symmetric untraced, whole-batch Jacobians
    ("ntk", [], [-1], 8, 8, 4, 0),  # square, not symmetric, diagonal output axis
    ("ntk", [], [-1], 9, None, 4, None),  # symmetric, diagonal output axis
    ("ntk", [-1], [0], 10, None, 4, 0),  # diagonal over the batch: tiles run whole
    ("nngp", [-1], [], 11, None, 4, None),
    ("nngp", [], [], 6, 13, 5, None),
]


def _run(job: dict) -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(
            filter(None, [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH")])
        ),
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_panel_runs_equal_one_call_and_compute_each_block_once():
    keys = ("kind", "trace", "diag", "n1", "n2", "block", "vmap")
    cases = [dict(zip(keys, c, strict=True)) for c in CASES]
    out = _run({"job": "accuracy", "cases": cases})
    for case, res in zip(cases, out["results"], strict=True):
        assert res["devices"] == 4
        assert res["shape_ok"], case
        assert res["err_oracle"] < 1e-10 and res["err_call"] < 1e-10, (case, res)
        if 0 in case["diag"]:
            assert res["mode"] == "tiles", case
            continue
        assert res["mode"] == "panels", case
        # one features program per distinct block source, one contraction
        assert res["compilations"] == (2 if case["n2"] is None else 3), case
        if case["n2"] is None:
            assert res["total"] == 1.0, (case, res)
        else:
            assert res["rows"] == 1.0 and res["cols"] == 1.0, (case, res)


def test_budget_sets_column_cache_and_tiny_budget_runs_tiles_whole():
    # 12 x 14 examples in 4 x 4 blocks: 3 row blocks, 4 column blocks (the last of 2).
    out = _run({"job": "budget", "n1": 12, "n2": 14, "block": 4})
    runs = out["runs"]
    for res in runs.values():
        assert res["err_oracle"] < 1e-10, res
    ample = runs["ample"]
    assert ample["mode"] == "panels" and ample["cached"] == 4
    assert (ample["rows"], ample["cols"]) == (1.0, 1.0)
    # Two column blocks fit: row panel 1 (columns 3, 2, 1, 0) reuses 3 and 2, recomputes
    # 1 and 0 (8 examples); panel 2 (0, 1, 2, 3) reuses 0 and 1, recomputes 2 and 3 (6).
    two = runs["two"]
    assert two["mode"] == "panels" and two["cached"] == 2
    assert two["rows"] == 1.0 and two["cols"] == (14 + 8 + 6) / 14
    none = runs["none"]  # no column cache: rows are still computed once
    assert none["mode"] == "panels" and none["cached"] == 0
    assert none["rows"] == 1.0 and none["cols"] == 3.0
    tiny = runs["tiny"]  # not even a panel fits: every tile computes both blocks
    assert tiny["mode"] == "tiles"
    assert tiny["rows"] == 4.0 and tiny["cols"] == 3.0


def _errors(out: np.ndarray, refs: list[np.ndarray]) -> list[float]:
    return [float(np.abs(out - r).max() / np.abs(r).max()) for r in refs]


def _job_accuracy(job: dict) -> dict:
    from kernel_job import data, make_kernel_fn, mlp, mlp_params

    import ntk_dist
    from ntk_dist.engine import compute_kernel
    from ntk_dist.executors import LocalExecutor

    params = mlp_params(0)
    results = []
    for case in job["cases"]:
        trace, diag = case["trace"], case["diag"]
        if case["kind"] == "ntk":
            kernel_fn = ntk_dist.empirical_ntk_fn(mlp, trace, diag, vmap_axes=case["vmap"])
        else:
            kernel_fn = ntk_dist.empirical_nngp_fn(mlp, trace, diag)
        oracle = make_kernel_fn(case["kind"], trace, diag, attrs=False)
        x1 = data(1, case["n1"])
        x2 = None if case["n2"] is None else data(2, case["n2"])
        other = x1 if x2 is None else x2
        refs = [np.asarray(oracle(x1, other, params)), np.asarray(kernel_fn(x1, other, params))]
        executor = LocalExecutor()
        out = compute_kernel(
            kernel_fn, x1, x2, params, block_size=case["block"], executor=executor, progress=False
        )
        err_oracle, err_call = _errors(out, refs)
        reuse = executor.reuse
        results.append(
            {
                "shape_ok": out.shape == refs[0].shape == refs[1].shape,
                "err_oracle": err_oracle,
                "err_call": err_call,
                "mode": reuse.mode,
                "rows": reuse.rows,
                "cols": reuse.cols,
                "total": reuse.total,
                "compilations": executor.compilations,
                "devices": executor.n_devices,
            }
        )
    return {"results": results}


def _job_budget(job: dict) -> dict:
    from kernel_job import data, make_kernel_fn, mlp, mlp_params

    import ntk_dist
    from ntk_dist.engine import compute_kernel
    from ntk_dist.executors import LocalExecutor

    params = mlp_params(0)
    kernel_fn = ntk_dist.empirical_ntk_fn(mlp, (), (), vmap_axes=0)
    x1, x2 = data(1, job["n1"]), data(2, job["n2"])
    ref = np.asarray(make_kernel_fn("ntk", (), (), attrs=False)(x1, x2, params))

    def run(budget: int) -> dict:
        executor = LocalExecutor(memory_budget=budget)
        out = compute_kernel(
            kernel_fn, x1, x2, params, block_size=job["block"], executor=executor, progress=False
        )
        r = executor.reuse
        return {
            "err_oracle": _errors(out, [ref])[0],
            "mode": r.mode,
            "cached": r.cached_blocks,
            "rows": r.rows,
            "cols": r.cols,
            "base": r.base_bytes,
            "block": r.block_bytes,
        }

    ample = run(1 << 30)
    base, block = ample["base"], ample["block"]
    return {
        "runs": {
            "ample": ample,
            "two": run(base + int(2.5 * block)),
            "none": run(base + block // 2),
            "tiny": run(base - 1),
        }
    }


if __name__ == "__main__":
    import jax

    jax.config.update("jax_enable_x64", True)
    spec = json.loads(sys.argv[1])
    print(json.dumps({"accuracy": _job_accuracy, "budget": _job_budget}[spec["job"]](spec)))
