"""Test-wide settings: float64 everywhere so oracles can be compared to ~1e-10."""

import jax

jax.config.update("jax_enable_x64", True)
