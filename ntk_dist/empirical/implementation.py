"""Which algorithm computes the empirical NTK (neural-tangents' ``NtkImplementation``)."""

from __future__ import annotations

import enum


class NtkImplementation(enum.IntEnum):
    """Algorithm for the empirical NTK; values equal neural-tangents' so plain ints work too.

    AUTO ranks the others by a FLOP/memory cost model, times the best two on a small block
    and caches the pick on disk (``ntk_dist.empirical.autotune``); the choice changes
    speed, never results.
    STRUCTURED_DERIVATIVES contracts dense and convolution weights through their inputs and
    output cotangents (``ntk_dist.empirical.structured``).
    """

    AUTO = 0
    JACOBIAN_CONTRACTION = 1
    NTK_VECTOR_PRODUCTS = 2
    STRUCTURED_DERIVATIVES = 3


def canonicalize_implementation(implementation: object) -> NtkImplementation:
    """Turn an ``NtkImplementation`` or plain int into the enum, or raise a ValueError."""
    if isinstance(implementation, bool) or not isinstance(implementation, int):
        valid = ", ".join(f"{m.name}={m.value}" for m in NtkImplementation)
        raise ValueError(
            f"implementation={implementation!r} is not an NtkImplementation; "
            f"pass one of {valid} (the enum member or its int value)."
        )
    try:
        return NtkImplementation(implementation)
    except ValueError:
        valid = ", ".join(f"{m.name}={m.value}" for m in NtkImplementation)
        raise ValueError(
            f"implementation={implementation!r} is not a known NtkImplementation; "
            f"pass one of {valid}."
        ) from None
