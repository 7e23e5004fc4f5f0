"""``compute_kernel``: a kernel of any size, tile by tile, into memory or a store.

The engine plans tiles (:mod:`ntk_dist.tiling`), skips those a store already
holds (after re-checking their checksums), has an executor compute the rest and
writes each finished block. It never trusts file names: what the kernel is and
which inputs produced it live in the store's metadata.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import numpy as np

from ntk_dist.empirical.autotune import tune
from ntk_dist.executors import Executor, LocalExecutor
from ntk_dist.executors.local import default_memory_budget
from ntk_dist.progress import ProgressReporter
from ntk_dist.store import KernelStore, NonFiniteTileError, check_finite
from ntk_dist.tiling import Tile, TilePlan

__all__ = ["KernelLayout", "compute_kernel", "fingerprint", "kernel_layout"]

_HASH_ROWS = 4096


@dataclass(frozen=True)
class KernelLayout:
    """What a kernel function returns for one block, read from its attributes and shapes.

    ``entry_shape`` is the output shape after the batch axes, ``batch_diagonal``
    says the batch axis is a diagonal axis (the result is ``(n, ...)``) and
    ``mirror_axes`` is the permutation taking K(a, b) to K(b, a).
    """

    kind: str | None
    trace_axes: tuple[int, ...] | None
    diagonal_axes: tuple[int, ...]
    implementation: Any
    entry_shape: tuple[int, ...]
    dtype: np.dtype
    batch_diagonal: bool
    mirror_axes: tuple[int, ...]


def _axes(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if np.ndim(value) == 0 else tuple(int(a) for a in value)


def kernel_layout(
    kernel_fn: Callable, x1: Any, x2: Any, params: Any, **kwargs: Any
) -> KernelLayout:
    """Inspect ``kernel_fn`` on tiny blocks (``jax.eval_shape``) and check it can be tiled.

    Uses ``kernel_fn.kind``, ``.trace_axes``, ``.diagonal_axes`` and
    ``.implementation`` when present (plain callables: ``diagonal_axes=()``).
    Refuses kernels whose shape does not follow the blocks of examples, e.g. a
    trace over the batch axis.
    """
    x2 = x1 if x2 is None else x2
    trace = getattr(kernel_fn, "trace_axes", None)
    trace = None if trace is None else _axes(trace)
    diag = _axes(getattr(kernel_fn, "diagonal_axes", ()))
    n1, n2 = x1.shape[0], x2.shape[0]

    def shape_for(m: int, n: int) -> jax.ShapeDtypeStruct:
        a = jax.ShapeDtypeStruct((m, *x1.shape[1:]), x1.dtype)
        b = jax.ShapeDtypeStruct((n, *x2.shape[1:]), x2.dtype)
        return jax.eval_shape(lambda u, v: kernel_fn(u, v, params, **kwargs), a, b)

    # The output rank fixes f's rank, which turns negative axes into positive ones.
    probe = shape_for(1, 1)
    if not isinstance(probe, jax.ShapeDtypeStruct):
        leaves = jax.tree.structure(probe)
        raise ValueError(
            f"kernel_fn returns a pytree of kernels ({leaves}), but a store holds one kernel "
            "array: tile one output of f at a time, e.g. with "
            "f_a = lambda params, x: f(params, x)['a']"
        )
    g, t = len(diag), len(trace or ())
    f_ndim = (probe.ndim + g) // 2 + t
    norm_trace = {a % f_ndim for a in trace or ()}
    norm_diag = [a % f_ndim for a in diag]
    if 0 in norm_trace:
        raise ValueError(
            f"trace_axes={trace} sums over the batch axis 0: such a kernel couples all examples "
            "and cannot be tiled; compute it in one call or drop axis 0 from trace_axes"
        )
    batch_diagonal = 0 in norm_diag
    lead = 1 if batch_diagonal else 2
    if batch_diagonal and n1 != n2:
        raise ValueError(
            f"diagonal_axes={diag} includes the batch axis 0, which needs as many x2 as x1 "
            f"examples, got {n1} and {n2}"
        )
    m, n = (min(2, n1),) * 2 if batch_diagonal else (min(2, n1), min(3, n2))
    for (p, q), out in (((1, 1), probe), ((m, n), shape_for(m, n))):
        expected = (p,) if batch_diagonal else (p, q)
        if out.shape[:lead] != expected or out.shape[lead:] != probe.shape[lead:]:
            raise ValueError(
                f"kernel_fn returned shape {out.shape} for blocks of {p} and {q} examples; "
                f"tiling needs {expected} followed by the same output axes for every block "
                f"(trace_axes={trace}, diagonal_axes={diag} cannot be tiled this way)"
            )
    # neural-tangents layout: non-traced output axes in order, a pair (x1, x2) each,
    # a single axis for a diagonal one.
    perm: list[int] = []
    for axis in range(f_ndim):
        if axis in norm_trace:
            continue
        pos = len(perm)
        perm += [pos] if axis in norm_diag else [pos + 1, pos]
    if len(perm) != probe.ndim:
        raise ValueError(
            f"kernel_fn returns rank {probe.ndim}, which does not match trace_axes={trace} and "
            f"diagonal_axes={diag}; set kernel_fn.trace_axes/.diagonal_axes to what it computes"
        )
    return KernelLayout(
        kind=getattr(kernel_fn, "kind", None),
        trace_axes=trace,
        diagonal_axes=diag,
        implementation=getattr(kernel_fn, "implementation", None),
        entry_shape=tuple(probe.shape[lead:]),
        dtype=np.dtype(probe.dtype),
        batch_diagonal=batch_diagonal,
        mirror_axes=tuple(perm),
    )


def fingerprint(
    x1: Any, x2: Any, params: Any, model_name: str | None = None, kwargs: dict | None = None
) -> str:
    """sha256 of the inputs: bytes, shapes and dtypes of x1, x2, params (and their tree
    structure), kernel kwargs and a user-given model name. Large inputs are read in row
    chunks, so zarr inputs need not fit in memory."""
    h = hashlib.sha256()

    def add_array(name: str, x: Any) -> None:
        h.update(f"{name}:{tuple(x.shape)}:{np.dtype(x.dtype).str}".encode())
        if x.ndim == 0:
            h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
        for start in range(0, x.shape[0] if x.ndim else 0, _HASH_ROWS):
            h.update(np.ascontiguousarray(np.asarray(x[start : start + _HASH_ROWS])).tobytes())

    add_array("x1", x1)
    if x2 is None:
        h.update(b"x2:None")
    else:
        add_array("x2", x2)
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    h.update(str(tree).encode())
    for path, leaf in leaves:
        add_array(jax.tree_util.keystr(path), np.asarray(leaf))
    for key in sorted(kwargs or {}):
        value = kwargs[key]
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            add_array(f"kw:{key}", np.asarray(value))
        else:
            h.update(f"kw:{key}={value!r}".encode())
    h.update(f"model:{model_name!r}".encode())
    return h.hexdigest()


def _plan(
    n1: int,
    n2: int,
    layout: KernelLayout,
    symmetric: bool,
    block_size: int | Sequence[int] | None,
    memory_budget: int | None,
    estimate: Callable[[], tuple[float, float]],
    n_devices: int,
) -> TilePlan:
    if block_size is not None:
        bm, bn = (block_size,) * 2 if np.ndim(block_size) == 0 else tuple(block_size)
        return TilePlan(n1, n2, (int(bm), int(bn)), symmetric, layout.batch_diagonal)
    fixed, per_example = estimate()
    entry = layout.dtype.itemsize * math.prod(layout.entry_shape)
    return TilePlan.from_budget(
        n1,
        n2,
        memory_budget=memory_budget or default_memory_budget(),
        per_example_bytes=per_example,
        entry_bytes=entry,
        fixed_bytes=fixed,
        n_devices=n_devices,
        symmetric=symmetric,
        diagonal=layout.batch_diagonal,
    )


def compute_kernel(
    kernel_fn: Callable,
    x1: Any,
    x2: Any = None,
    params: Any = None,
    *,
    store: Any = None,
    block_size: int | Sequence[int] | None = None,
    executor: Executor | None = None,
    progress: bool = True,
    overwrite: bool = False,
    model_name: str | None = None,
    memory_budget: int | None = None,
    dtype: Any = None,
    verify: bool = True,
    **kwargs: Any,
) -> KernelStore | np.ndarray:
    """Compute ``kernel_fn(x1, x2, params, **kwargs)`` block by block.

    Args:
      kernel_fn: a function from ``empirical_ntk_fn``/``empirical_nngp_fn`` (or
        any ``f(x1, x2, params, **kwargs)`` returning neural-tangents layout).
      x1, x2: numpy, jax or zarr arrays with examples on axis 0, read tile by
        tile. ``x2=None`` means x1: only the upper triangle of blocks is
        computed and mirrored.
      store: None to return a numpy array, else a path (local directory,
        kvstore URL or tensorstore kvstore spec) for a :class:`KernelStore`.
        An existing store of the same kernel is resumed: its completed tiles
        are checked (``verify``) and only missing or damaged ones computed.
      block_size: rows (and columns) of a tile, or ``(rows, cols)``. Default:
        the store's block shape when resuming, else chosen from ``memory_budget``
        (bytes per device; default half the device memory or 1 GiB). A kernel_fn with
        ``implementation=AUTO`` is tuned for these tiles first (implementation, then
        blocks; see :mod:`ntk_dist.empirical.autotune`) and the pick computes them.
      executor: where tiles are computed; default ``LocalExecutor(memory_budget=...)``,
        which reuses per-block Jacobians across tiles within the budget.
      overwrite: replace a store that holds a different kernel.
      model_name: goes into the inputs' fingerprint (tell models apart whose
        params happen to be equal).
      dtype: stored dtype; default the kernel's own (float32, float64 with x64).
      verify: re-check checksums of completed tiles before resuming.

    Returns:
      the :class:`KernelStore` (complete), or the kernel as a numpy array.
    Raises:
      NonFiniteTileError: some tiles had NaN/Inf; they are listed and were not
        written (all other tiles were).
    """
    executor = LocalExecutor(memory_budget=memory_budget) if executor is None else executor
    auto = getattr(kernel_fn, "autotune", None)
    # AUTO's candidates return the same shapes: probe one, so that the probes are not tuned for.
    probe = kernel_fn if auto is None else next(iter(auto.candidates.values()))
    layout = kernel_layout(probe, x1, x2, params, **kwargs)
    layout = replace(layout, implementation=getattr(kernel_fn, "implementation", None))
    symmetric = x2 is None and not layout.batch_diagonal
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    out_dtype = np.dtype(dtype) if dtype is not None else layout.dtype

    existing = None
    if store is not None and block_size is None and not overwrite:
        try:
            existing = KernelStore.open(store)
        except FileNotFoundError:
            existing = None
    if existing is not None:
        block_size = existing.plan.block_shape

    n_devices = getattr(executor, "n_devices", 1)

    def plan_for(fn: Callable, block: int | Sequence[int] | None) -> TilePlan:
        def estimate() -> tuple[float, float]:
            model = getattr(executor, "memory_model", None)
            if model is None:
                raise ValueError(
                    f"{type(executor).__name__} cannot estimate tile memory; pass block_size"
                )
            return model(fn, x1, x2, params, diagonal=layout.batch_diagonal, **kwargs)

        return _plan(n1, n2, layout, symmetric, block, memory_budget, estimate, n_devices)

    if auto is not None:  # AUTO: pick the implementation, and the blocks if not given
        requested = None if block_size is None else [int(b) for b in np.atleast_1d(block_size)]
        tiles = {
            "block_size": requested,
            "memory_budget": memory_budget,
            "executor": type(executor).__name__,
            "executor_memory_budget": getattr(executor, "memory_budget", None),
        }
        decision = tune(
            auto,
            x1,
            x2,
            params,
            kwargs,
            n_devices=n_devices,
            tiles=tiles,
            block_shape_for=None if requested else lambda fn: plan_for(fn, None).block_shape,
        )
        kernel_fn = auto.candidates[decision.implementation]  # the store still says AUTO
        block_size = decision.block_shape if block_size is None else block_size
    plan = plan_for(kernel_fn, block_size)
    report = ProgressReporter("tiles", len(plan), "kernel entries", enabled=progress)

    if store is None:
        result = np.empty(plan.kernel_shape + layout.entry_shape, out_dtype)
        todo = plan.tiles()
        kernel_store = None
    else:
        kernel_store = KernelStore.create(
            store,
            plan=plan,
            entry_shape=layout.entry_shape,
            dtype=out_dtype,
            kind=layout.kind,
            trace_axes=layout.trace_axes,
            diagonal_axes=layout.diagonal_axes,
            mirror_axes=layout.mirror_axes,
            fingerprint=fingerprint(x1, x2, params, model_name, kwargs),
            model_name=model_name,
            implementation=layout.implementation,
            overwrite=overwrite,
        )
        done = kernel_store.completed_tiles()
        if done and verify:
            damaged = kernel_store.verify()
            if damaged:
                report.note(
                    f"{len(damaged)} stored tiles failed their checksum and will be recomputed: "
                    + ", ".join(f"({t.i}, {t.j})" for t in damaged[:10])
                )
                kernel_store.forget_tiles([(t.i, t.j) for t in damaged])
        todo = kernel_store.missing_tiles()
        if len(todo) < len(plan):
            report.note(
                f"resuming {kernel_store.path}: {len(plan) - len(todo)} of "
                f"{len(plan)} tiles already done"
            )
    report.done = len(plan) - len(todo)

    def entries(tile: Tile) -> int:
        pairs = tile.shape[0] if plan.diagonal else tile.shape[0] * tile.shape[1]
        return pairs * (2 if tile.mirrored else 1)

    # Executors whose workers write the store themselves (Ray, multi-process) get
    # the store; only completion comes back here. They raise NonFiniteTileError.
    run_into_store = getattr(executor, "run_into_store", None)
    if kernel_store is not None and run_into_store is not None:
        run_into_store(
            kernel_fn,
            x1,
            x2,
            params,
            todo,
            kernel_store,
            lambda tile: report.update(entries(tile)),
            plan=plan,
            **kwargs,
        )
        return kernel_store

    failed: list[NonFiniteTileError] = []

    def on_tile_done(tile: Tile, block: np.ndarray) -> None:
        try:
            if kernel_store is not None:
                kernel_store.write_tile(tile, block)
            else:
                check_finite(tile, block, diagonal=plan.diagonal)
                _place(result, tile, block, plan, layout.mirror_axes)
        except NonFiniteTileError as e:
            failed.append(e)
            report.note(str(e))
        report.update(entries(tile))

    executor.run(kernel_fn, x1, x2, params, todo, on_tile_done, plan=plan, **kwargs)
    if failed:
        tiles = [t for e in failed for t in e.tiles]
        raise NonFiniteTileError(
            f"{len(tiles)} tiles had NaN/Inf and were not written: "
            + "; ".join(str(e) for e in failed[:5])
            + (" ..." if len(failed) > 5 else "")
            + ". Check the inputs and params of those rows; rerun to resume the others.",
            tiles,
        )
    return kernel_store if kernel_store is not None else result


def _place(
    result: np.ndarray, tile: Tile, block: np.ndarray, plan: TilePlan, mirror: Sequence[int]
) -> None:
    if plan.diagonal:
        result[tile.rows] = block
        return
    result[tile.rows, tile.cols] = block
    if tile.mirrored:
        result[tile.cols, tile.rows] = block.transpose(mirror)
