"""Every zoo model (tests/zoo.py) and NTK implementation against the explicit-Jacobian oracle.

Each kernel equals the oracle of tests/test_empirical_oracle.py (full ``jax.jacrev``
Jacobians contracted by numpy, then ``apply_axes``) to 1e-10 relative: (a) called
directly (op by op), (b) under ``jax.jit``, (c) tiled by ``compute_kernel`` with ragged
blocks and (d) tiled on 4 CPU devices. compute_kernel takes single-array kernels, so models
with pytree outputs go through (c) and (d) one output leaf at a time.

The compiled runs (b)-(d) happen in two child processes (this file run as a script, with 1
and 4 CPU devices) started with the module, so they use the second core while this process
computes the oracles and the op-by-op calls (a); the tests compare what they saved.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from test_empirical_oracle import apply_axes, full_jacobian

import ntk_dist
from ntk_dist.engine import compute_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLEMENTATIONS = [1, 2, 3]
RELATIVE_TOL = 1e-10
CASES = {case.name: case for case in zoo.cases()}
ALL = [(name, impl) for name in CASES for impl in IMPLEMENTATIONS]
# Tiled runs cost compilations, so each model is tiled with two of the three
# implementations on one device and two on four, in rotations that tile every pair.
TILED = [
    (name, impl) for k, name in enumerate(CASES) for impl in IMPLEMENTATIONS if impl != k % 3 + 1
]
FOUR_DEVICES = [
    (name, impl)
    for k, name in enumerate(CASES)
    for impl in IMPLEMENTATIONS
    if impl != (k + 1) % 3 + 1
]
# child process: device count -> (stage, cases) it computes
STAGES = {1: [("jit", ALL), ("tiled", TILED)], 4: [("four_devices", FOUR_DEVICES)]}


def _symmetric(name: str) -> bool:
    """Tiled runs alternate between x2=None (mirrored tiles) and a separate x2."""
    return list(CASES).index(name) % 2 == 0


def _leaf_fns(case: zoo.ZooCase) -> list[Callable[..., Any]]:
    """f itself for single-output models, else one function per output leaf."""
    if case.n_outputs == 1:
        return [case.f]
    return [
        functools.partial(lambda i, p, x, **kw: jax.tree.leaves(case.f(p, x, **kw))[i], i)
        for i in range(case.n_outputs)
    ]


def _ntk_fn(case: zoo.ZooCase, impl: int, f: Callable[..., Any] | None = None) -> Callable:
    return ntk_dist.empirical_ntk_fn(
        case.f if f is None else f,
        case.trace_axes,
        case.diagonal_axes,
        case.vmap_axes,
        implementation=impl,
    )


@functools.cache
def _jacobians(name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Full Jacobians of every output leaf at x1 and at x2, from one ``full_jacobian``."""
    case = CASES[name]
    batches = (case.x1, case.x2)

    def outputs(p: Any) -> jax.Array:
        leaves = [leaf.ravel() for x in batches for leaf in jax.tree.leaves(case.apply(x, p))]
        return jnp.concatenate(leaves)

    # jit only saves op-by-op dispatch: jax.jacrev differentiates it as usual
    jac = full_jacobian(jax.jit(outputs), case.params)
    per_batch, start = [], 0
    for x in batches:
        leaves = []
        for leaf in jax.tree.leaves(jax.eval_shape(case.apply, x)):
            leaves.append(jac[start : start + leaf.size].reshape(leaf.shape + jac.shape[-1:]))
            start += leaf.size
        per_batch.append(leaves)
    return per_batch[0], per_batch[1]


@functools.cache
def _oracle(name: str, symmetric: bool) -> list[np.ndarray]:
    """The oracle kernel of each output leaf: Jacobians contracted by numpy, axes applied."""
    case = CASES[name]
    jac1, jac2 = _jacobians(name)
    kernels = []
    for j1, j2 in zip(jac1, jac1 if symmetric else jac2, strict=True):
        full = np.einsum("ap,bp->ab", j1.reshape(-1, j1.shape[-1]), j2.reshape(-1, j2.shape[-1]))
        full = full.reshape(j1.shape[:-1] + j2.shape[:-1])
        kernels.append(apply_axes(full, j1.ndim - 1, case.trace_axes, case.diagonal_axes))
    return kernels


def _assert_matches(got: Any, want: list[np.ndarray]) -> None:
    got = [np.asarray(g) for g in jax.tree.leaves(got)]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        error = np.abs(g - w).max() / np.abs(w).max()
        assert error < RELATIVE_TOL, error


def _same_structure(case: zoo.ZooCase, kernel: Any) -> bool:
    """Whether a pytree-output model got a kernel per output, in the same structure."""
    return jax.tree.structure(kernel) == jax.tree.structure(case.apply(case.x1))


def _tiled(case: zoo.ZooCase, impl: int, symmetric: bool) -> list[np.ndarray]:
    """compute_kernel over ragged tiles, one run per output leaf (square blocks if mirrored)."""
    block = (case.block[0],) * 2 if symmetric or 0 in case.diagonal_axes else case.block
    return [
        compute_kernel(
            _ntk_fn(case, impl, f),
            case.x1,
            None if symmetric else case.x2,
            case.params,
            block_size=block,
            progress=False,
            **case.kwargs,
        )
        for f in _leaf_fns(case)
    ]


def _compute(stage: str, name: str, impl: int) -> tuple[list[np.ndarray], bool]:
    """A child's kernel leaves for one case, and whether the kernel had f's structure."""
    case = CASES[name]
    if stage == "jit":
        kernel = jax.jit(_ntk_fn(case, impl))(case.x1, case.x2, case.params, **case.kwargs)
        return [np.asarray(k) for k in jax.tree.leaves(kernel)], _same_structure(case, kernel)
    return _tiled(case, impl, _symmetric(name)), True


class _Child:
    """A child process computing its STAGES on ``devices`` CPU devices into ``out_dir``."""

    def __init__(self, out_dir: str, devices: int):
        self.out_dir = out_dir
        env = dict(
            os.environ,
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            JAX_PLATFORMS="cpu",
            PYTHONPATH=os.pathsep.join(
                filter(None, [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH")])
            ),
        )
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), out_dir],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @functools.cached_property
    def report(self) -> dict:
        stdout, stderr = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, stderr[-4000:]
        return json.loads(stdout.strip().splitlines()[-1])

    def kernels(self, stage: str, name: str, impl: int) -> list[np.ndarray]:
        key = f"{stage}-{name}-{impl}"
        error = self.report["errors"].get(key)
        assert error is None, error
        assert self.report["structure_ok"][key]
        with np.load(os.path.join(self.out_dir, f"{key}.npz")) as leaves:
            return [leaves[str(i)] for i in range(len(leaves.files))]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def children(tmp_path_factory):
    started = {n: _Child(str(tmp_path_factory.mktemp(f"zoo_{n}_devices")), n) for n in STAGES}
    yield started
    for child in started.values():
        child.close()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(CASES))
def test_direct_call(name, impl):
    case = CASES[name]
    kernel = _ntk_fn(case, impl)(case.x1, case.x2, case.params, **case.kwargs)
    assert _same_structure(case, kernel)
    _assert_matches(kernel, _oracle(name, False))


@pytest.mark.parametrize(("name", "impl"), ALL)
def test_under_jit(children, name, impl):
    _assert_matches(children[1].kernels("jit", name, impl), _oracle(name, False))


@pytest.mark.parametrize(("name", "impl"), TILED)
def test_tiled_by_compute_kernel(children, name, impl):
    kernels = children[1].kernels("tiled", name, impl)
    _assert_matches(kernels, _oracle(name, _symmetric(name)))


@pytest.mark.parametrize(("name", "impl"), FOUR_DEVICES)
def test_tiled_on_four_devices(children, name, impl):
    assert children[4].report["devices"] == 4
    kernels = children[4].kernels("four_devices", name, impl)
    _assert_matches(kernels, _oracle(name, _symmetric(name)))


def _run_child(out_dir: str) -> dict:
    """Compute this device count's STAGES; save kernels, report errors per case."""
    errors, structure_ok = {}, {}
    for stage, stage_cases in STAGES[jax.device_count()]:
        for name, impl in stage_cases:
            key = f"{stage}-{name}-{impl}"
            try:
                leaves, structure_ok[key] = _compute(stage, name, impl)
            except Exception as e:  # reported by the test of this case
                errors[key] = f"{type(e).__name__}: {e}"
                continue
            np.savez(
                os.path.join(out_dir, f"{key}.npz"), **{str(i): v for i, v in enumerate(leaves)}
            )
    return {"devices": jax.device_count(), "errors": errors, "structure_ok": structure_ok}


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    print(json.dumps(_run_child(sys.argv[1])))
