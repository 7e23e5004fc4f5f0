"""One kernel request, resolved: split kwargs, output shapes, canonical axes, batch axes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ntk_dist.empirical.axes import Axes, KernelAxes, resolve_axes
from ntk_dist.empirical.batching import VmapAxes, out_axes_list
from ntk_dist.empirical.kwargs import split_kwargs


@dataclasses.dataclass(frozen=True)
class KernelProblem:
    """Everything an implementation needs; ``x2 is None`` means x2 is x1 (one Jacobian)."""

    f: Callable[..., Any]
    params: Any
    x1: Any
    x2: Any | None
    kwargs1: dict[str, Any]
    kwargs2: dict[str, Any]
    out_tree: Any
    shapes1: list[tuple[int, ...]]
    shapes2: list[tuple[int, ...]]
    dtypes: list[np.dtype]
    axes: list[KernelAxes]
    vmap: VmapAxes | None
    out_axes: list[int] | None

    @property
    def n_params(self) -> int:
        """Total number of scalar parameters."""
        return sum(math.prod(np.shape(p)) for p in jax.tree.leaves(self.params))

    def kernel_shape(self, i: int) -> tuple[int, ...]:
        """Shape of the kernel of output leaf ``i``."""
        return self.axes[i].kernel_shape(self.shapes1[i], self.shapes2[i])


def _describe(x: Any) -> str:
    shapes = [tuple(np.shape(leaf)) for leaf in jax.tree.leaves(x)]
    return str(shapes[0]) if len(shapes) == 1 else str(shapes)


def _out_shapes(
    f: Callable[..., Any], params: Any, x: Any, kwargs: dict[str, Any]
) -> tuple[Any, list[jax.ShapeDtypeStruct]]:
    out = jax.eval_shape(lambda p, x_: f(p, x_, **kwargs), params, x)
    leaves, tree = jax.tree.flatten(out)
    return tree, leaves


def make_problem(
    f: Callable[..., Any],
    x1: Any,
    x2: Any | None,
    params: Any,
    kwargs: dict[str, Any],
    trace_axes: Axes,
    diagonal_axes: Axes,
    vmap: VmapAxes | None,
) -> KernelProblem:
    """Split kwargs, evaluate output shapes and validate the axes against them."""
    kwargs1, kwargs2 = split_kwargs(kwargs, x1, x2)
    tree1, out1 = _out_shapes(f, params, x1, kwargs1)
    if x2 is None:
        tree2, out2 = tree1, out1
    else:
        try:
            tree2, out2 = _out_shapes(f, params, x2, kwargs2)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"f(params, x2) failed for x2 of shape {_describe(x2)} although f(params, x1) "
                f"works for x1 of shape {_describe(x1)}: pass x1 and x2 with the same feature "
                f"shape ({e})."
            ) from e
        if tree1 != tree2:
            raise ValueError(
                f"f(params, x1) returns {tree1} but f(params, x2) returns {tree2}: the outputs "
                "must have the same structure."
            )
    shapes1 = [tuple(o.shape) for o in out1]
    shapes2 = [tuple(o.shape) for o in out2]
    single = len(shapes1) == 1
    axes = [
        resolve_axes(
            trace_axes,
            diagonal_axes,
            s1,
            s2,
            "the output of f(params, x)" if single else f"output {i} of f(params, x)",
        )
        for i, (s1, s2) in enumerate(zip(shapes1, shapes2, strict=True))
    ]
    out_axes = None if vmap is None else out_axes_list(vmap, shapes1, tree1)
    return KernelProblem(
        f=f,
        params=params,
        x1=x1,
        x2=x2,
        kwargs1=kwargs1,
        kwargs2=kwargs2,
        out_tree=tree1,
        shapes1=shapes1,
        shapes2=shapes2,
        dtypes=[np.dtype(o.dtype) for o in out1],
        axes=axes,
        vmap=vmap,
        out_axes=out_axes,
    )
