"""Compute tiles on a Ray cluster: one long-lived worker per node, a dynamic tile queue.

Ray is an optional extra: nothing here imports it until an executor runs.

Each worker is an actor pinned to its node (``NodeAffinitySchedulingStrategy``)
that receives the kernel function, inputs and params once through the object
store, compiles once (the :class:`~ntk_dist.executors.LocalExecutor`'s
:class:`~ntk_dist.executors.local.TileProgram` on the node's devices) and then
computes tiles one call at a time. The driver keeps ``in_flight`` tiles queued
on every worker and hands a worker its next tile as soon as it finishes one, so
fast nodes take more. With a store, workers write their tiles straight into it
(data, then the ledger entry with the node's id); the driver only sees
completions. A worker that dies has its unfinished tiles requeued and is
replaced on the same node; a tile with NaN/Inf fails the job at once.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from ntk_dist.store import KernelStore, NonFiniteTileError
from ntk_dist.tiling import Tile, TilePlan

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


@dataclass
class WorkerInfo:
    """A live worker: its Ray node id and process id (``os.kill`` it to test recovery)."""

    node_id: str
    pid: int
    restarts: int = 0
    actor: Any = field(default=None, repr=False)
    busy: int = 0


class _TileWorker:
    """The actor body: compile once, then compute (and store) tiles on request."""

    def __init__(self, payload: tuple) -> None:
        kernel_fn, x1, x2, params, plan, kwargs, store, x64, devices = payload
        jax.config.update("jax_enable_x64", x64)
        import ray

        from ntk_dist.executors.local import LocalExecutor

        local = jax.local_devices()
        executor = LocalExecutor(local if devices is None else local[:devices])
        self.program = executor.prepare(kernel_fn, x1, x2, params, plan=plan, **kwargs)
        self.plan: TilePlan = plan
        self.store: KernelStore | None = store
        self.node = ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def compute(self, i: int, j: int) -> np.ndarray | None:
        """Compute tile (i, j); write it to the store (return None) or return the block."""
        tile = self.plan.tile(i, j)
        block = self.program.compute(tile)
        if self.store is None:
            return block
        self.store.write_tile(tile, block, node=self.node)
        return None


class RayExecutor:
    """Runs tiles on every node of a Ray cluster.

    Args:
      address: ``None`` to use an already connected Ray or start a local one,
        ``"auto"`` for the cluster this machine belongs to, or a cluster
        address (``"ray://head:10001"``, ``"head:6379"``).
      workers_per_node: actors per node; each gets an equal share of the node's
        GPUs or TPU chips (fractional GPUs share a device; then JAX's
        preallocation is switched off for them).
      in_flight: tiles queued on each worker at a time (2 hides the round trip).
      max_restarts: replacements per worker slot after its process dies.
      devices_per_worker: use only the first N local devices of each worker.
      env: environment variables for the workers (e.g. ``XLA_FLAGS``).
      start_timeout: seconds a new worker may take to start and compile.
      init_kwargs: extra ``ray.init`` arguments when this executor connects.

    ``workers`` lists the live workers; ``restarts`` counts replacements,
    ``tiles_computed`` the tiles finished by the last run and ``startup_seconds``
    how long its workers took to start and compile.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        workers_per_node: int = 1,
        in_flight: int = 2,
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
        queue = deque(tiles)
        self.tiles_computed = 0
        if not queue:
            return
        ray = self._connect()
        from ray.exceptions import RayActorError, RayTaskError

        x64 = bool(jax.config.read("jax_enable_x64"))
        payload = ray.put(
            (kernel_fn, x1, x2, params, plan, kwargs, store, x64, self.devices_per_worker)
        )
        pending: dict[Any, tuple[WorkerInfo, Tile]] = {}

        def feed(worker: WorkerInfo) -> None:
            while worker.busy < self.in_flight and queue:
                tile = queue.popleft()
                pending[worker.actor.compute.remote(tile.i, tile.j)] = (worker, tile)
                worker.busy += 1

        start = time.perf_counter()
        self.workers = self._start(ray, payload, self._slots(ray))
        self.startup_seconds = time.perf_counter() - start
        try:
            for worker in self.workers:
                feed(worker)
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                worker, tile = pending.pop(ref)
                worker.busy -= 1
                try:
                    block = ray.get(ref)
                except RayTaskError as e:
                    raise _task_error(e, tile) from None
                except RayActorError as e:
                    self._replace(ray, payload, worker, tile, pending, queue, store, e)
                else:
                    self.tiles_computed += 1
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
            pids = ray.get([a.pid.remote() for a in actors], timeout=self.start_timeout)
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
        return [
            WorkerInfo(node_id=node_id, pid=pid, actor=actor)
            for (node_id, _), pid, actor in zip(slots, pids, actors, strict=True)
        ]

    def _replace(
        self,
        ray: Any,
        payload: Any,
        worker: WorkerInfo,
        tile: Tile,
        pending: dict,
        queue: deque,
        store: KernelStore | None,
        error: Exception,
    ) -> None:
        """A worker died: requeue its unfinished tiles and start a successor on its node."""
        lost = [tile] + [t for ref, (w, t) in list(pending.items()) if w is worker]
        for ref in [ref for ref, (w, _) in pending.items() if w is worker]:
            del pending[ref]
        if store is not None:  # its data and ledger entry may have landed before it died
            done = store.tile_records()
            lost = [t for t in lost if (t.i, t.j) not in done]
        queue.extendleft(reversed(lost))
        self.workers.remove(worker)
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        if worker.restarts < self.max_restarts and worker.node_id in alive:
            options = next(o for n, o in self._slots(ray) if n == worker.node_id)
            (successor,) = self._start(ray, payload, [(worker.node_id, options)])
            successor.restarts = worker.restarts + 1
            self.restarts += 1
            self.workers.append(successor)
        if not self.workers:
            raise RuntimeError(
                f"every Ray worker died ({len(queue)} tiles left; the store keeps finished ones, "
                f"rerun to resume). Last error: {error}"
            )


def _task_error(error: Exception, tile: Tile) -> Exception:
    """The worker's own exception (NaN tiles keep their indices), not Ray's wrapper."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, NonFiniteTileError):
        return NonFiniteTileError(
            f"{cause} (the job was stopped; fix the inputs or params and rerun to resume)",
            cause.tiles,
        )
    return RuntimeError(
        f"a Ray worker failed on tile ({tile.i}, {tile.j}) (rows {tile.row_start}:"
        f"{tile.row_stop}, cols {tile.col_start}:{tile.col_stop}): {error}"
    )


def executor_from_flag(value: str | None) -> RayExecutor | None:
    """The executor for the CLI's ``--ray auto|ADDRESS`` (None when the flag is absent)."""
    if value is None or not value.strip():
        return None
    return RayExecutor(address=value.strip())
