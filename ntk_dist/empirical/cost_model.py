"""AUTO's first stage: rank the implementations by estimated FLOPs and memory, nothing run.

The cost of one forward pass of f comes from XLA's cost analysis of the lowered (not
compiled) primal, or from ``2 * params * batch`` when the backend gives none. With F the
forward FLOPs, P the parameter count and O the outputs (per example if vmapped):

* Jacobian contraction (1): ``F + 2 F min(O, P)`` per Jacobian (reverse or forward mode),
  plus ``2 P`` per kernel entry before the trace (the contraction); memory holds J1 and J2.
* NTK-vector products (2): ``F1 + F2 + 2 (F1 + F2)`` per cotangent basis vector of f(x2),
  all of f(x2) being needed even when traced; memory holds a chunk of parameter-sized
  vectors.
* Any other implementation (e.g. structured derivatives, 3): the FLOPs XLA's cost analysis
  counts in its lowered kernel computation at these shapes; its memory is not modelled
  (the measurement and the tiler's memory model check it).

The ranking puts those that fit the memory budget first, cheapest first (ties: lower
implementation number), then the others by memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from ntk_dist.empirical.axes import Axes
from ntk_dist.empirical.batching import canonicalize_vmap_axes
from ntk_dist.empirical.implementation import NtkImplementation
from ntk_dist.empirical.memory import memory_budget_bytes
from ntk_dist.empirical.problem import KernelProblem, make_problem

JC, NVP = NtkImplementation.JACOBIAN_CONTRACTION, NtkImplementation.NTK_VECTOR_PRODUCTS


@dataclasses.dataclass(frozen=True)
class CostEstimate:
    """Estimated FLOPs and peak bytes of each implementation, and the budget they must fit."""

    flops: dict[NtkImplementation, float]
    peak_bytes: dict[NtkImplementation, float]
    memory_budget_bytes: float

    def fits(self, implementation: NtkImplementation) -> bool:
        """Whether the implementation's estimated peak memory fits the budget."""
        return self.peak_bytes[implementation] <= self.memory_budget_bytes

    @property
    def ranking(self) -> list[NtkImplementation]:
        """Implementations that fit, cheapest first, then those that do not, smallest first."""
        return rank(
            {k: (self.flops[k], self.peak_bytes[k]) for k in self.flops}, self.memory_budget_bytes
        )

    @property
    def choice(self) -> NtkImplementation:
        """The cost model's pick: the first of :attr:`ranking`."""
        return self.ranking[0]


def rank(
    options: Mapping[NtkImplementation, tuple[float, float]], budget: float
) -> list[NtkImplementation]:
    """Order ``{implementation: (flops, bytes)}``: fitting ``budget`` by flops, then by bytes."""
    fitting = sorted(
        (k for k, v in options.items() if v[1] <= budget), key=lambda k: (options[k][0], k)
    )
    others = sorted(
        (k for k, v in options.items() if v[1] > budget), key=lambda k: (options[k][1], k)
    )
    return fitting + others


def flops_from_cost_analysis(analysis: Any) -> float | None:
    """The 'flops' entry of a cost analysis, which is a dict, a list of dicts or None."""
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not isinstance(analysis, dict):
        return None
    flops = analysis.get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct)


def lowered_flops(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> float | None:
    """FLOPs XLA counts in ``fn(*args, **kwargs)`` lowered at these shapes (None if none).

    Array keyword arguments are passed abstractly, the others (flags, strings) statically.
    """
    leaves, tree = jax.tree.flatten(kwargs)
    is_array = [_is_array(leaf) for leaf in leaves]

    def call(positional: tuple[Any, ...], arrays: list[Any]) -> Any:
        it = iter(arrays)
        kw = [next(it) if a else leaf for leaf, a in zip(leaves, is_array, strict=True)]
        return fn(*positional, **jax.tree.unflatten(tree, kw))

    def spec(tree_: Any) -> Any:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree_)

    arrays = [leaf for leaf, a in zip(leaves, is_array, strict=True) if a]
    try:
        lowered = jax.jit(call).lower(spec(args), spec(arrays))
        return flops_from_cost_analysis(lowered.cost_analysis())
    except Exception:  # noqa: BLE001 - any failure only means "no estimate from XLA"
        return None


def primal_flops(f: Callable[..., Any], params: Any, x: Any, kwargs: dict[str, Any]) -> float:
    """FLOPs of one call f(params, x, **kwargs), estimated from shapes only."""
    flops = lowered_flops(f, (params, x), kwargs)
    if flops is not None:
        return flops
    n_params = sum(math.prod(np.shape(p)) for p in jax.tree.leaves(params))
    batch = max((np.shape(leaf)[0] for leaf in jax.tree.leaves(x) if np.ndim(leaf)), default=1)
    return 2.0 * n_params * batch


def _modelled_costs(problem: KernelProblem) -> dict[NtkImplementation, tuple[float, float]]:
    """(flops, peak bytes) of implementations 1 and 2 from the formulas above."""
    p = problem.n_params
    same = problem.x2 is None
    f1 = primal_flops(problem.f, problem.params, problem.x1, problem.kwargs1)
    f2 = f1 if same else primal_flops(problem.f, problem.params, problem.x2, problem.kwargs2)
    itemsize = max(d.itemsize for d in problem.dtypes)
    jc_flops = jc_bytes = nvp_flops = nvp_bytes = 0.0
    jac_out1 = jac_out2 = 0
    for i, axes in enumerate(problem.axes):
        s1, s2 = problem.shapes1[i], problem.shapes2[i]
        kernel_size = math.prod(problem.kernel_shape(i))
        b = None if problem.out_axes is None else problem.out_axes[i]
        n = 1 if b is None else s1[b]
        jac_out1 += math.prod(s1) // max(n, 1)
        jac_out2 += math.prod(s2) // max(1 if b is None else s2[b], 1)
        jc_flops += 2.0 * p * kernel_size * axes.trace_size(s1)
        jc_bytes += (math.prod(s1) + (0 if same else math.prod(s2))) * p * itemsize
        per_pair = b is not None and b in axes.trace + axes.diagonal
        n_basis = math.prod(s2) // (n if per_pair else 1)
        nvp_flops += (f1 + f2) * (1 + 2 * n_basis)
        nvp_bytes += kernel_size * axes.trace_size(s1) * itemsize + (p + math.prod(s2)) * itemsize
    jc_flops += f1 + 2 * f1 * min(jac_out1, p)
    if not same:
        jc_flops += f2 + 2 * f2 * min(jac_out2, p)
    return {JC: (jc_flops, jc_bytes), NVP: (nvp_flops, nvp_bytes)}


def estimate_problem(
    problem: KernelProblem,
    kernel_fns: Mapping[NtkImplementation, Callable[..., Any]] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> CostEstimate:
    """Cost estimate of implementations 1, 2 and of every other one in ``kernel_fns``.

    ``kernel_fns`` maps implementations to their kernel functions ``(x1, x2, params,
    **kwargs)``; the lowered FLOPs of those without a formula here stand in for one.
    """
    costs = _modelled_costs(problem)
    for impl, fn in (kernel_fns or {}).items():
        if impl not in costs:
            args = (problem.x1, problem.x2, problem.params)
            flops = lowered_flops(fn, args, kwargs or {})
            costs[impl] = (math.inf if flops is None else flops, 0.0)
    budget = float(memory_budget_bytes())
    return CostEstimate(
        {k: v[0] for k, v in costs.items()}, {k: v[1] for k, v in costs.items()}, budget
    )


def estimate_costs(
    f: Callable[..., Any],
    x1: Any,
    x2: Any | None,
    params: Any,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: Any = None,
    **apply_fn_kwargs: Any,
) -> CostEstimate:
    """Estimated FLOPs and memory of implementations 1 and 2 for ``empirical_ntk_fn``'s call."""
    vmap = canonicalize_vmap_axes(vmap_axes)
    problem = make_problem(f, x1, x2, params, apply_fn_kwargs, trace_axes, diagonal_axes, vmap)
    return estimate_problem(problem)
