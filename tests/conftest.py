"""Test-wide settings: float64 everywhere so oracles can be compared to ~1e-10.

AUTO decides by the cost model alone and caches in a private folder, so tests (and the
subprocesses they start, which inherit the environment) never time candidates or touch
the user's ``~/.cache/ntk_dist``; tests/test_autotune.py turns measurement back on.
"""

import os
import tempfile

import jax

os.environ.setdefault("NTK_DIST_AUTOTUNE", "model")
os.environ.setdefault("NTK_DIST_CACHE", tempfile.mkdtemp(prefix="ntk_dist_test_cache_"))

jax.config.update("jax_enable_x64", True)
