"""How much memory one kernel computation may use, for the cost model and for chunking."""

from __future__ import annotations

import os

import jax

_HOST_FALLBACK_BYTES = 4 * 2**30


def memory_budget_bytes() -> int:
    """Half the memory of the default device (host RAM on CPU): room for f's own buffers."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except (RuntimeError, NotImplementedError):
        stats = {}
    total = stats.get("bytes_limit")
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = _HOST_FALLBACK_BYTES
    return int(total) // 2
