"""Kernel jobs as the command line and the demo run them.

Load a model factory (``module:function``) and data (``.npy`` or Zarr), build a
kernel function from its options, compute it into a store while counting the
tiles actually computed, and describe or verify a store for ``ntk-dist inspect``.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ntk_dist.empirical import NtkImplementation, empirical_nngp_fn, empirical_ntk_fn
from ntk_dist.engine import compute_kernel
from ntk_dist.executors import LocalExecutor
from ntk_dist.store import KernelStore

__all__ = [
    "KernelJobResult",
    "describe_store",
    "kernel_function",
    "load_array",
    "load_model",
    "local_devices",
    "run_kernel_job",
]


def load_model(spec: str) -> tuple[Callable, Any]:
    """Call the factory named by ``module:function`` (or ``file.py:function``) with no
    arguments; it must return ``(f, params)`` with ``f(params, x)``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"model {spec!r} must be given as module:function (or path/to/file.py:function), "
            "e.g. ntk_dist.models:digits_cnn"
        )
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"model file {module_name} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"cannot import {module_name!r} for model {spec!r} ({e}); check the name, or "
                "give a file path (path/to/file.py:function)"
            ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_name} has no function {attr!r} (model {spec!r})")
    out = factory()
    if not (isinstance(out, tuple) and len(out) == 2 and callable(out[0])):
        raise TypeError(
            f"model factory {spec} must return (f, params) with f(params, x), "
            f"got {type(out).__name__}"
        )
    return out


def load_array(path: str | Path) -> Any:
    """An array with examples on axis 0 from a ``.npy`` file (memory-mapped, not read
    whole) or a Zarr array directory (read tile by tile)."""
    import zarr

    p = Path(path)
    if p.suffix == ".npy":
        if not p.is_file():
            raise FileNotFoundError(f"data file {p} does not exist")
        x = np.load(p, mmap_mode="r")
    elif p.is_dir():
        try:
            x = zarr.open(str(p), mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{p} is not a Zarr array ({e}); give a .npy file or a Zarr array"
            ) from e
        if not isinstance(x, zarr.Array):
            raise ValueError(
                f"{p} is a Zarr group, not an array; point at the array inside it "
                f"(e.g. {p}/{next(iter(x.array_keys()), 'NAME')})"
            )
    else:
        raise ValueError(f"data {p} must be a .npy file or a Zarr array directory")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"data {p} has shape {x.shape}; it needs examples on axis 0")
    return x


def local_devices(n: int | None) -> list[jax.Device]:
    """The first ``n`` local devices (all of them for None)."""
    devices = jax.local_devices()
    if n is None:
        return devices
    if not 1 <= n <= len(devices):
        raise ValueError(
            f"asked for {n} devices but this process sees {len(devices)} "
            f"({devices[0].platform}); on CPU start with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={max(n, 1)} to simulate more"
        )
    return devices[:n]


def kernel_function(
    f: Callable,
    kind: str = "ntk",
    trace_axes: Sequence[int] = (-1,),
    diagonal_axes: Sequence[int] = (),
    vmap_axes: int | None = None,
    implementation: int = 0,
) -> Callable:
    """``empirical_ntk_fn`` or ``empirical_nngp_fn`` of f (the NNGP ignores the last two)."""
    trace, diag = tuple(trace_axes), tuple(diagonal_axes)
    if kind == "ntk":
        return empirical_ntk_fn(f, trace, diag, vmap_axes, implementation)
    if kind == "nngp":
        return empirical_nngp_fn(f, trace, diag)
    raise ValueError(f"kernel kind {kind!r} is not known; choose 'ntk' or 'nngp'")


@dataclass(frozen=True)
class KernelJobResult:
    """A finished kernel job: its store, tiles computed now and in total, wall time, and where."""

    store: KernelStore
    tiles_computed: int
    tiles_total: int
    seconds: float
    ran_on: str


def run_kernel_job(
    kernel_fn: Callable,
    x1: Any,
    x2: Any,
    params: Any,
    store: str | Path,
    *,
    devices: int | None = None,
    ray: str | None = None,
    progress: bool = True,
    **options: Any,
) -> KernelJobResult:
    """:func:`compute_kernel` into ``store`` on the first ``devices`` local devices, or on a
    Ray cluster when ``ray`` is ``"auto"`` or an address.

    ``options`` go to :func:`compute_kernel` (``block_size``, ``memory_budget``,
    ``overwrite``, ``model_name``, ...). An existing store of the same kernel is
    resumed: only missing or damaged tiles are computed (``tiles_computed``).
    """
    if ray:
        from ntk_dist.executors.ray import executor_from_flag

        executor = executor_from_flag(ray)
    else:
        executor = LocalExecutor(local_devices(devices))
    start = time.perf_counter()
    result = compute_kernel(
        kernel_fn, x1, x2, params, store=str(store), executor=executor, progress=progress, **options
    )
    seconds = time.perf_counter() - start
    if ray:
        ran_on = f"{len(executor.workers)} Ray worker(s)"
    else:
        ran_on = f"{executor.n_devices} device(s)"
    return KernelJobResult(result, executor.tiles_computed, len(result.plan), seconds, ran_on)


def describe_store(store: KernelStore) -> str:
    """What ``ntk-dist inspect`` prints: what the kernel is and how far it got."""
    meta = store.metadata
    plan = store.plan
    done = len(store.completed_tiles())
    bm, bn = plan.block_shape
    layout = (
        "diagonal over the batch (blocks (i, i) only)"
        if plan.diagonal
        else "symmetric (upper triangle computed, mirrored)"
        if plan.symmetric
        else "full grid"
    )
    lines = [
        ("store", store.path),
        ("kind", f"{meta['kind']}{_implementation_name(meta['implementation'])}"),
        ("shape", f"{store.shape} {store.dtype.name}"),
        ("trace axes", str(meta["trace_axes"])),
        ("diagonal axes", str(meta["diagonal_axes"])),
        ("blocks", f"{bm} x {bn}, grid {plan.grid[0]} x {plan.grid[1]}, {layout}"),
        ("tiles", f"{done} / {len(plan)} done ({100 * done / len(plan):.1f} %)"),
        ("fingerprint", store.fingerprint),
        ("model name", str(meta["model_name"])),
    ]
    return "\n".join(f"{name:<14}{value}" for name, value in lines)


def _implementation_name(stored: str | None) -> str:
    """' (implementation AUTO)' from the stored value ('0' or 'NtkImplementation.AUTO')."""
    if stored is None:
        return ""
    if stored.isdigit() and int(stored) in set(NtkImplementation):
        stored = NtkImplementation(int(stored)).name
    return f" (implementation {stored.rpartition('.')[2]})"


def inspect_store(path: str | Path, verify: bool = False) -> tuple[str, bool]:
    """The report of ``ntk-dist inspect``, and False if ``verify`` found damaged tiles.

    Verification re-reads every completed tile and compares its sha256 checksum
    with the ledger; damaged tiles are named with the examples they cover.
    """
    store = KernelStore.open(path)
    text = describe_store(store)
    if not verify:
        return text, True
    checked = len(store.completed_tiles())
    damaged = store.verify()
    if not damaged:
        return f"{text}\n{'verify':<14}all {checked} completed tiles match their checksums", True
    names = "\n".join(
        f"  damaged tile ({t.i}, {t.j}): rows {t.row_start}:{t.row_stop}, "
        f"cols {t.col_start}:{t.col_stop}"
        for t in damaged
    )
    return (
        f"{text}\n{'verify':<14}{len(damaged)} of {checked} completed tiles FAILED their "
        f"checksums:\n{names}\nRerun the same `ntk-dist kernel` command (or compute_kernel "
        "with this store) to recompute exactly these tiles.",
        False,
    )
