"""A kernel on disk: one Zarr v3 array written through tensorstore, plus a tile ledger.

Layout under the store's path (any tensorstore kvstore; a local directory by
default)::

  zarr.json              array metadata; ``attributes["ntk_dist"]`` says what the
                         kernel is (kind, axes, dtype, shapes, block shape,
                         fingerprint of the inputs)
  c/...                  chunks, one per tile (chunk shape == block shape)
  ntk_dist_tiles/I_J.json  ledger: one small JSON per completed tile with its
                         sha256 checksums, written only after the tile's data
                         is durable

A chunk file is no completion marker (a chunk equal to the fill value is never
written, and a crash can leave any state behind), so completion is read from the
ledger only. Unwritten entries read as NaN (the fill value) so that a plain
``zarr.open`` of an unfinished store cannot pass for a finished kernel. One
ledger key per tile keeps concurrent writers of distinct tiles safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from ntk_dist.tiling import Tile, TilePlan

__all__ = ["KernelStore", "NonFiniteTileError", "StoreMismatchError", "check_finite"]

_ATTR = "ntk_dist"
_LEDGER = "ntk_dist_tiles/"
_FORMAT_VERSION = 1
_CREATE_WAIT = 2.0  # seconds a folder without zarr.json may take to become a store


class StoreMismatchError(ValueError):
    """An existing store holds a different kernel than the one requested."""


class NonFiniteTileError(ValueError):
    """A computed tile contains NaN or Inf; it was not written."""

    def __init__(self, message: str, tiles: Sequence[tuple[int, int]]):
        super().__init__(message)
        self.tiles = list(tiles)

    def __reduce__(self) -> tuple:
        """Picklable, so that it crosses process boundaries (Ray workers) intact."""
        return (type(self), (str(self), self.tiles))


def _kvstore_spec(path: Any) -> dict[str, Any]:
    """A tensorstore kvstore spec (dict) for a local path, a kvstore URL or a spec."""
    if isinstance(path, dict):
        spec = dict(path)
    elif isinstance(path, str) and "://" in path:
        spec = ts.KvStore.Spec(path).to_json()
    else:
        spec = {"driver": "file", "path": os.path.abspath(os.fspath(path))}
    if not spec.get("path", "").endswith("/"):
        spec["path"] = spec.get("path", "") + "/"
    return spec


def _checksum(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class KernelStore:
    """A (possibly unfinished) kernel stored as a Zarr v3 array.

    Create with :meth:`create`, reopen with :meth:`open`. Reading methods refuse
    regions whose tiles are not completed rather than return fill values.
    """

    def __init__(self, kvstore_spec: dict[str, Any], array: ts.TensorStore, meta: dict):
        self._kv_spec = kvstore_spec
        self._array = array
        self.metadata = meta
        self.plan = TilePlan(
            meta["n1"],
            meta["n2"],
            tuple(meta["block_shape"]),
            symmetric=meta["symmetric"],
            diagonal=meta["batch_diagonal"],
        )
        self._ledger = ts.KvStore.open({**kvstore_spec, "path": kvstore_spec["path"] + _LEDGER})
        self._ledger = self._ledger.result()

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        path: Any,
        *,
        plan: TilePlan,
        entry_shape: Sequence[int] = (),
        dtype: Any = np.float32,
        kind: str = "ntk",
        trace_axes: Sequence[int] | None = None,
        diagonal_axes: Sequence[int] = (),
        mirror_axes: Sequence[int] | None = None,
        fingerprint: str = "",
        model_name: str | None = None,
        implementation: Any = None,
        overwrite: bool = False,
    ) -> KernelStore:
        """Create a store for ``plan``, or reopen an identical one to resume it.

        ``entry_shape`` is the kernel's shape after the batch axes (``(n1, n2)``,
        or ``(n,)`` for a diagonal plan); ``mirror_axes`` the permutation that
        turns a tile K(a, b) into K(b, a) (default: swap axes 0/1 and each
        following pair). A store at ``path`` holding another kernel (other
        fingerprint, shape, axes, dtype or block shape) raises
        :class:`StoreMismatchError` unless ``overwrite=True``, which deletes it.
        """
        entry_shape = tuple(int(s) for s in entry_shape)
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise ValueError(f"a kernel store holds floating point numbers, got dtype={dtype}")
        lead = plan.kernel_shape
        if mirror_axes is None:
            n = len(lead) + len(entry_shape)
            mirror_axes = [1, 0] + [k + 1 - 2 * (k % 2) for k in range(2, n)]
            if n % 2:
                mirror_axes = list(range(n))
        meta = {
            "format_version": _FORMAT_VERSION,
            "kind": kind,
            "trace_axes": None if trace_axes is None else list(trace_axes),
            "diagonal_axes": list(diagonal_axes),
            "implementation": None if implementation is None else str(implementation),
            "dtype": dtype.name,
            "shape": list(lead + entry_shape),
            "n1": plan.n1,
            "n2": plan.n2,
            "block_shape": list(plan.block_shape),
            "symmetric": plan.symmetric,
            "batch_diagonal": plan.diagonal,
            "mirror_axes": [int(a) for a in mirror_axes],
            "fingerprint": fingerprint,
            "model_name": model_name,
        }
        kv_spec = _kvstore_spec(path)
        where = kv_spec["path"]
        existing = cls._read_meta(kv_spec)
        if existing is not None:
            diff = _differences(existing, meta)
            if not diff:
                return cls.open(path)
            if not overwrite:
                raise StoreMismatchError(
                    f"the store at {where} holds a different kernel: {'; '.join(diff)}. "
                    "Pass overwrite=True to delete it and recompute, or use another path."
                )
        if overwrite:
            cls._delete(kv_spec, existing)
        chunk = list(plan.full_tile_shape + entry_shape)
        spec = {
            "driver": "zarr3",
            "kvstore": kv_spec,
            "metadata": {
                "shape": meta["shape"],
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                "chunk_key_encoding": {"name": "default"},
                "data_type": dtype.name,
                "fill_value": "NaN",
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                "attributes": {_ATTR: meta},
            },
        }
        try:
            array = ts.open(spec, create=True).result()
        except ValueError as e:
            # Another process (a multi-host job) may have created the same store first.
            raced = cls._read_meta(kv_spec)
            if raced is not None and not _differences(raced, meta):
                return cls.open(path)
            raise OSError(f"cannot create a kernel store at {where}: {e}") from e
        return cls(kv_spec, array, meta)

    @classmethod
    def open(cls, path: Any) -> KernelStore:
        """Open an existing store (read and write)."""
        kv_spec = _kvstore_spec(path)
        meta = cls._read_meta(kv_spec)
        if meta is None:
            raise FileNotFoundError(f"no ntk_dist kernel store at {kv_spec['path']}")
        array = ts.open({"driver": "zarr3", "kvstore": kv_spec}, open=True).result()
        return cls(kv_spec, array, meta)

    @staticmethod
    def _read_meta(kv_spec: dict[str, Any]) -> dict | None:
        """The ntk_dist attributes at the path; None if nothing is there.

        A folder with files but no ``zarr.json`` is read again for up to
        ``_CREATE_WAIT`` seconds (another process of a multi-host job may be creating
        the store this moment) before it is refused as something else.
        """
        deadline = time.monotonic() + _CREATE_WAIT
        while True:
            try:
                kv = ts.KvStore.open(kv_spec).result()
                raw = kv.read("zarr.json").result()
                occupied = raw.state != "value" and bool(kv.list().result())
            except ValueError as e:
                raise OSError(f"cannot open a kernel store at {kv_spec['path']}: {e}") from e
            if not occupied or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if raw.state != "value":
            if occupied:
                raise FileExistsError(
                    f"{kv_spec['path']} exists and is not empty, but is not a kernel store; "
                    "choose another path"
                )
            return None
        meta = json.loads(raw.value).get("attributes", {}).get(_ATTR)
        if meta is None:
            raise FileExistsError(
                f"{kv_spec['path']} is a Zarr array not written by ntk_dist; refusing to use "
                "or overwrite it"
            )
        return meta

    @staticmethod
    def _delete(kv_spec: dict[str, Any], existing: dict | None) -> None:
        if existing is None:
            return
        kv = ts.KvStore.open(kv_spec).result()
        kv.delete_range(ts.KvStore.KeyRange()).result()

    # ------------------------------------------------------------------ writing
    def write_tile(self, tile: Tile, block: np.ndarray, *, node: str | None = None) -> None:
        """Write one computed tile (and its mirror), then mark it complete.

        The block must have the tile's shape and be finite; otherwise nothing is
        written. The ledger entry is written only after the data is durable and
        records ``node``, the host or worker that computed the tile, when given.
        """
        block = np.asarray(block)
        expected = self.tile_shape(tile)
        if block.shape != expected:
            raise ValueError(
                f"tile ({tile.i}, {tile.j}) must have shape {expected}, got {block.shape}"
            )
        check_finite(tile, block, diagonal=self.plan.diagonal)
        block = np.ascontiguousarray(block, dtype=self.dtype)
        sums = [_checksum(block)]
        try:
            futures = [self._region(tile.i, tile.j).write(block)]
            if tile.mirrored:
                mirror = np.ascontiguousarray(block.transpose(self.metadata["mirror_axes"]))
                sums.append(_checksum(mirror))
                futures.append(self._region(tile.j, tile.i).write(mirror))
            for f in futures:
                f.result()
            entry = {"i": tile.i, "j": tile.j, "sha256": sums, "time": time.time()}
            if node is not None:
                entry["node"] = node
            self._ledger.write(_key(tile.i, tile.j), json.dumps(entry).encode()).result()
        except ValueError as e:
            raise OSError(
                f"could not write tile ({tile.i}, {tile.j}) to {self.path}: {e}; "
                "the tile is not marked complete"
            ) from e

    def forget_tiles(self, tiles: Sequence[tuple[int, int]]) -> None:
        """Mark tiles as not completed and delete their chunks.

        Deleting matters for damaged chunks: a ragged tile is written by
        read-modify-write, which would trip over the damaged bytes.
        """
        kv = ts.KvStore.open(self._kv_spec).result()
        for i, j in tiles:
            del self._ledger[_key(i, j)]
            places = {(i, j), (j, i)} if self.plan.tile(i, j).mirrored else {(i, j)}
            for a, b in places:
                del kv[self._chunk_key(a, b)]

    def _chunk_key(self, i: int, j: int) -> str:
        """Key of block (i, j)'s chunk (Zarr v3 default chunk key encoding)."""
        lead = [i] if self.plan.diagonal else [i, j]
        rest = [0] * (self.ndim - len(lead))
        return "c/" + "/".join(str(k) for k in lead + rest)

    # ------------------------------------------------------------------ reading
    @property
    def path(self) -> str:
        return self._kv_spec["path"]

    @property
    def kvstore_spec(self) -> dict[str, Any]:
        """The tensorstore kvstore spec of the store's root (a copy), for siblings like factors."""
        return dict(self._kv_spec)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["shape"])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.metadata["dtype"])

    @property
    def fingerprint(self) -> str:
        return self.metadata["fingerprint"]

    def tile_shape(self, tile: Tile) -> tuple[int, ...]:
        """Shape of the kernel block a tile covers."""
        entry = self.shape[len(self.plan.kernel_shape) :]
        lead = tile.shape[:1] if self.plan.diagonal else tile.shape
        return lead + entry

    def _ledger_entries(self) -> dict[tuple[int, int], dict]:
        keys = self._ledger.list().result()
        out = {}
        for fut in [self._ledger.read(k) for k in keys]:
            res = fut.result()
            if res.state == "value":
                entry = json.loads(res.value)
                out[(entry["i"], entry["j"])] = entry
        return out

    def tile_records(self) -> dict[tuple[int, int], dict]:
        """Ledger entries of completed tiles by (i, j): checksums, time, ``node`` if known."""
        return self._ledger_entries()

    def completed_tiles(self) -> list[Tile]:
        """Tiles marked complete in the ledger, in plan order."""
        done = self._ledger_entries()
        return [t for t in self.plan if (t.i, t.j) in done]

    def missing_tiles(self) -> list[Tile]:
        """Tiles of the plan not yet completed, in plan order."""
        done = self._ledger_entries()
        return [t for t in self.plan if (t.i, t.j) not in done]

    @property
    def is_complete(self) -> bool:
        return not self.missing_tiles()

    def verify(self) -> list[Tile]:
        """Re-read every completed tile and return those whose checksum fails.

        Missing, truncated or altered chunks all show up here (unreadable chunks
        count as damaged).
        """
        damaged = []
        for (i, j), entry in sorted(self._ledger_entries().items()):
            tile = self.plan.tile(i, j)
            places = [(i, j), (j, i)] if tile.mirrored else [(i, j)]
            for (a, b), expected in zip(places, entry["sha256"], strict=True):
                try:
                    ok = _checksum(self._region(a, b).read().result()) == expected
                except ValueError:
                    ok = False
                if not ok:
                    damaged.append(tile)
                    break
        return damaged

    def _region(self, i: int, j: int) -> ts.TensorStore:
        """The array view of block (i, j) (blocks below the diagonal too)."""
        t = self.plan.tile(i, j)
        if self.plan.diagonal:
            return self._array[t.row_start : t.row_stop]
        return self._array[t.row_start : t.row_stop, t.col_start : t.col_stop]

    def _covering(self, i: int, j: int) -> tuple[int, int]:
        """The computed tile whose data lands in block (i, j)."""
        return (j, i) if self.plan.symmetric and i > j else (i, j)

    def _require(self, blocks: set[tuple[int, int]]) -> None:
        done = self._ledger_entries()
        missing = sorted({self._covering(i, j) for i, j in blocks} - done.keys())
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"the kernel at {self.path} is not complete there: tiles {shown} are not "
                f"computed ({len(self.missing_tiles())} of {len(self.plan)} missing); "
                "finish it with compute_kernel(..., store=...)"
            )

    def block(self, i: int, j: int | None = None) -> np.ndarray:
        """Block (i, j) of the kernel (below the diagonal too); ``block(i)`` if diagonal."""
        j = i if j is None else j
        if self.plan.diagonal and i != j:
            raise ValueError(f"a diagonal-over-batch kernel has only blocks (i, i), got ({i}, {j})")
        self._require({(i, j)})
        return self._region(i, j).read().result()

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Kernel rows ``start:stop`` (all columns)."""
        start, stop, _ = slice(start, stop).indices(self.plan.n1)
        bm, _ = self.plan.block_shape
        nb2 = self.plan.grid[1]
        blocks = set()
        for i in range(start // bm, (max(stop, start + 1) - 1) // bm + 1):
            blocks |= {(i, i)} if self.plan.diagonal else {(i, j) for j in range(nb2)}
        if stop > start:
            self._require(blocks)
        return self._array[start:stop].read().result()

    def to_numpy(self) -> np.ndarray:
        """The whole kernel in memory; refuses an unfinished store."""
        self._require({(t.i, t.j) for t in self.plan})
        return self._array.read().result()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.to_numpy()
        return out if dtype is None else out.astype(dtype)

    def __reduce__(self) -> tuple:
        """Pickle as the kvstore location (workers of a cluster reopen the same store)."""
        return (KernelStore.open, (self._kv_spec,))

    def __repr__(self) -> str:
        done = len(self.completed_tiles())
        return (
            f"KernelStore({self.path!r}, kind={self.metadata['kind']!r}, shape={self.shape}, "
            f"dtype={self.dtype.name}, tiles {done}/{len(self.plan)})"
        )


def check_finite(tile: Tile, block: np.ndarray, *, diagonal: bool = False) -> None:
    """Raise :class:`NonFiniteTileError` (with tile and kernel indices) if block has NaN/Inf."""
    bad = ~np.isfinite(block)
    if not bad.any():
        return
    first = [int(k) for k in np.argwhere(bad)[0]]
    first[0] += tile.row_start
    if not diagonal:
        first[1] += tile.col_start
    raise NonFiniteTileError(
        f"tile ({tile.i}, {tile.j}) (rows {tile.row_start}:{tile.row_stop}, cols "
        f"{tile.col_start}:{tile.col_stop}) has {int(bad.sum())} NaN/Inf entries, first at "
        f"kernel index {tuple(first)}; it was not written",
        [(tile.i, tile.j)],
    )


def _key(i: int, j: int) -> str:
    return f"{i}_{j}.json"


_COMPARED = (
    "fingerprint",
    "kind",
    "shape",
    "dtype",
    "trace_axes",
    "diagonal_axes",
    "implementation",
    "block_shape",
    "symmetric",
    "batch_diagonal",
    "mirror_axes",
)


def _differences(stored: dict, wanted: dict) -> list[str]:
    out = []
    for k in _COMPARED:
        if stored.get(k) != wanted[k]:
            why = " (other x1, x2, params, model name or kernel kwargs)" * (k == "fingerprint")
            out.append(
                f"{k} is {stored.get(k)!r} in the store but {wanted[k]!r} was asked for{why}"
            )
    return out
