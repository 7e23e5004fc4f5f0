"""Two-stage kernels: per-block features, then a contraction of two feature blocks.

For Jacobian contraction (implementation 1) the features of a block of examples are its
Jacobians, one array per (output leaf, parameter leaf) flattened to ``out_shape + (size,)``;
for the NNGP they are the outputs f(x) themselves (with a trailing axis of size 1). The
kernel between two blocks is ``contract_features(features(x1), features(x2))``, so a tiler
can compute each block's features once and reuse them across the tiles that need them.
Structured derivatives (implementation 3) have their own features, inputs and output
cotangents of dense and convolution weights (``ntk_dist.empirical.structured``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ntk_dist.empirical.axes import Axes, resolve_axes
from ntk_dist.empirical.batching import VmapAxes
from ntk_dist.empirical.jacobian_contraction import contract, jacobians
from ntk_dist.empirical.problem import make_problem


@dataclasses.dataclass(frozen=True)
class BlockFeatures:
    """Features of one block: ``leaves[i]`` lists arrays ``out_shape_i + (k,)`` to contract.

    A pytree whose only static part is ``out_tree``, the structure of f's output.
    """

    leaves: list[list[jax.Array]]
    out_tree: Any


jax.tree_util.register_dataclass(BlockFeatures, data_fields=["leaves"], meta_fields=["out_tree"])


def ntk_features(
    f: Callable[..., Any], trace_axes: Axes, diagonal_axes: Axes, vmap: VmapAxes | None
) -> Callable[..., BlockFeatures]:
    """``features(x, params, **kwargs)``: the Jacobians of f on a block, per parameter leaf."""

    def features(x: Any, params: Any, **kwargs: Any) -> BlockFeatures:
        problem = make_problem(f, x, None, params, kwargs, trace_axes, diagonal_axes, vmap)
        per_output = jacobians(problem, x, problem.kwargs1)
        leaves = [
            [j.reshape((*shape, -1)) for j in jacs] or [jnp.zeros((*shape, 0), dtype)]
            for jacs, shape, dtype in zip(per_output, problem.shapes1, problem.dtypes, strict=True)
        ]
        return BlockFeatures(leaves, problem.out_tree)

    return features


def nngp_features(
    f: Callable[..., Any], trace_axes: Axes, diagonal_axes: Axes
) -> Callable[..., BlockFeatures]:
    """``features(x, params, **kwargs)``: the outputs f(params, x) of a block."""

    def features(x: Any, params: Any, **kwargs: Any) -> BlockFeatures:
        problem = make_problem(f, x, None, params, kwargs, trace_axes, diagonal_axes, None)
        outputs = jax.tree.leaves(f(params, x, **problem.kwargs1))
        return BlockFeatures([[o[..., None]] for o in outputs], problem.out_tree)

    return features


def contract_features_fn(
    trace_axes: Axes, diagonal_axes: Axes
) -> Callable[[BlockFeatures, BlockFeatures], Any]:
    """``contract_features(features1, features2)``: the kernel in neural-tangents layout."""

    def contract_features(a: BlockFeatures, b: BlockFeatures) -> Any:
        kernels = []
        for i, (us, vs) in enumerate(zip(a.leaves, b.leaves, strict=True)):
            where = "the output of f(params, x)" if len(a.leaves) == 1 else f"output {i}"
            axes = resolve_axes(
                trace_axes, diagonal_axes, us[0].shape[:-1], vs[0].shape[:-1], where
            )
            terms = [contract(u, v, axes) for u, v in zip(us, vs, strict=True)]
            kernels.append(sum(terms[1:], start=terms[0]))
        return jax.tree.unflatten(a.out_tree, kernels)

    return contract_features
