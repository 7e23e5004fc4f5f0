"""Multi-process JAX without Ray: every process of a job takes its share of the tiles.

For TPU pods and SLURM jobs: launch the same command on every host, call
``jax.distributed.initialize(...)`` (or let it find the cluster), then::

  compute_kernel(kernel_fn, x1, None, params, store="gs://bucket/k", block_size=...,
                 executor=ProcessShardExecutor())

Tile ``k`` of the plan (in plan order) belongs to process ``k % process_count``,
so the split is the same in every process whatever each one finds done; each
process computes its own missing tiles on its local devices with the
:class:`~ntk_dist.executors.LocalExecutor` and writes them into the shared store
(ledger entries record ``host:processI``). Then it waits, polling the store's
ledger, until every tile of the plan is complete, so ``compute_kernel`` returns
a finished store in every process. Pass the same ``block_size`` everywhere (or
resume an existing store), and create or delete stores with ``overwrite`` from
one process only.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from ntk_dist.executors.local import LocalExecutor
from ntk_dist.store import KernelStore
from ntk_dist.tiling import Tile, TilePlan

__all__ = ["ProcessShardExecutor"]


class ProcessShardExecutor:
    """Computes this process's share of the tiles into a shared store.

    Args:
      process_index, process_count: this process's place in the job; default
        ``jax.process_index()`` and ``jax.process_count()`` (after
        ``jax.distributed.initialize``).
      devices: local devices to use (default all of this process's).
      wait: after its own share, wait until the whole plan is in the store.
      timeout: seconds to wait for the other processes (None: no limit).
      poll: seconds between ledger checks while waiting.
    """

    def __init__(
        self,
        process_index: int | None = None,
        process_count: int | None = None,
        *,
        devices: Sequence[jax.Device] | None = None,
        wait: bool = True,
        timeout: float | None = None,
        poll: float = 0.5,
    ):
        self.index = jax.process_index() if process_index is None else int(process_index)
        self.count = jax.process_count() if process_count is None else int(process_count)
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"process_index must be in [0, process_count), got {self.index} of {self.count}"
            )
        self.local = LocalExecutor(devices)
        self.wait, self.timeout, self.poll = wait, timeout, poll
        self.node = f"{socket.gethostname()}:process{self.index}"
        self.tiles_computed = 0

    @property
    def n_devices(self) -> int:
        return self.local.n_devices

    def memory_model(self, *args: Any, **kwargs: Any) -> tuple[float, float]:
        """The local executor's estimate (every process must plan the same blocks)."""
        return self.local.memory_model(*args, **kwargs)

    def share(self, plan: TilePlan) -> list[Tile]:
        """This process's tiles: every ``process_count``-th of the plan, from ``process_index``."""
        return [t for k, t in enumerate(plan) if k % self.count == self.index]

    def run(self, *args: Any, **kwargs: Any) -> None:
        """Refused: the processes' results meet only in a shared store."""
        raise ValueError(
            "ProcessShardExecutor computes a share of the tiles per process and needs a store "
            "all processes can reach: pass store=PATH (a shared directory or a gs:// / s3:// URL)"
        )

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
        """Compute and write this process's missing tiles, then wait for the others'."""
        todo = {(t.i, t.j) for t in tiles}
        mine = [t for t in self.share(plan) if (t.i, t.j) in todo]
        self.tiles_computed = 0

        def write(tile: Tile, block: np.ndarray) -> None:
            store.write_tile(tile, block, node=self.node)
            self.tiles_computed += 1
            on_tile_done(tile)

        self.local.run(kernel_fn, x1, x2, params, mine, write, plan=plan, **kwargs)
        if self.wait:
            self._wait(store, todo - {(t.i, t.j) for t in mine}, on_tile_done)

    def _wait(
        self, store: KernelStore, others: set[tuple[int, int]], on_tile_done: Callable
    ) -> None:
        start = time.monotonic()
        while others:
            done = others & store.tile_records().keys()
            for i, j in sorted(done):
                on_tile_done(store.plan.tile(i, j))
            others -= done
            if not others:
                return
            if self.timeout is not None and time.monotonic() - start > self.timeout:
                owners = sorted({self._owner(store.plan, t) for t in others})
                raise TimeoutError(
                    f"{len(others)} tiles (e.g. {sorted(others)[:5]}) of processes {owners} were "
                    f"not completed within {self.timeout} s; check those processes, then rerun "
                    "the job to resume"
                )
            time.sleep(self.poll)

    def _owner(self, plan: TilePlan, ij: tuple[int, int]) -> int:
        return next(k for k, t in enumerate(plan) if (t.i, t.j) == ij) % self.count
