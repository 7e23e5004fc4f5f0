"""Full float32 precision for the library's own products on every backend.

By default a float32 matrix product runs as TF32 on recent GPUs and as bfloat16 passes on
TPUs (~1e-3 relative): a kernel, a factorisation or a prediction would lose three digits.
Every product that ntk_dist itself computes on a device asks for ``HIGHEST``; the user's
``f`` keeps whatever precision it chose. float64 and CPUs are unaffected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full precision."""
    return jnp.matmul(a, b, precision=HIGHEST)
