"""NTK by explicit Jacobians: J1 J2^T contracted parameter leaf by parameter leaf.

Jacobians come from reverse mode when the outputs (per example, with ``vmap_axes``) are
fewer than the parameters, else from forward mode. Traced axes and parameter axes are
contracted by one ``dot_general`` per parameter leaf with diagonal axes as batch axes, so
the untraced kernel is never built.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from ntk_dist.empirical.axes import KernelAxes
from ntk_dist.empirical.batching import per_example_fn, split_batched_kwargs
from ntk_dist.empirical.problem import KernelProblem
from ntk_dist.precision import HIGHEST


def contract(a: jax.Array, b: jax.Array, axes: KernelAxes) -> jax.Array:
    """Kernel between ``a`` (out1 + extra) and ``b`` (out2 + extra) summing the extra axes.

    Output axes follow ``axes``' rules; the extra trailing axes (a parameter leaf's, or none
    for the NNGP) are summed over.
    """
    extra = tuple(range(axes.ndim, a.ndim))
    out = batched_gemm(a, b, axes.trace + extra, axes.diagonal)
    out = jnp.transpose(out, axes.layout_permutation())
    size = axes.trace_size(a.shape)
    return out if size == 1 else out / size


def batched_gemm(
    a: jax.Array, b: jax.Array, contracting: tuple[int, ...], batch: tuple[int, ...]
) -> jax.Array:
    """``dot_general`` of a and b over the same axes, as one batched matrix product.

    Same result and axis order as ``lax.dot_general`` (batch, free of a, free of b), but
    with every group of axes flattened first: XLA runs a (B, M, K) x (B, N, K) product as
    a plain GEMM, while many separate contracting axes can fall back to slower loops.
    """
    free_a = [i for i in range(a.ndim) if i not in contracting and i not in batch]
    free_b = [i for i in range(b.ndim) if i not in contracting and i not in batch]

    def as_3d(x: jax.Array, free: list[int]) -> jax.Array:
        groups = (batch, free, contracting)
        sizes = [math.prod(x.shape[i] for i in group) for group in groups]
        return jnp.transpose(x, (*batch, *free, *contracting)).reshape(sizes)

    dims = (((2,), (2,)), ((0,), (0,)))
    product = jax.lax.dot_general(as_3d(a, free_a), as_3d(b, free_b), dims, precision=HIGHEST)
    shape = (
        [a.shape[i] for i in batch] + [a.shape[i] for i in free_a] + [b.shape[i] for i in free_b]
    )
    return product.reshape(shape)


def jacobian_fn(out_size: int, n_params: int) -> Any:
    return jax.jacrev if out_size <= n_params else jax.jacfwd


def jacobians(problem: KernelProblem, x: Any, kwargs: dict[str, Any]) -> list[list[jax.Array]]:
    """Jacobian of each output leaf of f(params, x) as a list over parameter leaves.

    Each array has shape ``out_shape + param_leaf_shape``. With ``vmap_axes`` they are
    per-example Jacobians vmapped over the batch, which skips the backward passes through
    other examples that a whole-batch reverse-mode Jacobian would pay for.
    """
    f, params, n_params = problem.f, problem.params, problem.n_params
    if problem.vmap is None:
        out_size = sum(math.prod(s) for s in problem.shapes1)
        jac = jacobian_fn(out_size, n_params)(lambda p: jax.tree.leaves(f(p, x, **kwargs)))
        per_output = jac(params)
    else:
        out_axes = problem.out_axes
        per_example_size = sum(
            math.prod(s) // max(s[a], 1) for s, a in zip(problem.shapes1, out_axes, strict=True)
        )
        batched, batched_axes, static = split_batched_kwargs(problem.vmap, kwargs)
        g = per_example_fn(f, problem.vmap, batched_axes, static, out_axes)
        jac = jacobian_fn(per_example_size, n_params)

        def one(x_one: Any, kwargs_one: dict[str, Any]) -> list[Any]:
            return jac(lambda p: g(p, x_one, kwargs_one))(params)

        in_axes = (problem.vmap.in_axes, batched_axes)
        per_output = jax.vmap(one, in_axes=in_axes, out_axes=out_axes)(x, batched)
    return [jax.tree.leaves(j) for j in per_output]


def ntk(problem: KernelProblem) -> list[jax.Array]:
    """Empirical NTK of each output leaf of f, by Jacobian contraction."""
    j1 = jacobians(problem, problem.x1, problem.kwargs1)
    j2 = j1 if problem.x2 is None else jacobians(problem, problem.x2, problem.kwargs2)
    kernels = []
    for i, axes in enumerate(problem.axes):
        terms = [contract(a, b, axes) for a, b in zip(j1[i], j2[i], strict=True)]
        if terms:
            kernels.append(sum(terms[1:], start=terms[0]))
        else:
            kernels.append(jnp.zeros(problem.kernel_shape(i), problem.dtypes[i]))
    return kernels
