"""Per-block kernel math for any ``f(params, x, **kwargs)``: empirical NTK / NNGP, axes
rules, the AUTO cost model, and linearised / Taylor-expanded networks.

Pure JAX, jit-able, and unaware of tiles, stores or hosts. The API is neural-tangents'.
"""

from ntk_dist.empirical.autotune import choose_implementation
from ntk_dist.empirical.cost_model import CostEstimate, estimate_costs
from ntk_dist.empirical.implementation import NtkImplementation
from ntk_dist.empirical.kernel_fns import empirical_kernel_fn, empirical_nngp_fn, empirical_ntk_fn
from ntk_dist.empirical.taylor import linearize, taylor_expand

__all__ = [
    "CostEstimate",
    "NtkImplementation",
    "choose_implementation",
    "empirical_kernel_fn",
    "empirical_nngp_fn",
    "empirical_ntk_fn",
    "estimate_costs",
    "linearize",
    "taylor_expand",
]
