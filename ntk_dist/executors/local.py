"""Compute tiles on every local device at once.

Each tile's x1 rows are split across a one-axis ``Mesh`` of the local devices
(``shard_map``), x2's block and the params are replicated (params once per run).
Every tile is padded to the full block shape so that one compiled program serves
all tiles; ragged results are cropped on the host. Dispatch is asynchronous: the
next tile's inputs are read and sent while the device computes, and finished
blocks are handed to ``on_tile_done`` on a writer thread, so store writes
overlap compute as well. Nothing here is specific to CPU, GPU or TPU.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ntk_dist.tiling import Tile, TilePlan

__all__ = ["Executor", "LocalExecutor", "TileProgram"]

_AXIS = "rows"


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

    ``compilations`` counts the programs compiled for tiles (one per ``run``).
    """

    def __init__(self, devices: Sequence[jax.Device] | None = None):
        self.devices = list(jax.local_devices() if devices is None else devices)
        if not self.devices:
            raise ValueError("LocalExecutor needs at least one device")
        self.mesh = Mesh(np.array(self.devices), (_AXIS,), axis_types=(AxisType.Explicit,))
        self.compilations = 0

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    def _padded_rows(self, rows: int) -> int:
        d = self.n_devices
        return -(-rows // d) * d

    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

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
        p = jax.tree.map(
            lambda v: jax.ShapeDtypeStruct(np.shape(v), _dtype(v), sharding=self._sharding(P())),
            params,
        )
        self.compilations += 1
        return jax.jit(fn).lower(a, b, p).compile()

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
        """Compute ``tiles`` and hand each cropped block to ``on_tile_done`` (in order)."""
        tiles = list(tiles)
        if not tiles:
            return
        program = self.prepare(kernel_fn, x1, x2, params, plan=plan, **kwargs)
        writer = _Writer(on_tile_done)
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
    """One compiled program and device-resident params serving every tile of a plan.

    ``dispatch(tile)`` reads and sends the tile's inputs and starts computing
    (asynchronously); ``fetch(tile, out)`` waits and returns the cropped numpy
    block; ``compute(tile)`` does both.
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
        bm, self.cols = plan.block_shape
        self.rows = executor._padded_rows(bm)
        self.compiled = executor._compile(
            kernel_fn, self.x1, self.x2, params, self.rows, self.cols, self.diagonal, kwargs
        )
        self.params = jax.device_put(params, executor._sharding(P()))
        self.row_sharding = executor._sharding(P(_AXIS))
        self.col_sharding = self.row_sharding if self.diagonal else executor._sharding(P())

    def dispatch(self, tile: Tile) -> jax.Array:
        a = _read_rows(self.x1, tile.rows, self.rows)
        if self.diagonal:
            b = _read_rows(self.x2, tile.rows, self.rows)
        else:
            b = _read_rows(self.x2, tile.cols, self.cols)
        return self.compiled(
            jax.device_put(a, self.row_sharding), jax.device_put(b, self.col_sharding), self.params
        )

    def fetch(self, tile: Tile, out: jax.Array) -> np.ndarray:
        return _crop(out, tile, self.diagonal)

    def compute(self, tile: Tile) -> np.ndarray:
        return self.fetch(tile, self.dispatch(tile))


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
