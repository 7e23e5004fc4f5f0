"""Executors turn tiles into numpy kernel blocks; the engine writes them.

An executor has one method that matters::

  run(kernel_fn, x1, x2, params, tiles, on_tile_done, *, plan, **kwargs)

It computes ``kernel_fn(x1[tile.rows], x2[tile.cols], params, **kwargs)`` for
every tile (``x2`` None means x1; a diagonal plan pairs ``x2[tile.rows]``) and
calls ``on_tile_done(tile, block)`` with the cropped numpy block, in whatever order
it finishes them (the engine does not depend on the order).

Executors whose workers write a store themselves (Ray workers on many hosts,
the processes of a ``jax.distributed`` job) also have::

  run_into_store(kernel_fn, x1, x2, params, tiles, store, on_tile_done, *, plan, **kwargs)

which the engine calls instead when there is a store; ``on_tile_done(tile)``
then only reports completion. Ray is imported only when a RayExecutor runs.
"""

from ntk_dist.executors.local import Executor, LocalExecutor
from ntk_dist.executors.multiprocess import ProcessShardExecutor
from ntk_dist.executors.ray import RayExecutor

__all__ = ["Executor", "LocalExecutor", "ProcessShardExecutor", "RayExecutor"]
