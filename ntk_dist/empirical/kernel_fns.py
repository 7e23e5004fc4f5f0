"""Public kernel constructors: ``empirical_ntk_fn``, ``empirical_nngp_fn``, ``empirical_kernel_fn``.

Each returns a function of ``(x1, x2, params, **apply_fn_kwargs)`` whose outputs follow
neural-tangents' shapes (see ``ntk_dist.empirical.axes``). f may return a pytree of arrays
(e.g. a list or tuple); the kernel then has the same structure, one kernel per output and
no cross-output kernels.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from ntk_dist.empirical import jacobian_contraction, ntk_vector_products, structured
from ntk_dist.empirical.autotune import AutotuneSpec, tune
from ntk_dist.empirical.axes import Axes
from ntk_dist.empirical.batching import canonicalize_vmap_axes
from ntk_dist.empirical.features import contract_features_fn, nngp_features, ntk_features
from ntk_dist.empirical.implementation import NtkImplementation, canonicalize_implementation
from ntk_dist.empirical.problem import make_problem

_KERNEL_NAMES = ("nngp", "ntk")
_IMPLEMENTATIONS = {
    NtkImplementation.JACOBIAN_CONTRACTION: jacobian_contraction.ntk,
    NtkImplementation.NTK_VECTOR_PRODUCTS: ntk_vector_products.ntk,
    NtkImplementation.STRUCTURED_DERIVATIVES: structured.ntk,
}


def _signature(*trees: Any) -> tuple[Any, ...]:
    """Hashable key of the shapes, dtypes and static values of some pytrees."""
    leaves, treedef = jax.tree.flatten(trees)
    key = []
    for leaf in leaves:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            key.append((tuple(leaf.shape), str(leaf.dtype)))
        else:
            try:
                hash(leaf)
                key.append(leaf)
            except TypeError:
                key.append(type(leaf).__name__)
    return treedef, tuple(key)


def _describe(
    fn: Callable[..., Any],
    kind: str,
    trace_axes: Axes,
    diagonal_axes: Axes,
    implementation: NtkImplementation | None,
) -> Callable[..., Any]:
    """Attach what the kernel is, so tilers and stores need not guess it from shapes.

    Kernels with per-block features (implementations 1 and 3, the NNGP) also carry
    ``.features(x, params, **kwargs)`` and ``.contract_features(features1, features2)``.
    """
    fn.kind = kind
    fn.trace_axes = trace_axes
    fn.diagonal_axes = diagonal_axes
    fn.implementation = implementation
    return fn


def empirical_ntk_fn(
    f: Callable[..., Any],
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: Any = None,
    implementation: NtkImplementation | int = NtkImplementation.JACOBIAN_CONTRACTION,
) -> Callable[..., Any]:
    """Return ``ntk_fn(x1, x2, params, **apply_fn_kwargs)``: the empirical NTK of f.

    The NTK is ``sum_p df(params, x1)/dp df(params, x2)/dp^T``, averaged over ``trace_axes``
    of the outputs, with ``diagonal_axes`` kept once (an axis in both counts as traced).
    ``x2=None`` means x1 (one Jacobian). ``vmap_axes`` declares batch axes of independent
    examples (None for f whose examples interact, e.g. BatchNorm). ``implementation`` changes
    speed, never results; AUTO decides once per input shapes and dtypes
    (:mod:`ntk_dist.empirical.autotune`).
    """
    impl = canonicalize_implementation(implementation)
    vmap = canonicalize_vmap_axes(vmap_axes)
    auto_choices: dict[Any, NtkImplementation] = {}
    auto = None
    if impl == NtkImplementation.AUTO:
        candidates = {
            i: empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, i)
            for i in _IMPLEMENTATIONS
        }
        auto = AutotuneSpec(f, trace_axes, diagonal_axes, vmap_axes, candidates)

    def ntk_fn(x1: Any, x2: Any | None, params: Any, **apply_fn_kwargs: Any) -> Any:
        problem = make_problem(f, x1, x2, params, apply_fn_kwargs, trace_axes, diagonal_axes, vmap)
        chosen = impl
        if auto is not None:
            key = _signature(x1, x2, params, apply_fn_kwargs)
            if key not in auto_choices:
                decision = tune(auto, x1, x2, params, apply_fn_kwargs, problem=problem)
                auto_choices[key] = decision.implementation
            chosen = auto_choices[key]
        kernels = _IMPLEMENTATIONS[chosen](problem)
        return jax.tree.unflatten(problem.out_tree, kernels)

    if impl == NtkImplementation.JACOBIAN_CONTRACTION:
        ntk_fn.features = ntk_features(f, trace_axes, diagonal_axes, vmap)
        ntk_fn.contract_features = contract_features_fn(trace_axes, diagonal_axes)
    elif impl == NtkImplementation.STRUCTURED_DERIVATIVES:
        ntk_fn.features, ntk_fn.contract_features = structured.two_stage(
            f, trace_axes, diagonal_axes, vmap
        )
    if auto is not None:
        ntk_fn.autotune = auto  # lets compute_kernel tune for its tiles and run the pick
    return _describe(ntk_fn, "ntk", trace_axes, diagonal_axes, impl)


def empirical_nngp_fn(
    f: Callable[..., Any], trace_axes: Axes = (-1,), diagonal_axes: Axes = ()
) -> Callable[..., Any]:
    """Return ``nngp_fn(x1, x2, params, **apply_fn_kwargs)``: f(x1) ⊗ f(x2) by the axes rules.

    Traced axes are averaged, diagonal axes kept once, others kept for x1 and x2.
    """

    def nngp_fn(x1: Any, x2: Any | None, params: Any, **apply_fn_kwargs: Any) -> Any:
        problem = make_problem(f, x1, x2, params, apply_fn_kwargs, trace_axes, diagonal_axes, None)
        fx1 = jax.tree.leaves(f(params, x1, **problem.kwargs1))
        fx2 = fx1 if x2 is None else jax.tree.leaves(f(params, x2, **problem.kwargs2))
        kernels = [
            jacobian_contraction.contract(a, b, axes)
            for a, b, axes in zip(fx1, fx2, problem.axes, strict=True)
        ]
        return jax.tree.unflatten(problem.out_tree, kernels)

    nngp_fn.features = nngp_features(f, trace_axes, diagonal_axes)
    nngp_fn.contract_features = contract_features_fn(trace_axes, diagonal_axes)
    return _describe(nngp_fn, "nngp", trace_axes, diagonal_axes, None)


@functools.cache
def _kernel_tuple(names: tuple[str, ...]) -> type:
    """One namedtuple class per field order, so results of equal requests share a type."""
    return collections.namedtuple("EmpiricalKernel", names)


def _canonicalize_get(get: str | Sequence[str] | None) -> tuple[tuple[str, ...], bool]:
    """(names to compute, whether to return a bare array)."""
    if get is None:
        return _KERNEL_NAMES, False
    if isinstance(get, str):
        names, bare = (get,), True
    elif isinstance(get, tuple | list):
        names, bare = tuple(get), False
    else:
        raise ValueError(f"get={get!r} must be None, a kernel name or a tuple of kernel names.")
    unknown = [n for n in names if n not in _KERNEL_NAMES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"get={get!r} must name each of {_KERNEL_NAMES} at most once (and at least one); "
            f"e.g. get='ntk' or get=('ntk', 'nngp')."
        )
    return names, bare


def empirical_kernel_fn(
    f: Callable[..., Any],
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: Any = None,
    implementation: NtkImplementation | int = NtkImplementation.JACOBIAN_CONTRACTION,
) -> Callable[..., Any]:
    """Return ``kernel_fn(x1, x2, get, params, **apply_fn_kwargs)`` for the NNGP and/or NTK.

    ``get`` is 'nngp' or 'ntk' (bare kernel), a tuple of those (namedtuple ``EmpiricalKernel``
    with fields in that order) or None (both, fields ('nngp', 'ntk')).
    """
    fns = {
        "nngp": empirical_nngp_fn(f, trace_axes, diagonal_axes),
        "ntk": empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, implementation),
    }

    def kernel_fn(
        x1: Any,
        x2: Any | None,
        get: str | Sequence[str] | None,
        params: Any,
        **apply_fn_kwargs: Any,
    ) -> Any:
        names, bare = _canonicalize_get(get)
        values = [fns[name](x1, x2, params, **apply_fn_kwargs) for name in names]
        if bare:
            return values[0]
        return _kernel_tuple(names)(*values)

    return kernel_fn
