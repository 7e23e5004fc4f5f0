"""NTK by NTK-vector products: Theta e_k = J1 (J2^T e_k), never forming J1 or J2.

For each basis cotangent e_k of f(x2) a VJP gives a parameter-space vector and a JVP of
f(x1) maps it to one column of the kernel. Only the entries of that column that survive the
trace/diagonal rules are kept (same traced and diagonal index as e_k), so memory holds the
kernel times the traced size, plus a chunk of parameter-sized vectors. Traced axes still need
one basis vector per traced index: a mean over c of J1[c] J2[c]^T has no cross terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist.empirical.axes import KernelAxes
from ntk_dist.empirical.batching import per_example_fn, split_batched_kwargs
from ntk_dist.empirical.memory import memory_budget_bytes
from ntk_dist.empirical.problem import KernelProblem


def chunk_size(
    n_basis: int, n_params: int, size1: int, size2: int, itemsize: int, copies: int = 1
) -> int:
    """How many basis vectors to push through at once within the memory budget.

    ``copies`` is the number of such computations vmapped side by side (pairs of examples).
    """
    per_vector = itemsize * (n_params + size1 + size2) * 4  # vectors plus tangent buffers
    return int(max(1, min(n_basis, memory_budget_bytes() // (per_vector * max(copies, 1)))))


def leaf_kernel(
    jvp1: Callable[[Any], jax.Array],
    vjp2: Callable[[jax.Array], Any],
    shape1: tuple[int, ...],
    shape2: tuple[int, ...],
    dtype: np.dtype,
    axes: KernelAxes,
    chunk: int,
) -> jax.Array:
    """Kernel of one output from linear maps ``jvp1: params -> f(x1)``, ``vjp2: f(x2) -> params``.

    Basis vectors are enumerated in the order (diagonal, traced, free) of f(x2)'s axes.
    """
    order = axes.diagonal + axes.trace + axes.free
    sizes2 = [shape2[a] for a in order]
    n_diag = math.prod(shape2[a] for a in axes.diagonal)
    n_trace = math.prod(shape2[a] for a in axes.trace)
    n_free2 = math.prod(shape2[a] for a in axes.free)
    free1 = [shape1[a] for a in axes.free]
    n_basis = n_diag * n_trace * n_free2
    inverse = tuple(int(i) for i in np.argsort(order))

    def column(k: jax.Array) -> jax.Array:
        cotangent = jax.nn.one_hot(k, n_basis, dtype=dtype).reshape(sizes2).transpose(inverse)
        y = jvp1(vjp2(cotangent)).transpose(order).reshape(n_diag * n_trace, -1)
        return y[k // n_free2]

    basis = jnp.arange(n_basis)
    if chunk >= n_basis:
        columns = jax.vmap(column)(basis)
    else:
        columns = jax.lax.map(column, basis, batch_size=chunk)
    kernel = columns.reshape(n_diag, n_trace, n_free2, -1).sum(1)
    if n_trace != 1:
        kernel = kernel / n_trace
    diag_sizes = [shape2[a] for a in axes.diagonal]
    free2 = [shape2[a] for a in axes.free]
    kernel = jnp.swapaxes(kernel, 1, 2).reshape(diag_sizes + free1 + free2)
    return jnp.transpose(kernel, axes.layout_permutation())


def _linear_maps(
    f1: Callable[[Any], jax.Array], f2: Callable[[Any], jax.Array] | None, params: Any
) -> tuple[Callable[[Any], jax.Array], Callable[[jax.Array], Any]]:
    """(jvp of f1, vjp of f2) at params; f2=None reuses f1's linearisation for both."""
    _, jvp1 = jax.linearize(f1, params)
    if f2 is None:
        transpose = jax.linear_transpose(jvp1, params)
    else:
        _, transpose = jax.vjp(f2, params)
    return jvp1, lambda ct: transpose(ct)[0]


def _whole_batch(problem: KernelProblem, i: int) -> jax.Array:
    f, x1, x2 = problem.f, problem.x1, problem.x2
    kw1, kw2 = problem.kwargs1, problem.kwargs2
    s1, s2 = problem.shapes1[i], problem.shapes2[i]
    f2 = None if x2 is None else (lambda p: jax.tree.leaves(f(p, x2, **kw2))[i])
    jvp1, vjp2 = _linear_maps(lambda p: jax.tree.leaves(f(p, x1, **kw1))[i], f2, problem.params)
    itemsize = problem.dtypes[i].itemsize
    chunk = chunk_size(math.prod(s2), problem.n_params, math.prod(s1), math.prod(s2), itemsize)
    return leaf_kernel(jvp1, vjp2, s1, s2, problem.dtypes[i], problem.axes[i], chunk)


def _per_pair(problem: KernelProblem, i: int) -> jax.Array:
    """Kernel when output i's batch axis is traced or diagonal: only pairs (x1[n], x2[n])."""
    vmap, params, b = problem.vmap, problem.params, problem.out_axes[i]
    axes = problem.axes[i]
    one_axes = axes.without(b)
    s1 = problem.shapes1[i][:b] + problem.shapes1[i][b + 1 :]
    s2 = problem.shapes2[i][:b] + problem.shapes2[i][b + 1 :]
    batched1, kw_axes, static1 = split_batched_kwargs(vmap, problem.kwargs1)
    batched2, _, static2 = split_batched_kwargs(vmap, problem.kwargs2)
    g1 = per_example_fn(problem.f, vmap, kw_axes, static1, problem.out_axes)
    g2 = per_example_fn(problem.f, vmap, kw_axes, static2, problem.out_axes)
    n = problem.shapes1[i][b]
    itemsize = problem.dtypes[i].itemsize
    chunk = chunk_size(
        math.prod(s2), problem.n_params, math.prod(s1), math.prod(s2), itemsize, copies=n
    )

    def pair(x1: Any, x2: Any, kw1: dict[str, Any], kw2: dict[str, Any]) -> jax.Array:
        f2 = None if problem.x2 is None else (lambda p: g2(p, x2, kw2)[i])
        jvp1, vjp2 = _linear_maps(lambda p: g1(p, x1, kw1)[i], f2, params)
        return leaf_kernel(jvp1, vjp2, s1, s2, problem.dtypes[i], one_axes, chunk)

    x2 = problem.x1 if problem.x2 is None else problem.x2
    in_axes = (vmap.in_axes, vmap.in_axes, kw_axes, kw_axes)
    kernels = jax.vmap(pair, in_axes=in_axes)(problem.x1, x2, batched1, batched2)
    if b in axes.trace:
        return jnp.mean(kernels, axis=0)
    return jnp.moveaxis(kernels, 0, axes.position(b))


def ntk(problem: KernelProblem) -> list[jax.Array]:
    """Empirical NTK of each output leaf of f, by NTK-vector products.

    With ``vmap_axes`` and an output whose batch axis is traced or diagonal, only matching
    pairs of examples are computed (one per-example product each); otherwise the products
    run on the whole batch, where ``vmap_axes`` would not save work.
    """
    kernels = []
    for i, axes in enumerate(problem.axes):
        if problem.vmap is not None and problem.out_axes[i] in axes.trace + axes.diagonal:
            kernels.append(_per_pair(problem, i))
        else:
            kernels.append(_whole_batch(problem, i))
    return kernels
