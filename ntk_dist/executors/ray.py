"""Compute tiles on a Ray cluster: one long-lived worker per node, a dynamic queue of row panels.

Ray is an optional extra: nothing here imports it until an executor runs.

Each worker is an actor pinned to its node (``NodeAffinitySchedulingStrategy``)
that receives the kernel function, inputs and params once through the object
store, compiles once (the :class:`~ntk_dist.executors.LocalExecutor`'s
:class:`~ntk_dist.executors.local.TileProgram` on the node's devices) and then
computes whole row panels, one call each: a row block with its column tiles, so
the row block's features (Jacobians) are computed once per panel and reused for
every column tile, while each worker keeps column blocks' features in its
program's cache (panels are cut into column runs only when there are fewer row
blocks than workers). The driver keeps ``in_flight`` panels queued on every worker
and hands a worker its next panel as soon as it finishes one, so fast nodes take
more. With a store, workers write each tile straight into it (data, then the
ledger entry with the node's id) and skip tiles the ledger already has; the
driver only sees completions. A worker that dies has the unfinished tiles of its
panels requeued and is replaced on the same node; a tile with NaN/Inf fails the
job at once. ``reuse`` reports how often features were computed, as the local
executor's does.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from ntk_dist.executors.local import FeatureReuse
from ntk_dist.store import KernelStore, NonFiniteTileError
from ntk_dist.tiling import Tile, TilePlan, panel_order

__all__ = ["RayExecutor", "WorkerInfo", "executor_from_flag", "import_ray"]


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError saying how to install the optional extra."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "RayExecutor needs Ray: pip install 'ntk_dist[ray]' (or 'ray>=2.40')"
        ) from e
    return ray


@dataclasses.dataclass
class WorkerInfo:
    """A live worker: its Ray node id and process id (``os.kill`` it to test recovery)."""

    node_id: str
    pid: int
    restarts: int = 0
    actor: Any = dataclasses.field(default=None, repr=False)
    busy: int = 0


@dataclasses.dataclass(frozen=True)
class _Panel:
    """Tiles of one row block, in the order a worker computes them."""

    i: int
    tiles: tuple[Tile, ...]


@dataclasses.dataclass(frozen=True)
class _PanelResult:
    """What a worker did for a panel: the tiles it computed (skipping ones the ledger had),
    their blocks when there is no store, and the examples whose features it computed."""

    tiles: list[Tile]
    blocks: list[np.ndarray] | None
    row_evaluations: int
    col_evaluations: int


def _panels(tiles: Iterable[Tile], workers: int) -> list[_Panel]:
    """Row panels in :func:`~ntk_dist.tiling.panel_order` (largest first for x2=None).

    With fewer row blocks than workers, panels are cut into column runs so that every
    worker gets one; those row blocks' features are then computed once per run.
    """
    rows: dict[int, list[Tile]] = {}
    for tile in panel_order(tiles):
        rows.setdefault(tile.i, []).append(tile)
    pieces = -(-workers // len(rows)) if rows else 1
    panels = []
    for i, row in rows.items():
        size = -(-len(row) // min(pieces, len(row)))
        panels += [_Panel(i, tuple(row[s : s + size])) for s in range(0, len(row), size)]
    return panels


class _TileWorker:
    """The actor body: compile once, then compute (and store) row panels on request."""

    def __init__(self, payload: tuple) -> None:
        kernel_fn, x1, x2, params, plan, kwargs, store, x64, devices = payload
        jax.config.update("jax_enable_x64", x64)
        import ray

        from ntk_dist.executors.local import LocalExecutor

        local = jax.local_devices()
        executor = LocalExecutor(local if devices is None else local[:devices])
        self.program = executor.prepare(kernel_fn, x1, x2, params, plan=plan, **kwargs)
        self.store: KernelStore | None = store
        self.node = ray.get_runtime_context().get_node_id()

    def describe(self) -> tuple[int, FeatureReuse]:
        """This process's id and its program's feature reuse (mode, cache size)."""
        return os.getpid(), self.program.reuse

    def compute_panel(self, panel: _Panel) -> _PanelResult:
        """Compute a panel's tiles (dispatching each before fetching the previous one);
        write them to the store, or return the blocks."""
        tiles = list(panel.tiles)
        if self.store is not None:  # another worker (or an earlier run's) may have done some
            done = self.store.tile_records()
            tiles = [t for t in tiles if (t.i, t.j) not in done]
        reuse = self.program.reuse
        rows, cols = reuse.row_evaluations, reuse.col_evaluations
        blocks: list[np.ndarray] = []
        pending = None
        for tile in tiles:
            out = self.program.dispatch(tile)
            if pending is not None:
                self._finish(*pending, blocks)
            pending = (tile, out)
        if pending is not None:
            self._finish(*pending, blocks)
        return _PanelResult(
            tiles,
            None if self.store is not None else blocks,
            reuse.row_evaluations - rows,
            reuse.col_evaluations - cols,
        )

    def _finish(self, tile: Tile, out: Any, blocks: list[np.ndarray]) -> None:
        block = self.program.fetch(tile, out)
        if self.store is None:
            blocks.append(block)
        else:
            self.store.write_tile(tile, block, node=self.node)


class RayExecutor:
    """Runs tiles on every node of a Ray cluster.

    Args:
      address: ``None`` to use an already connected Ray or start a local one,
        ``"auto"`` for the cluster this machine belongs to, or a cluster
        address (``"ray://head:10001"``, ``"head:6379"``).
      workers_per_node: actors per node; each gets an equal share of the node's
        GPUs or TPU chips (fractional GPUs share a device; then JAX's
        preallocation is switched off for them).
      in_flight: row panels queued on each worker at a time (a panel is many tiles
        long, so 1 leaves little idle time and balances the nodes best).
      max_restarts: replacements per worker slot after its process dies.
      devices_per_worker: use only the first N local devices of each worker.
      env: environment variables for the workers (e.g. ``XLA_FLAGS``).
      start_timeout: seconds a new worker may take to start and compile.
      init_kwargs: extra ``ray.init`` arguments when this executor connects.

    ``workers`` lists the live workers; ``restarts`` counts replacements,
    ``tiles_computed`` the tiles finished by the last run, ``startup_seconds``
    how long its workers took to start and compile, and ``reuse`` the
    :class:`~ntk_dist.executors.local.FeatureReuse` of the last run, summed over
    the workers' finished panels (rows 1.0: every row block's features computed
    once; a killed worker's panels are recomputed by its successor).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        workers_per_node: int = 1,
        in_flight: int = 1,
        max_restarts: int = 3,
        devices_per_worker: int | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 600.0,
        init_kwargs: dict[str, Any] | None = None,
    ):
        if workers_per_node < 1 or in_flight < 1:
            raise ValueError(
                f"workers_per_node and in_flight must be >= 1, got {workers_per_node}, {in_flight}"
            )
        self.address = address
        self.workers_per_node = workers_per_node
        self.in_flight = in_flight
        self.max_restarts = max_restarts
        self.devices_per_worker = devices_per_worker
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.init_kwargs = dict(init_kwargs or {})
        self.workers: list[WorkerInfo] = []
        self.restarts = 0
        self.tiles_computed = 0
        self.startup_seconds = 0.0
        self.reuse: FeatureReuse | None = None

    # ---------------------------------------------------------------- executor API
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
        """In-memory results: blocks come back through the object store (in any order)."""
        self._drive(kernel_fn, x1, x2, params, tiles, None, on_tile_done, plan, kwargs)

    def run_into_store(
        self,
        kernel_fn: Callable,
        x1: Any,
        x2: Any,
        params: Any,
        tiles: Iterable[Tile],
        store: KernelStore,
        on_tile_done: Callable[[Tile], None],
        *,
        plan: TilePlan,
        **kwargs: Any,
    ) -> None:
        """Workers write tiles into ``store``; ``on_tile_done(tile)`` marks completions."""
        self._drive(
            kernel_fn, x1, x2, params, tiles, store, lambda t, _: on_tile_done(t), plan, kwargs
        )

    # ------------------------------------------------------------------- internals
    def _connect(self) -> Any:
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, **{"log_to_driver": False, **self.init_kwargs})
        return ray

    def _drive(
        self,
        kernel_fn: Callable,
        x1: Any,
        x2: Any,
        params: Any,
        tiles: Iterable[Tile],
        store: KernelStore | None,
        on_result: Callable[[Tile, Any], None],
        plan: TilePlan,
        kwargs: dict,
    ) -> None:
        tiles = list(tiles)
        self.tiles_computed = 0
        self.reuse = None
        if not tiles:
            return
        ray = self._connect()
        from ray.exceptions import RayActorError, RayTaskError

        x64 = bool(jax.config.read("jax_enable_x64"))
        payload = ray.put(
            (kernel_fn, x1, x2, params, plan, kwargs, store, x64, self.devices_per_worker)
        )
        start = time.perf_counter()
        self.workers = self._start(ray, payload, self._slots(ray))
        self.startup_seconds = time.perf_counter() - start
        queue = deque(_panels(tiles, len(self.workers)))
        pending: dict[Any, tuple[WorkerInfo, _Panel]] = {}

        def feed(worker: WorkerInfo) -> None:
            while worker.busy < self.in_flight and queue:
                panel = queue.popleft()
                pending[worker.actor.compute_panel.remote(panel)] = (worker, panel)
                worker.busy += 1

        try:
            for worker in self.workers:
                feed(worker)
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                worker, panel = pending.pop(ref)
                worker.busy -= 1
                try:
                    result = ray.get(ref)
                except RayTaskError as e:
                    raise _task_error(e, panel) from None
                except RayActorError as e:
                    self._replace(ray, payload, worker, panel, pending, queue, store, e)
                else:
                    self.tiles_computed += len(result.tiles)
                    self.reuse.row_evaluations += result.row_evaluations
                    self.reuse.col_evaluations += result.col_evaluations
                    blocks = result.blocks or [None] * len(result.tiles)
                    for tile, block in zip(result.tiles, blocks, strict=True):
                        on_result(tile, block)
                for live in self.workers:  # this one, or a replacement that starts idle
                    feed(live)
        finally:
            for worker in self.workers:
                ray.kill(worker.actor, no_restart=True)

    def _slots(self, ray: Any) -> list[tuple[str, dict]]:
        """(node id, actor options) for every worker to start."""
        slots = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res, k = node.get("Resources", {}), self.workers_per_node
            options: dict[str, Any] = {"num_cpus": 0}
            env = dict(self.env)
            if res.get("GPU"):
                options["num_gpus"] = res["GPU"] / k
                if res["GPU"] % k:
                    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            if res.get("TPU"):
                options["resources"] = {"TPU": res["TPU"] / k}
            if env:
                options["runtime_env"] = {"env_vars": env}
            slots += [(node["NodeID"], options)] * k
        if not slots:
            raise RuntimeError("the Ray cluster has no live nodes; start one with `ray start`")
        return slots

    def _start(self, ray: Any, payload: Any, slots: list[tuple[str, dict]]) -> list[WorkerInfo]:
        """Start actors on their nodes and wait until each has compiled."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cls = ray.remote(_TileWorker)
        actors = [
            cls.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False), **options
            ).remote(payload)
            for node_id, options in slots
        ]
        try:
            described = ray.get([a.describe.remote() for a in actors], timeout=self.start_timeout)
        except ray.exceptions.GetTimeoutError:
            for a in actors:
                ray.kill(a, no_restart=True)
            raise TimeoutError(
                f"Ray workers did not start within start_timeout={self.start_timeout} s "
                f"(nodes {[n for n, _ in slots]}); check `ray status` for free resources"
            ) from None
        except ray.exceptions.RayActorError as e:
            for a in actors:
                ray.kill(a, no_restart=True)
            raise RuntimeError(
                "a Ray worker could not start or compile the kernel function. If it cannot "
                "import your model's module, ship the module (ray.init(runtime_env={'py_modules':"
                " [...]}) or ray.cloudpickle.register_pickle_by_value(module)). Worker error: "
                f"{e}"
            ) from None
        if self.reuse is None:  # the first workers: count this run's evaluations from zero
            self.reuse = dataclasses.replace(described[0][1], row_evaluations=0, col_evaluations=0)
        return [
            WorkerInfo(node_id=node_id, pid=pid, actor=actor)
            for (node_id, _), (pid, _), actor in zip(slots, described, actors, strict=True)
        ]

    def _replace(
        self,
        ray: Any,
        payload: Any,
        worker: WorkerInfo,
        panel: _Panel,
        pending: dict,
        queue: deque,
        store: KernelStore | None,
        error: Exception,
    ) -> None:
        """A worker died: requeue its panels' unfinished tiles and start a successor."""
        lost = [panel] + [p for ref, (w, p) in list(pending.items()) if w is worker]
        for ref in [ref for ref, (w, _) in pending.items() if w is worker]:
            del pending[ref]
        if store is not None:  # its tiles' data and ledger entries may have landed
            done = store.tile_records()
            lost = [_Panel(p.i, tuple(t for t in p.tiles if (t.i, t.j) not in done)) for p in lost]
        queue.extendleft(reversed([p for p in lost if p.tiles]))
        self.workers.remove(worker)
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        if worker.restarts < self.max_restarts and worker.node_id in alive:
            options = next(o for n, o in self._slots(ray) if n == worker.node_id)
            (successor,) = self._start(ray, payload, [(worker.node_id, options)])
            successor.restarts = worker.restarts + 1
            self.restarts += 1
            self.workers.append(successor)
        if not self.workers:
            tiles_left = sum(len(p.tiles) for p in queue)
            raise RuntimeError(
                f"every Ray worker died ({tiles_left} tiles left; the store keeps finished ones, "
                f"rerun to resume). Last error: {error}"
            )


def _task_error(error: Exception, panel: _Panel) -> Exception:
    """The worker's own exception (NaN tiles keep their indices), not Ray's wrapper."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, NonFiniteTileError):
        return NonFiniteTileError(
            f"{cause} (the job was stopped; fix the inputs or params and rerun to resume)",
            cause.tiles,
        )
    first, last = panel.tiles[0], panel.tiles[-1]
    return RuntimeError(
        f"a Ray worker failed on the row panel of block row {panel.i} (rows {first.row_start}:"
        f"{first.row_stop}, tiles ({first.i}, {first.j}) to ({last.i}, {last.j})): {error}"
    )


def executor_from_flag(value: str | None) -> RayExecutor | None:
    """The executor for the CLI's ``--ray auto|ADDRESS`` (None when the flag is absent)."""
    if value is None or not value.strip():
        return None
    return RayExecutor(address=value.strip())
