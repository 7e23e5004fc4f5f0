"""Tiled Cholesky of a stored kernel across the nodes of a Ray cluster.

One actor per live node owns the block rows ``i`` with ``i % nodes == rank`` and keeps
its finished factor rows resident (each node holds ``1/nodes`` of ``L``). The driver
sequences the block columns ``j`` left-looking, as :mod:`ntk_dist.linalg.cholesky`:

1. the owner of row ``j`` computes ``A_jj = K_jj - L_j,:j L_j,:j^T``, factorises it
   (potrf) and writes ``L_jj``;
2. every actor reads ``L_jj`` and the row ``L_j,:j`` from the factor store and computes
   its rows ``L_ij = (K_ij - L_i,:j L_j,:j^T) L_jj^{-T}`` (one gemm and one trsm each).

Tiles travel through the factor store, so every node must see the kernel store's
folder (a shared file system, or one machine). The ledger records every tile, so a
killed run resumes at the first unfinished column (a rerun, or the local tiled
path), and the operator's ``cholesky()`` reuses the factor this writes. Not yet:
a memory bound per node (a node holds its whole share of ``L``) and restarting a
dead actor within one run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
import scipy.linalg

from ntk_dist.executors.ray import import_ray
from ntk_dist.linalg import cholesky as chol
from ntk_dist.linalg.factor_store import FactorStore
from ntk_dist.linalg.operator import NotPositiveDefiniteError
from ntk_dist.linalg.stored import StoredKernelOperator
from ntk_dist.store import KernelStore

__all__ = ["RayCholesky", "ray_cholesky"]


def _spans(n: int, tile: int) -> list[slice]:
    return [slice(i * tile, min(n, (i + 1) * tile)) for i in range(math.ceil(n / tile))]


class _RowOwner:
    """A Ray actor: the block rows of one node, resident, and the stores they go to."""

    def __init__(self, path: str, dtype: str, shift: float, name: str, tile: int, rows: list):
        import ray

        if np.dtype(dtype).itemsize == 8:
            jax.config.update("jax_enable_x64", True)
        self.op = StoredKernelOperator(KernelStore.open(path), dtype=dtype, shift=shift)
        self.factor = FactorStore.open(self.op.store, name)
        self.n, self.tile = self.op.shape[0], tile
        self.span = _spans(self.n, tile)
        shape = {i: (self.span[i].stop - self.span[i].start, self.n) for i in rows}
        self.rows = {i: np.zeros(shape[i], self.op.dtype) for i in rows}
        self.node = ray.get_runtime_context().get_node_id()

    def load(self, first: int) -> None:
        """Read back the finished columns before ``first`` of this node's rows."""
        done = slice(0, self.span[first].start if first < len(self.span) else self.n)
        for i, row in self.rows.items():
            cols = slice(0, min(done.stop, self.span[i].stop))
            row[:, cols] = self.factor.read((self.span[i], cols))

    def diagonal(self, j: int) -> tuple[str, int | None]:
        """Factorise and write the diagonal tile of column ``j`` (this node owns row ``j``).

        Returns this node's id and the failing pivot, if any (the error itself does not
        cross processes: Ray cannot rebuild it).
        """
        sj, left = self.span[j], self.rows[j][:, : self.span[j].start]
        acc = self.op.read(sj, sj) - left @ left.T
        try:
            lower = chol.potrf(acc, sj.start, self.n)
        except NotPositiveDefiniteError as e:
            return self.node, e.pivot
        self.rows[j][:, sj] = lower
        self.factor.write(chol.tile_key(j, j), (sj, sj), lower)
        return self.node, None

    def below(self, j: int) -> str | None:
        """Write this node's tiles of column ``j`` below the diagonal; its node id if any."""
        sj = self.span[j]
        ljj = self.factor.read((sj, sj))
        row_j = self.factor.read((sj, slice(0, sj.start)))
        mine = [i for i in self.rows if i > j]
        for i in mine:
            acc = self.op.read(self.span[i], sj) - self.rows[i][:, : sj.start] @ row_j.T
            lij = scipy.linalg.solve_triangular(ljj, acc.T, lower=True, check_finite=False).T
            self.rows[i][:, sj] = lij
            self.factor.write(chol.tile_key(i, j), (self.span[i], sj), lij)
        return self.node if mine else None


@dataclass
class RayCholesky:
    """The stored factor and the Ray nodes whose actors computed it."""

    factor: chol.StoredCholeskyFactor
    nodes: set[str]  # the nodes that wrote tiles in this call
    columns: int  # block columns computed by this call


def ray_cholesky(op: StoredKernelOperator, tile: int) -> RayCholesky:
    """Factorise ``op`` (a stored square kernel) over ``tile x tile`` tiles on a Ray cluster.

    Connects to the running cluster (``ray.init`` first). The factor is stored where
    ``op.cholesky()`` finds and reuses it; columns already in its ledger are skipped.
    """
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    n = op.shape[0]
    span = _spans(n, tile)
    name = op.factor_name("cholesky")
    factor = FactorStore.open(op.store, name)
    if factor is None or factor.attributes.get("tile") != tile:
        attributes = {"kind": "cholesky", "tile": tile}
        factor = FactorStore.create(op.store, name, (n, n), (tile, tile), op.dtype, attributes)
    nb = len(span)
    first = chol.first_unfinished(factor, nb)
    nodes = [node["NodeID"] for node in ray.nodes() if node.get("Alive")]
    if not nodes:
        raise RuntimeError("the Ray cluster has no live nodes; start one with `ray start`")
    owner = [i % len(nodes) for i in range(nb)]
    cls = ray.remote(_RowOwner)
    actors = [
        cls.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote(
            op.store.path,
            op.dtype.name,
            op.shift,
            name,
            tile,
            [i for i in range(nb) if owner[i] == rank],
        )
        for rank, node in enumerate(nodes)
    ]
    try:
        ray.get([a.load.remote(first) for a in actors])
        used: set[str] = set()
        for j in range(first, nb):
            node, pivot = ray.get(actors[owner[j]].diagonal.remote(j))
            if pivot is not None:
                raise NotPositiveDefiniteError(pivot, (n, n))
            used.add(node)
            used |= {node for node in ray.get([a.below.remote(j) for a in actors]) if node}
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
    stored = chol.StoredCholeskyFactor(factor, n, tile)
    return RayCholesky(stored, used, nb - first)
