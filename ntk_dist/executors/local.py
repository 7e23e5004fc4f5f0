"""Compute tiles on every local device at once.

Each tile's x1 rows are split across a one-axis ``Mesh`` of the local devices
(``shard_map``), x2's block and the params are replicated (params once per run).
Every tile is padded to the full block shape so that one compiled program serves
all tiles; ragged results are cropped on the host. Dispatch is asynchronous: the
next tile's inputs are read and sent while the device computes, and finished
blocks are handed to ``on_tile_done`` on a writer thread, so store writes
overlap compute as well. Nothing here is specific to CPU, GPU or TPU.

Kernel functions with per-block features (``kernel_fn.features`` and
``kernel_fn.contract_features``: Jacobian contraction, the NNGP) run in row
panels instead: a row block's features are computed once (sharded over the
devices) and contracted with every column block of its panel, and column blocks'
features are kept (replicated) in a least-recently-used cache as far as the
memory budget allows. Other kernel functions, diagonal-over-batch plans, calls
with an ``rng`` and budgets too small for a panel compute each tile whole.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ntk_dist.empirical.kwargs import split_kwargs
from ntk_dist.tiling import Tile, TilePlan, panel_order

__all__ = ["Executor", "FeatureReuse", "LocalExecutor", "TileProgram", "default_memory_budget"]

_AXIS = "rows"
_FALLBACK_BUDGET = 1 << 30


def default_memory_budget() -> int:
    """Half of the first local device's memory when known, else 1 GiB."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return int(stats["bytes_limit"]) // 2 if "bytes_limit" in stats else _FALLBACK_BUDGET


@dataclass
class FeatureReuse:
    """How often per-block features (Jacobians) were computed in one run.

    ``mode`` is ``"panels"`` (two-stage, features reused) or ``"tiles"`` (each
    tile computed whole: its row and column blocks' features every time).
    ``row_evaluations``/``col_evaluations`` count examples whose features were
    computed for a row/column block; ``cached_blocks`` is how many column blocks
    the budget let the panel cache keep besides the one in use: the budget less
    ``base_bytes`` (params, the current row block's features, the largest
    program's working set), divided by ``block_bytes`` (one column block's
    features, replicated), per device.
    """

    mode: str
    n1: int
    n2: int
    symmetric: bool
    cached_blocks: int = 0
    base_bytes: int = 0
    block_bytes: int = 0
    row_evaluations: int = 0
    col_evaluations: int = 0

    @property
    def rows(self) -> float:
        """Row-block feature evaluations ÷ n1."""
        return self.row_evaluations / self.n1

    @property
    def cols(self) -> float:
        """Column-block feature evaluations ÷ n2 (n1 when x2 is x1)."""
        return self.col_evaluations / self.n2

    @property
    def total(self) -> float:
        """All feature evaluations ÷ distinct examples (n1, or n1 + n2 when x2 is given)."""
        distinct = self.n1 if self.symmetric else self.n1 + self.n2
        return (self.row_evaluations + self.col_evaluations) / distinct


class Executor(Protocol):
    """What the engine needs from an executor."""

    def run(
        self,
        kernel_fn: Callable,
        x1: Any,
        x2: Any,
        params: Any,
        tiles: Iterable[Tile],
        on_tile_done: Callable[[Tile, np.ndarray], None],
        *,
        plan: TilePlan,
        **kwargs: Any,
    ) -> None: ...


class LocalExecutor:
    """Runs tiles on this host's devices (all of them by default).

    ``memory_budget`` (bytes per device; default :func:`default_memory_budget`)
    bounds the features a panel run keeps. ``compilations`` counts the programs
    compiled for tiles (per ``run``: one whole-tile program, or the features
    programs and the contraction of a panel run). ``reuse`` is the
    :class:`FeatureReuse` of the last ``run``; ``tiles_computed`` counts the tiles
    it finished (as :class:`~ntk_dist.executors.RayExecutor` does).
    """

    def __init__(
        self, devices: Sequence[jax.Device] | None = None, memory_budget: int | None = None
    ):
        self.devices = list(jax.local_devices() if devices is None else devices)
        if not self.devices:
            raise ValueError("LocalExecutor needs at least one device")
        self.mesh = Mesh(np.array(self.devices), (_AXIS,), axis_types=(AxisType.Explicit,))
        self.memory_budget = default_memory_budget() if memory_budget is None else memory_budget
        self.compilations = 0
        self.tiles_computed = 0
        self.reuse: FeatureReuse | None = None

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    def _padded_rows(self, rows: int) -> int:
        d = self.n_devices
        return -(-rows // d) * d

    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def _params_spec(self, params: Any) -> Any:
        return jax.tree.map(
            lambda v: jax.ShapeDtypeStruct(np.shape(v), _dtype(v), sharding=self._sharding(P())),
            params,
        )

    def _compile(
        self,
        kernel_fn: Callable,
        x1: Any,
        x2: Any,
        params: Any,
        rows: int,
        cols: int,
        diagonal: bool,
        kwargs: dict,
    ) -> Any:
        """One compiled program for blocks of ``rows`` (padded) x ``cols`` examples."""
        x2_spec = P(_AXIS) if diagonal else P()

        def block_fn(a, b, p):
            return kernel_fn(a, b, p, **kwargs)

        fn = jax.shard_map(
            block_fn,
            mesh=self.mesh,
            in_specs=(P(_AXIS), x2_spec, P()),
            out_specs=P(_AXIS),
            # The body is an ordinary per-device program: kernel functions build
            # their own cotangents, and gradients w.r.t. the replicated params must
            # stay per device (with the check, they would be summed over the mesh).
            check_vma=False,
        )
        a = _spec(x1, rows, self._sharding(P(_AXIS)))
        b = _spec(x2, rows if diagonal else cols, self._sharding(x2_spec))
        self.compilations += 1
        return jax.jit(fn).lower(a, b, self._params_spec(params)).compile()

    def _compile_features(
        self, features: Callable, x: Any, params: Any, rows: int, kwargs: dict
    ) -> tuple[Any, Any]:
        """Features of ``rows`` examples sharded over the devices, and their global shapes."""
        fn = jax.shard_map(
            lambda a, p: features(a, p, **kwargs),
            mesh=self.mesh,
            in_specs=(P(_AXIS), P()),
            out_specs=P(_AXIS),
            check_vma=False,
        )
        a = _spec(x, rows, self._sharding(P(_AXIS)))
        p = self._params_spec(params)
        # global shapes, traced without shardings (explicit ones would reach f's ops)
        unsharded = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), (a, p))
        shapes = jax.eval_shape(lambda a_, p_: features(a_, p_, **kwargs), *unsharded)
        self.compilations += 1
        return jax.jit(fn).lower(a, p).compile(), shapes

    def _compile_contraction(self, contract_features: Callable, rows: Any, cols: Any) -> Any:
        """Kernel block from row features (sharded) and column features (replicated)."""
        fn = jax.shard_map(
            contract_features,
            mesh=self.mesh,
            in_specs=(P(_AXIS), P()),
            out_specs=P(_AXIS),
            check_vma=False,
        )

        def spec(shapes: Any, sharding: NamedSharding) -> Any:
            return jax.tree.map(
                lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes
            )

        self.compilations += 1
        return (
            jax.jit(fn)
            .lower(spec(rows, self._sharding(P(_AXIS))), spec(cols, self._sharding(P())))
            .compile()
        )

    def memory_model(
        self,
        kernel_fn: Callable,
        x1: Any,
        x2: Any,
        params: Any,
        *,
        diagonal: bool = False,
        **kwargs: Any,
    ) -> tuple[float, float]:
        """``(fixed_bytes, per_example_bytes)`` per device, from XLA's memory analysis.

        Two small blocks are compiled; their argument + output + temporary bytes
        are fitted to the cost model of :meth:`TilePlan.from_budget` (the output
        term is known exactly), which makes the estimate follow whatever the
        chosen kernel implementation materialises (Jacobians, NTK-vector
        products, activations).
        """
        x2 = x1 if x2 is None else x2
        sizes = []
        for r in (4, 8):
            c = self._compile(kernel_fn, x1, x2, params, r * self.n_devices, r, diagonal, kwargs)
            stats = c.memory_analysis()
            if stats is None:
                raise ValueError(
                    "this backend gives no memory analysis to choose a block size from a "
                    "budget; pass block_size explicitly"
                )
            sizes.append(
                stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            )
            out_bytes = stats.output_size_in_bytes
        self.compilations -= 2  # probes, not tile programs
        entry = out_bytes / (8 * (1 if diagonal else 8))
        if diagonal:
            per_example = (sizes[1] - sizes[0] - 4 * entry) / 8
            fixed = sizes[0] - 8 * per_example - 4 * entry
        else:
            per_example = (sizes[1] - sizes[0] - 48 * entry) / 8
            fixed = sizes[0] - 8 * per_example - 16 * entry
        return max(fixed, 0.0), max(per_example, 0.0)

    def prepare(
        self,
        kernel_fn: Callable,
        x1: Any,
        x2: Any,
        params: Any,
        *,
        plan: TilePlan,
        **kwargs: Any,
    ) -> TileProgram:
        """Compile once for ``plan``'s tiles and put the params on the devices once."""
        return TileProgram(self, kernel_fn, x1, x2, params, plan, kwargs)

    def run(
        self,
        kernel_fn: Callable,
        x1: Any,
        x2: Any,
        params: Any,
        tiles: Iterable[Tile],
        on_tile_done: Callable[[Tile, np.ndarray], None],
        *,
        plan: TilePlan,
        **kwargs: Any,
    ) -> None:
        """Compute ``tiles`` (in row panels) and hand each cropped block to ``on_tile_done``."""
        self.tiles_computed = 0
        tiles = panel_order(tiles)
        if not tiles:
            return
        program = self.prepare(kernel_fn, x1, x2, params, plan=plan, **kwargs)
        self.reuse = program.reuse

        def done(tile: Tile, block: np.ndarray) -> None:
            on_tile_done(tile, block)
            self.tiles_computed += 1

        writer = _Writer(done)
        pending: tuple[Tile, jax.Array] | None = None
        try:
            for tile in tiles:
                out = program.dispatch(tile)
                if pending is not None:
                    writer.put(pending[0], program.fetch(*pending))
                pending = (tile, out)
            writer.put(pending[0], program.fetch(*pending))
        except BaseException:
            writer.close(reraise=False)
            raise
        writer.close()


class TileProgram:
    """Compiled programs and device-resident params serving every tile of a plan.

    ``dispatch(tile)`` reads and sends the tile's inputs and starts computing
    (asynchronously); ``fetch(tile, out)`` waits and returns the cropped numpy
    block; ``compute(tile)`` does both. In panel mode features of the current row
    block and of recently used column blocks are kept between calls; ``reuse``
    counts how often features were computed.
    """

    def __init__(
        self,
        executor: LocalExecutor,
        kernel_fn: Callable,
        x1: Any,
        x2: Any,
        params: Any,
        plan: TilePlan,
        kwargs: dict,
    ):
        self.x1 = x1
        self.x2 = x1 if x2 is None else x2
        self.diagonal = plan.diagonal
        self.symmetric = plan.symmetric
        bm, bn = plan.block_shape
        self.rows = executor._padded_rows(bm)
        self.params = jax.device_put(params, executor._sharding(P()))
        self.row_sharding = executor._sharding(P(_AXIS))
        self.replicated = executor._sharding(P())
        self.col_sharding = self.row_sharding if self.diagonal else self.replicated
        self.reuse = FeatureReuse("tiles", plan.n1, plan.n2, plan.symmetric)
        self._row: tuple[tuple[str, int], Any] | None = None
        self._cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
        if _has_features(kernel_fn, plan, kwargs) and self._prepare_panels(
            executor, kernel_fn, params, executor._padded_rows(bn), plan.grid[1], kwargs
        ):
            return
        self.cols = bn
        self.compiled = executor._compile(
            kernel_fn, self.x1, self.x2, params, self.rows, self.cols, self.diagonal, kwargs
        )

    def _prepare_panels(
        self,
        executor: LocalExecutor,
        kernel_fn: Callable,
        params: Any,
        cols: int,
        n_col_blocks: int,
        kwargs: dict,
    ) -> bool:
        """Compile the features and contraction programs if a panel fits the budget."""
        kwargs1, kwargs2 = split_kwargs(kwargs, self.x1, None if self.symmetric else self.x2)
        self.cols = cols
        feature_rows, row_shapes = executor._compile_features(
            kernel_fn.features, self.x1, params, self.rows, kwargs1
        )
        if self.symmetric:
            feature_cols, col_shapes = feature_rows, row_shapes
        else:
            feature_cols, col_shapes = executor._compile_features(
                kernel_fn.features, self.x2, params, cols, kwargs2
            )
        contraction = executor._compile_contraction(
            kernel_fn.contract_features, row_shapes, col_shapes
        )
        d = executor.n_devices
        params_bytes = sum(_nbytes(v) for v in jax.tree.leaves(params))
        work = max(_working_set(c) for c in (feature_rows, feature_cols, contraction))
        col_bytes = sum(_nbytes(v) for v in jax.tree.leaves(col_shapes))
        row_bytes = sum(_nbytes(v) for v in jax.tree.leaves(row_shapes)) / d
        base = int(params_bytes + work + row_bytes)
        spare = executor.memory_budget - base
        if spare < 0:
            return False
        self.features = (feature_rows, feature_cols)
        self.contraction = contraction
        self.reuse = FeatureReuse(
            "panels",
            self.reuse.n1,
            self.reuse.n2,
            self.symmetric,
            cached_blocks=min(int(spare // max(col_bytes, 1)), n_col_blocks),
            base_bytes=base,
            block_bytes=col_bytes,
        )
        return True

    @property
    def panels(self) -> bool:
        """Whether tiles are contractions of cached per-block features."""
        return self.reuse.mode == "panels"

    def _row_features(self, tile: Tile) -> Any:
        key = ("x1", tile.i)
        if self._row is not None and self._row[0] == key:
            return self._row[1]
        if key in self._cache:  # symmetric: this block served as a column before
            feats = jax.device_put(self._cache[key], self.row_sharding)
        else:
            a = _read_rows(self.x1, tile.rows, self.rows)
            feats = self.features[0](jax.device_put(a, self.row_sharding), self.params)
            self.reuse.row_evaluations += tile.shape[0]
        self._row = (key, feats)
        return feats

    def _col_features(self, tile: Tile) -> Any:
        key = ("x1" if self.symmetric else "x2", tile.j)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if self._row is not None and self._row[0] == key:
            feats = jax.device_put(self._row[1], self.replicated)
        else:
            b = _read_rows(self.x2, tile.cols, self.cols)
            sharded = self.features[1](jax.device_put(b, self.row_sharding), self.params)
            feats = jax.device_put(sharded, self.replicated)
            self.reuse.col_evaluations += tile.shape[1]
        self._cache[key] = feats
        while len(self._cache) > self.reuse.cached_blocks:
            self._cache.popitem(last=False)
        return feats

    def dispatch(self, tile: Tile) -> jax.Array:
        if self.panels:
            return self.contraction(self._row_features(tile), self._col_features(tile))
        a = _read_rows(self.x1, tile.rows, self.rows)
        if self.diagonal:
            b = _read_rows(self.x2, tile.rows, self.rows)
        else:
            b = _read_rows(self.x2, tile.cols, self.cols)
        self.reuse.row_evaluations += tile.shape[0]
        self.reuse.col_evaluations += tile.shape[0] if self.diagonal else tile.shape[1]
        return self.compiled(
            jax.device_put(a, self.row_sharding), jax.device_put(b, self.col_sharding), self.params
        )

    def fetch(self, tile: Tile, out: jax.Array) -> np.ndarray:
        return _crop(out, tile, self.diagonal)

    def compute(self, tile: Tile) -> np.ndarray:
        return self.fetch(tile, self.dispatch(tile))


def _has_features(kernel_fn: Callable, plan: TilePlan, kwargs: dict) -> bool:
    """Whether tiles can be contractions of per-block features (reusable across tiles).

    Not for diagonal-over-batch plans (each block is used once anyway) nor with an
    ``rng``, whose key for x2 depends on whether the two blocks are equal.
    """
    return (
        callable(getattr(kernel_fn, "features", None))
        and callable(getattr(kernel_fn, "contract_features", None))
        and not plan.diagonal
        and "rng" not in kwargs
    )


def _nbytes(x: Any) -> int:
    return math.prod(np.shape(x)) * _dtype(x).itemsize


def _working_set(compiled: Any) -> int:
    """Argument + output + temporary bytes per device (0 where the backend does not say)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return 0
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def _dtype(x: Any) -> np.dtype:
    """The dtype JAX will use for ``x`` (float64 becomes float32 without x64)."""
    return jax.dtypes.canonicalize_dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)


def _spec(x: Any, rows: int, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((rows, *x.shape[1:]), _dtype(x), sharding=sharding)


def _read_rows(x: Any, rows: slice, padded: int) -> np.ndarray:
    """Rows of x as numpy (zarr/jax/numpy alike), padded by repeating the last row.

    Repeating a real example (not zeros) keeps padded rows finite for any model.
    """
    a = np.asarray(x[rows.start : rows.stop])
    if len(a) < padded:
        a = np.concatenate([a, np.repeat(a[-1:], padded - len(a), axis=0)])
    return a


def _crop(out: jax.Array, tile: Tile, diagonal: bool) -> np.ndarray:
    m, n = tile.shape
    host = np.asarray(out)
    return host[:m] if diagonal else host[:m, :n]


class _Writer:
    """A thread that calls ``fn(tile, block)`` in order; errors surface on the next put."""

    def __init__(self, fn: Callable[[Tile, np.ndarray], None]):
        self._fn = fn
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="ntk_dist-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._fn(*item)
                except BaseException as e:  # handed to the caller's thread
                    self._error = e

    def put(self, tile: Tile, block: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((tile, block))

    def close(self, reraise: bool = True) -> None:
        self._queue.put(None)
        self._thread.join()
        if reraise and self._error is not None:
            raise self._error
