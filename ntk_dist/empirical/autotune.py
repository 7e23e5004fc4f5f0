"""AUTO: rank the implementations by the cost model, time the best few, remember the pick.

For one request (f at these shapes, trace / diagonal axes, dtype, devices) the cost model
(:mod:`ntk_dist.empirical.cost_model`) ranks every registered implementation and drops
those whose memory does not fit (in one call; tiles always fit). The first
``TOP_CANDIDATES`` are then timed on one small block of ``MEASURE_EXAMPLES`` examples a
side (compiled ahead, so compilation is not timed; a couple of repetitions, each
candidate bounded to about ``SECONDS_PER_CANDIDATE``) and the time of the whole request
is extrapolated: per example for the features of two-stage kernels (Jacobians, computed
once per example), per kernel entry for the rest. The fastest wins.

Decisions are kept in memory and in ``autotune.json`` under ``$NTK_DIST_CACHE`` (default
``~/.cache/ntk_dist``), keyed by a hash of f's jaxpr at these shapes, the parameter and
input shapes and dtypes, the axes, the devices and the library versions, so another
process does not tune again. A corrupt or unwritable cache only warns.
``NTK_DIST_AUTOTUNE=model`` turns measurement off: the cost model alone decides,
deterministically (for tests and CI). Calls with array keyword arguments (masks, rng keys)
are not measured either, as their examples cannot be cut to a block without knowing
their batch axes, nor are multi-process JAX jobs, whose processes must pick alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ntk_dist.empirical.axes import Axes
from ntk_dist.empirical.batching import VmapAxes, canonicalize_vmap_axes
from ntk_dist.empirical.cost_model import estimate_problem, rank
from ntk_dist.empirical.implementation import NtkImplementation
from ntk_dist.empirical.memory import memory_budget_bytes
from ntk_dist.empirical.problem import KernelProblem, make_problem

CACHE_ENV = "NTK_DIST_CACHE"
MODE_ENV = "NTK_DIST_AUTOTUNE"
MODES = ("measure", "model")
CACHE_NAME = "autotune.json"
TOP_CANDIDATES = 2
MEASURE_EXAMPLES = 8
REPEATS = 2
SECONDS_PER_CANDIDATE = 2.0


@dataclasses.dataclass(frozen=True)
class AutotuneSpec:
    """What AUTO tunes over: f, the kernel's axes and one kernel function per implementation.

    ``candidates`` are ``empirical_ntk_fn(f, ..., implementation=i)`` for every registered
    implementation i (the single list of candidates).
    """

    f: Callable[..., Any]
    trace_axes: Axes
    diagonal_axes: Axes
    vmap_axes: Any
    candidates: Mapping[NtkImplementation, Callable[..., Any]]

    @property
    def vmap(self) -> VmapAxes | None:
        """The parsed ``vmap_axes``."""
        return canonicalize_vmap_axes(self.vmap_axes)

    def problem(
        self, x1: Any, x2: Any | None, params: Any, kwargs: dict[str, Any]
    ) -> KernelProblem:
        """The request resolved: output shapes, canonical axes (x1, x2 may be abstract)."""
        return make_problem(
            self.f, x1, x2, params, kwargs, self.trace_axes, self.diagonal_axes, self.vmap
        )


@dataclasses.dataclass(frozen=True)
class Decision:
    """AUTO's pick for one request; ``seconds`` are the extrapolated times it measured."""

    implementation: NtkImplementation
    block_shape: tuple[int, int] | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    source: str = "cost model"

    def to_json(self) -> dict[str, Any]:
        return {
            "implementation": self.implementation.name,
            "block_shape": None if self.block_shape is None else list(self.block_shape),
            "seconds": self.seconds,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Decision:
        block = entry.get("block_shape")
        return cls(
            NtkImplementation[entry["implementation"]],
            None if block is None else (int(block[0]), int(block[1])),
            {str(k): float(v) for k, v in entry.get("seconds", {}).items()},
            "disk cache",
        )


@dataclasses.dataclass
class Counters:
    """What tuning did in this process: candidates timed, decisions read from disk."""

    measurements: int = 0
    disk_reads: int = 0


COUNTERS = Counters()
_decisions: dict[str, Decision] = {}


def forget() -> None:
    """Drop the decisions kept in memory (as in a fresh process); the disk cache stays."""
    _decisions.clear()


def cache_file() -> Path:
    """``$NTK_DIST_CACHE/autotune.json`` (default ``~/.cache/ntk_dist/autotune.json``)."""
    folder = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ntk_dist"
    return Path(folder) / CACHE_NAME


def mode() -> str:
    """``$NTK_DIST_AUTOTUNE``: 'measure' (default) or 'model' (cost model only)."""
    value = os.environ.get(MODE_ENV, "measure").strip().lower() or "measure"
    if value not in MODES:
        raise ValueError(
            f"{MODE_ENV}={value!r} is not one of {MODES}: 'measure' times the best candidates, "
            "'model' lets the cost model alone decide"
        )
    return value


def _measuring() -> bool:
    """Measure unless turned off, or in a multi-process job, whose processes must agree."""
    return mode() == "measure" and jax.process_count() == 1


def tune(
    spec: AutotuneSpec,
    x1: Any,
    x2: Any | None,
    params: Any,
    kwargs: dict[str, Any],
    *,
    n_devices: int = 1,
    tiles: dict[str, Any] | None = None,
    block_shape_for: Callable[[Callable[..., Any]], tuple[int, int]] | None = None,
    problem: KernelProblem | None = None,
) -> Decision:
    """AUTO's decision for ``kernel(x1, x2, params, **kwargs)``, from memory, disk or tuning.

    x1, x2 may be numpy, jax or zarr arrays or tracers (only shapes and dtypes are read,
    and the first rows when measuring). ``tiles`` describes a tiled run (what it asked for:
    block size, memory budget, executor); then memory is not a reason to drop a candidate,
    and ``block_shape_for(kernel_fn)``, if given, sizes the blocks of the chosen one.
    ``problem`` is the request already resolved by the caller, if it has it.
    """
    full = problem or spec.problem(_abstract(x1), _abstract(x2), _abstract(params), kwargs)
    description = _describe(spec, full, kwargs, n_devices, tiles)
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    if key in _decisions:
        return _decisions[key]
    path = cache_file()
    entries = _read(path)
    if key in entries:
        try:
            decision = Decision.from_json(entries[key]["decision"])
            COUNTERS.disk_reads += 1
            _decisions[key] = decision
            return decision
        except (KeyError, TypeError, ValueError, IndexError):
            warnings.warn(f"ignoring a malformed autotune entry in {path}", stacklevel=2)
    decision = _decide(spec, full, x1, x2, params, kwargs, tiled=tiles is not None)
    if block_shape_for is not None:
        block = block_shape_for(spec.candidates[decision.implementation])
        decision = dataclasses.replace(decision, block_shape=tuple(int(b) for b in block))
    _decisions[key] = decision
    _write(path, key, {"request": description, "decision": decision.to_json()})
    return decision


def choose_implementation(
    f: Callable[..., Any],
    x1: Any,
    x2: Any | None,
    params: Any,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: Any = None,
    **apply_fn_kwargs: Any,
) -> NtkImplementation:
    """The implementation AUTO uses for this call (for inspection, e.g. in benchmarks)."""
    from ntk_dist.empirical.kernel_fns import empirical_ntk_fn  # noqa: PLC0415 (it imports us)

    auto = empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, NtkImplementation.AUTO)
    return tune(auto.autotune, x1, x2, params, apply_fn_kwargs).implementation


def _decide(
    spec: AutotuneSpec,
    full: KernelProblem,
    x1: Any,
    x2: Any | None,
    params: Any,
    kwargs: dict[str, Any],
    tiled: bool,
) -> Decision:
    """Cost model ranking, then the measurement of the first few (unless turned off)."""
    estimate = estimate_problem(full, spec.candidates, kwargs)
    if tiled:  # blocks are sized to fit, so only the FLOPs rank
        ranking = rank({k: (v, 0.0) for k, v in estimate.flops.items()}, math.inf)
        contenders = ranking[:TOP_CANDIDATES]
    else:
        ranking = estimate.ranking
        contenders = [k for k in ranking[:TOP_CANDIDATES] if estimate.fits(k)]
    has_array_kwargs = any(hasattr(leaf, "shape") for leaf in jax.tree.leaves(kwargs))
    if not _measuring() or len(contenders) < 2 or has_array_kwargs:
        return Decision(ranking[0])
    axis = spec.vmap.in_axes if spec.vmap is not None and isinstance(spec.vmap.in_axes, int) else 0
    a = _first_examples(x1, MEASURE_EXAMPLES, axis)
    b = None if x2 is None else _first_examples(x2, MEASURE_EXAMPLES, axis)
    p = jax.tree.map(_concrete, params)
    block = spec.problem(a, b, p, kwargs)
    seconds = {}
    for impl in contenders:
        try:
            seconds[impl] = _extrapolated_seconds(
                spec.candidates[impl], a, b, p, kwargs, full, block
            )
        except Exception:  # noqa: BLE001 - a candidate that fails here is simply not chosen
            continue
        COUNTERS.measurements += 1
    if not seconds:
        return Decision(ranking[0])
    best = min(seconds, key=lambda k: (seconds[k], ranking.index(k)))
    return Decision(best, None, {k.name: v for k, v in seconds.items()}, "measured")


def _extrapolated_seconds(
    kernel_fn: Callable[..., Any],
    a: Any,
    b: Any | None,
    params: Any,
    kwargs: dict[str, Any],
    full: KernelProblem,
    block: KernelProblem,
) -> float:
    """Time ``kernel_fn`` on the block and scale it to the full request.

    Two-stage kernels (``.features`` and ``.contract_features``) are timed per stage: the
    features scale with the examples, the contraction with the kernel entries. Others
    scale with the kernel entries (or the examples, when the kernel does not grow with them).
    """
    examples = _examples(full) / _examples(block)
    entries = _entries(full) / _entries(block)
    features = getattr(kernel_fn, "features", None)
    contract = getattr(kernel_fn, "contract_features", None)
    if callable(features) and callable(contract):
        t_features, blocks = 0.0, []
        for x in (a,) if b is None else (a, b):
            feature_fn = _compile(lambda x_, p: features(x_, p, **kwargs), x, params)
            blocks.append(feature_fn(x, params))
            t_features += _seconds(lambda fn=feature_fn, x=x: fn(x, params))
        fa, fb = blocks[0], blocks[-1]
        contract_fn = _compile(contract, fa, fb)
        return t_features * examples + _seconds(lambda: contract_fn(fa, fb)) * entries
    whole = _compile(lambda x, y, p: kernel_fn(x, y, p, **kwargs), a, b, params)
    return _seconds(lambda: whole(a, b, params)) * max(entries, examples)


def _examples(problem: KernelProblem) -> int:
    """Examples whose features a two-stage kernel computes: x1's, plus x2's if given."""

    def count(x: Any) -> int:
        return max((np.shape(leaf)[0] for leaf in jax.tree.leaves(x) if np.ndim(leaf)), default=1)

    return count(problem.x1) + (0 if problem.x2 is None else count(problem.x2))


def _entries(problem: KernelProblem) -> int:
    """Kernel entries, traced ones counted: what a contraction sums over."""
    return sum(
        math.prod(problem.kernel_shape(i)) * axes.trace_size(problem.shapes1[i])
        for i, axes in enumerate(problem.axes)
    )


def _compile(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn`` compiled ahead of time for these arguments (callable inside other traces too)."""
    specs = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), _dtype(v)), args)
    return jax.jit(fn).lower(*specs).compile()


def _seconds(call: Callable[[], Any]) -> float:
    """Best of ``REPEATS`` timed runs after a warm-up run; just the warm-up if that was slow."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    best = time.perf_counter() - start
    if best * (REPEATS + 1) > SECONDS_PER_CANDIDATE:
        return best
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(call())
        best = min(best, time.perf_counter() - start)
    return best


def _dtype(v: Any) -> np.dtype:
    return jax.dtypes.canonicalize_dtype(v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype)


def _abstract(tree: Any) -> Any:
    """Shapes and dtypes of a pytree of arrays (numpy, jax, zarr, tracers)."""
    if tree is None:
        return None
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), _dtype(v)), tree)


def _synthetic(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Stand-in values for a traced array: small normal numbers, zeros for integers."""
    if not np.issubdtype(dtype, np.inexact):
        return np.zeros(shape, dtype)
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal(shape)).astype(dtype)


def _concrete(v: Any) -> Any:
    if isinstance(v, jax.core.Tracer):
        return _synthetic(tuple(v.shape), _dtype(v))
    return v


def _first_examples(x: Any, m: int, axis: int) -> Any:
    """The first ``m`` examples of every leaf of x as numpy (synthetic where traced)."""

    def take(v: Any) -> Any:
        if np.ndim(v) <= axis:
            return _concrete(v)
        if isinstance(v, jax.core.Tracer):
            shape = list(v.shape)
            shape[axis] = min(shape[axis], m)
            return _synthetic(tuple(shape), _dtype(v))
        index = (slice(None),) * axis + (slice(0, m),)
        return np.asarray(v[index]).astype(_dtype(v))

    return jax.tree.map(take, x)


def _describe(
    spec: AutotuneSpec,
    full: KernelProblem,
    kwargs: dict[str, Any],
    n_devices: int,
    tiles: dict[str, Any] | None,
) -> dict[str, Any]:
    """What the decision depends on, as JSON (its hash is the cache key)."""
    import ntk_dist  # noqa: PLC0415 - the package is fully imported by the time AUTO runs

    leaves, tree = jax.tree.flatten(kwargs)
    arrays = [i for i, leaf in enumerate(leaves) if hasattr(leaf, "shape")]
    # f is traced with x1's kwargs: a (kwargs for x1, kwargs for x2) pair is split already.
    leaves1, tree1 = jax.tree.flatten(full.kwargs1)
    arrays1 = [i for i, leaf in enumerate(leaves1) if hasattr(leaf, "shape")]

    def f_of(p: Any, x: Any, array_leaves: list[Any]) -> Any:
        kw = list(leaves1)
        for i, leaf in zip(arrays1, array_leaves, strict=True):
            kw[i] = leaf
        return spec.f(p, x, **jax.tree.unflatten(tree1, kw))

    jaxpr = jax.make_jaxpr(f_of)(
        _abstract(full.params), _abstract(full.x1), _abstract([leaves1[i] for i in arrays1])
    )
    device = jax.devices()[0]

    def shapes(x: Any) -> Any:
        return None if x is None else [[list(v.shape), str(v.dtype)] for v in jax.tree.leaves(x)]

    return {
        "model": hashlib.sha256(str(jaxpr).encode()).hexdigest(),
        "params": [str(jax.tree.structure(full.params)), shapes(full.params)],
        "x1": shapes(full.x1),
        "x2": shapes(full.x2),
        "kwargs": [
            str(tree),
            [repr(v) if i not in arrays else shapes(v) for i, v in enumerate(leaves)],
        ],
        "trace_axes": repr(spec.trace_axes),
        "diagonal_axes": repr(spec.diagonal_axes),
        "vmap_axes": repr(spec.vmap_axes),
        "dtypes": [str(d) for d in full.dtypes],
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": int(n_devices),  # those the kernel runs on (an executor's)
        "device_count": jax.device_count(),
        "versions": {"ntk_dist": ntk_dist.__version__, "jax": jax.__version__},
        "candidates": sorted(k.name for k in spec.candidates),
        "mode": "measure" if _measuring() else "model",
        # one call must fit the device's memory; tiles are sized by the tiler instead
        "memory_budget": memory_budget_bytes() if tiles is None else None,
        "tiles": tiles,
    }


def _read(path: Path, quiet: bool = False) -> dict[str, Any]:
    """The cached entries, or none (with a warning) if the file is unreadable or corrupt."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):  # no cache yet
        return {}
    except OSError as e:
        if not quiet:
            warnings.warn(
                f"cannot read the autotune cache {path} ({e}); tuning in memory", stacklevel=3
            )
        return {}
    try:
        data = json.loads(text)
        entries = data["decisions"]
        if not isinstance(entries, dict):
            raise TypeError("'decisions' is not an object")
        return entries
    except (ValueError, KeyError, TypeError) as e:
        if quiet:
            return {}
        warnings.warn(
            f"the autotune cache {path} is corrupt ({e}); tuning again and replacing it",
            stacklevel=3,
        )
        return {}


def _write(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one entry to the cache file atomically (temp file, rename); warn if impossible."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read(path, quiet=True)  # other processes may have added entries meanwhile
        entries[key] = entry
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=".autotune-", suffix=".json", delete=False
        ) as tmp:
            json.dump({"format": 1, "decisions": entries}, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)
        warnings.warn(
            f"cannot write the autotune cache {path} ({e}); the decision is kept in memory "
            f"only. Set {CACHE_ENV} to a writable folder to keep it across runs.",
            stacklevel=3,
        )
