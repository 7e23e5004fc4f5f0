"""Factorisations stored next to a kernel: Zarr v3 arrays written tile by tile, with a ledger.

A :class:`FactorStore` lives in ``<kernel store>/ntk_dist_linalg/<name>/``: the array
(``zarr.json`` and chunks, one chunk per tile) and ``ntk_dist_tiles/<key>.json``, one
ledger entry per finished tile, written only after the tile's data is durable. As in
:class:`~ntk_dist.store.KernelStore`, a chunk file is no completion marker; the ledger
is. Deleting or overwriting the kernel store deletes its factorisations with it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from ntk_dist.store import KernelStore

__all__ = ["FactorStore"]

_FOLDER = "ntk_dist_linalg/"
_LEDGER = "ntk_dist_tiles/"


def _spec(kernel: KernelStore, name: str) -> dict[str, Any]:
    base = kernel.kvstore_spec  # the factors share the kernel store's driver and root
    return {**base, "path": base["path"] + _FOLDER + name + "/"}


class FactorStore:
    """A float array (any rank) beside a kernel store, written in chunks with a ledger."""

    def __init__(self, spec: dict[str, Any], array: ts.TensorStore, attributes: dict):
        self._spec = spec
        self.array = array
        self.attributes = attributes
        self._ledger = ts.KvStore.open({**spec, "path": spec["path"] + _LEDGER}).result()

    @property
    def path(self) -> str:
        return self._spec["path"]

    @classmethod
    def open(cls, kernel: KernelStore, name: str) -> FactorStore | None:
        """The factor ``name`` of ``kernel``, or None if there is none."""
        spec = _spec(kernel, name)
        raw = ts.KvStore.open(spec).result().read("zarr.json").result()
        if raw.state != "value":
            return None
        attributes = json.loads(raw.value).get("attributes", {}).get("ntk_dist", {})
        array = ts.open({"driver": "zarr3", "kvstore": spec}, open=True).result()
        return cls(spec, array, attributes)

    @classmethod
    def create(
        cls,
        kernel: KernelStore,
        name: str,
        shape: Sequence[int],
        chunk: Sequence[int],
        dtype: Any,
        attributes: dict,
    ) -> FactorStore:
        """Create (replacing any previous one) the factor ``name`` of ``kernel``."""
        spec = _spec(kernel, name)
        ts.KvStore.open(spec).result().delete_range(ts.KvStore.KeyRange()).result()
        dtype = np.dtype(dtype)
        attributes = {**attributes, "kernel_fingerprint": kernel.fingerprint}
        metadata = {
            "shape": list(shape),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
            "chunk_key_encoding": {"name": "default"},
            "data_type": dtype.name,
            "fill_value": "NaN",
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "attributes": {"ntk_dist": attributes},
        }
        array = ts.open({"driver": "zarr3", "kvstore": spec, "metadata": metadata}, create=True)
        return cls(spec, array.result(), attributes)

    def write(self, key: str, index: tuple[slice, ...], data: np.ndarray) -> None:
        """Write ``data`` at ``index``, then record ``key`` as finished in the ledger.

        A chunk at a time (the region cut at the chunk grid), so that the copies on the
        way (contiguous data, encoded chunks) stay a chunk in size whatever the region's
        shape or memory order.
        """
        grid = self.array.chunk_layout.write_chunk.shape
        starts = [i.indices(size)[0] for i, size in zip(index, self.array.shape, strict=True)]
        spans = [_spans(*a) for a in zip(starts, data.shape, grid, strict=True)]
        for piece in itertools.product(*spans):
            block = np.ascontiguousarray(data[piece], self.array.dtype.numpy_dtype)
            at = zip(starts, piece, strict=True)
            where = tuple(slice(s + p.start, s + p.stop) for s, p in at)
            self.array[where].write(block).result()
        self._ledger.write(key + ".json", json.dumps({"key": key}).encode()).result()

    def done(self) -> set[str]:
        """Keys of the finished pieces."""
        return {k.decode().removesuffix(".json") for k in self._ledger.list().result()}

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        """The data at ``index`` (the caller makes sure it is finished)."""
        return self.array[index].read().result()


def _spans(start: int, length: int, step: int) -> list[slice]:
    """``[0, length)`` cut where ``start + i`` meets a multiple of ``step``."""
    cuts = range(step - start % step, length, step)
    edges = [0, *cuts, length]
    return [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
