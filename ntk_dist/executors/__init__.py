"""Executors turn tiles into numpy kernel blocks; the engine writes them.

An executor has one method that matters::

  run(kernel_fn, x1, x2, params, tiles, on_tile_done, *, plan, **kwargs)

It computes ``kernel_fn(x1[tile.rows], x2[tile.cols], params, **kwargs)`` for
every tile (``x2`` None means x1; a diagonal plan pairs ``x2[tile.rows]``) and
calls ``on_tile_done(tile, block)`` with the cropped numpy block, in tile order.
"""

from ntk_dist.executors.local import Executor, LocalExecutor

__all__ = ["Executor", "LocalExecutor"]
