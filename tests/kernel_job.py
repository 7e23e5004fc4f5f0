"""Helpers for engine tests: a tiny MLP, an explicit-Jacobian kernel oracle and a job runner.

Imported by the tests, and run as a script (``python tests/kernel_job.py JSON``) in
subprocesses that need their own JAX settings (device count, x64, memory limits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mlp_params(seed: int, d_in: int = 3, width: int = 8, d_out: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(size=(d_in, width)) / np.sqrt(d_in),
        "b1": rng.normal(size=(width,)) * 0.1,
        "w2": rng.normal(size=(width, d_out)) / np.sqrt(width),
    }


def mlp(params: dict, x):
    import jax.numpy as jnp

    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def make_kernel_fn(kind: str = "ntk", trace_axes=(-1,), diagonal_axes=(), attrs: bool = True):
    """Kernel of ``mlp`` from explicit per-example Jacobians (``jax.jacrev``) and einsum.

    Layout of neural-tangents: non-traced output axes in order, a pair each, a
    diagonal one once; traced axes are averaged.
    """
    import jax
    import jax.numpy as jnp

    def feats(params, x):
        if kind == "nngp":
            return [mlp(params, x)]  # (N, C)
        jac = jax.vmap(jax.jacrev(lambda p, xi: mlp(p, xi[None])[0]), (None, 0))(params, x)
        return [leaf.reshape(leaf.shape[:2] + (-1,)) for leaf in jax.tree.leaves(jac)]

    def kernel_fn(x1, x2, params):
        f_ndim = 2
        trace = {a % f_ndim for a in trace_axes}
        diag = {a % f_ndim for a in diagonal_axes}
        lhs, rhs, out = "ac", "bd", ""
        for k in range(f_ndim):
            if k in trace or k in diag:
                rhs = rhs.replace(rhs[k], lhs[k])
            if k not in trace:
                out += lhs[k] if k in diag else lhs[k] + rhs[k]
        fx2 = feats(params, x1 if x2 is None else x2)
        total = 0
        for u, v in zip(feats(params, x1), fx2, strict=True):
            extra = "p" if u.ndim == 3 else ""
            total = total + jnp.einsum(f"{lhs}{extra},{rhs}{extra}->{out}", u, v)
        size = int(np.prod([2 if k == 1 else 1 for k in trace])) if trace else 1
        return total / size

    if attrs:
        kernel_fn.kind = kind
        kernel_fn.trace_axes = tuple(trace_axes)
        kernel_fn.diagonal_axes = tuple(diagonal_axes)
        kernel_fn.implementation = "jacobian_contraction"
    return kernel_fn


def run_job(job: dict, *, devices: int = 1, timeout: float = 120, env: dict | None = None):
    """Run ``job`` in a fresh interpreter with ``devices`` CPU devices; return its JSON."""
    child_env = dict(os.environ)
    child_env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
        **(env or {}),
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "kernel_job.py"), json.dumps(job)],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"job failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def data(seed: int, n: int, d_in: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d_in))


def counting_executor():
    """A LocalExecutor that records how many tiles it was asked to compute."""
    from ntk_dist.executors import LocalExecutor

    class Counting(LocalExecutor):
        tiles_run = 0

        def run(self, kernel_fn, x1, x2, params, tiles, on_tile_done, **kw):
            tiles = list(tiles)
            self.tiles_run += len(tiles)
            super().run(kernel_fn, x1, x2, params, tiles, on_tile_done, **kw)

    return Counting()


def _job_accuracy(job: dict) -> dict:
    """Tiled (in memory and in a store) vs one call, for every case in job['cases']."""
    import zarr

    from ntk_dist.engine import compute_kernel

    params = mlp_params(0)
    results = []
    for k, case in enumerate(job["cases"]):
        if case.get("empirical"):  # the library's own kernel functions
            import ntk_dist

            kernel_fn = ntk_dist.empirical_ntk_fn(
                mlp, case["trace"], case["diag"], implementation=case["empirical"]
            )
        else:
            kernel_fn = make_kernel_fn(
                case["kind"], case["trace"], case["diag"], case.get("attrs", True)
            )
        x1 = data(1, case["n1"])
        x2 = None if case["n2"] is None else data(2, case["n2"])
        ref = np.asarray(kernel_fn(x1, x1 if x2 is None else x2, params))
        if case.get("zarr_input"):
            x1 = zarr.create_array(os.path.join(job["dir"], f"x1_{k}.zarr"), data=x1, chunks=(3, 3))
        executor = counting_executor()
        mem = compute_kernel(
            kernel_fn, x1, x2, params, block_size=case["block"], executor=executor, progress=False
        )
        store = compute_kernel(
            kernel_fn,
            x1,
            x2,
            params,
            block_size=case["block"],
            executor=executor,
            progress=False,
            store=os.path.join(job["dir"], f"k{k}.zarr"),
        )
        plain = zarr.open_array(store.path, mode="r")[...]
        scale = np.abs(ref).max()
        results.append(
            {
                "shape_ok": mem.shape == ref.shape == store.shape,
                "err_memory": float(np.abs(mem - ref).max() / scale),
                "err_store": float(np.abs(store.to_numpy() - ref).max() / scale),
                "err_zarr": float(np.abs(plain - ref).max() / scale),
                "dtype": str(store.dtype),
                "compilations": executor.compilations,
                "tiles": executor.tiles_run,
                "n_plan": len(store.plan),
                "devices": executor.n_devices,
            }
        )
    return {"results": results}


def _job_compute(job: dict) -> dict:
    """compute_kernel into a store; optionally slowed down or under a file size limit."""
    import resource
    import signal
    import time

    from ntk_dist.engine import compute_kernel
    from ntk_dist.store import KernelStore

    if job.get("slow"):
        write = KernelStore.write_tile

        def slow_write(self, tile, block):
            time.sleep(job["slow"])
            write(self, tile, block)

        KernelStore.write_tile = slow_write
    if job.get("fsize_limit"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize_limit"],) * 2)
    kernel_fn = make_kernel_fn(job.get("kind", "ntk"), job.get("trace", (-1,)), ())
    x1 = data(1, job["n"])
    params = mlp_params(0)
    executor = counting_executor()
    try:
        compute_kernel(
            kernel_fn,
            x1,
            None,
            params,
            block_size=job["block"],
            store=job["store"],
            executor=executor,
            progress=True,
        )
        error = None
    except Exception as e:  # reported to the test
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "tiles_run": executor.tiles_run}


def _job_memory(job: dict) -> dict:
    """Peak RSS growth of a budget-planned compute_kernel (run with one device)."""
    import jax

    from ntk_dist.engine import compute_kernel

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    params = mlp_params(0, d_in=job["d_in"], width=job["width"], d_out=1)
    kernel_fn = make_kernel_fn("ntk", (-1,), ())
    x1, x2 = data(1, job["n1"], job["d_in"]), data(2, job["n2"], job["d_in"])
    jax.block_until_ready(jax.numpy.ones(1))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    store = compute_kernel(
        kernel_fn,
        x1,
        x2,
        params,
        store=job["store"],
        progress=False,
        memory_budget=job["budget"],
        block_size=job.get("block"),
    )
    n_params = sum(np.size(v) for v in params.values())
    return {
        "before": before,
        "after": status("VmHWM"),
        "block_shape": list(store.plan.block_shape),
        "n_params": int(n_params),
        "complete": store.is_complete,
    }


if __name__ == "__main__":
    import jax

    spec = json.loads(sys.argv[1])
    jax.config.update("jax_enable_x64", spec.get("x64", True))
    handler = {"accuracy": _job_accuracy, "compute": _job_compute, "memory": _job_memory}
    print(json.dumps(handler[spec["job"]](spec)))
