"""``vmap_axes``: declaring that f treats examples independently, to vmap per example.

``vmap_axes=None`` assumes nothing (right for BatchNorm-like f whose examples interact).
An int ``a`` says x, f(x) are batched along axis ``a`` and no keyword argument is; a triple
``(in_axes, out_axes, kwargs_axes)`` gives them separately. Per-example functions see one
example with a batch axis of size 1, so f is always called on batch-shaped inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class VmapAxes:
    """Batch axes of x (pytree prefix of ints/None), of f(x) and of named kwargs."""

    in_axes: Any
    out_axes: Any
    kwargs_axes: dict[str, int | None]


def canonicalize_vmap_axes(vmap_axes: Any) -> VmapAxes | None:
    """Parse neural-tangents' ``vmap_axes`` argument, raising a ValueError if malformed."""
    if vmap_axes is None:
        return None
    if isinstance(vmap_axes, int) and not isinstance(vmap_axes, bool):
        return VmapAxes(vmap_axes, vmap_axes, {})
    if isinstance(vmap_axes, tuple | list) and len(vmap_axes) == 3:
        in_axes, out_axes, kwargs_axes = vmap_axes
        kwargs_axes = {} if kwargs_axes is None else kwargs_axes
        if not isinstance(kwargs_axes, dict):
            raise ValueError(
                f"vmap_axes[2]={kwargs_axes!r} must be a dict from keyword name to batch "
                "axis (or None for unbatched keywords)."
            )
        return VmapAxes(in_axes, out_axes, dict(kwargs_axes))
    raise ValueError(
        f"vmap_axes={vmap_axes!r} is not None, an int, or a triple "
        "(in_axes, out_axes, kwargs_axes); pass one of those."
    )


def out_axes_list(vmap: VmapAxes, out_shapes: list[tuple[int, ...]], out_tree: Any) -> list[int]:
    """Non-negative batch axis of each output leaf of f, validated against its shape."""
    if isinstance(vmap.out_axes, int):
        axes = [vmap.out_axes] * len(out_shapes)
    else:
        try:
            axes = out_tree.flatten_up_to(vmap.out_axes)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"vmap_axes out_axes={vmap.out_axes!r} must be an int or match the structure "
                f"of f(params, x), {out_tree}."
            ) from e
    result = []
    for axis, shape in zip(axes, out_shapes, strict=True):
        if (
            isinstance(axis, bool)
            or not isinstance(axis, int)
            or not -len(shape) <= axis < len(shape)
        ):
            raise ValueError(
                f"vmap_axes out_axes entry {axis!r} is not a valid axis of an output of shape "
                f"{shape}; use an int in [{-len(shape)}, {len(shape) - 1}]."
            )
        result.append(axis % len(shape))
    return result


def split_batched_kwargs(
    vmap: VmapAxes, kwargs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    """Split kwargs into (batched values, their axes, unbatched values).

    Names in ``kwargs_axes`` that this call does not pass are ignored.
    """
    batched = {k: v for k, v in kwargs.items() if vmap.kwargs_axes.get(k) is not None}
    axes = {k: vmap.kwargs_axes[k] for k in batched}
    static = {k: v for k, v in kwargs.items() if k not in batched}
    return batched, axes, static


def _is_none(x: Any) -> bool:
    return x is None


def _expand(tree: Any, axes: Any) -> Any:
    """Re-insert a size-1 batch axis into a per-example pytree; ``axes`` is a prefix of it."""

    def expand_subtree(axis: int | None, sub: Any) -> Any:
        if axis is None:
            return sub
        return jax.tree.map(lambda x: jnp.expand_dims(x, axis), sub)

    return jax.tree.map(expand_subtree, axes, tree, is_leaf=_is_none)


def per_example_fn(
    f: Callable[..., Any],
    vmap: VmapAxes,
    batched_axes: dict[str, int],
    static_kwargs: dict[str, Any],
    out_axes: list[int],
) -> Callable[[Any, Any, dict[str, Any]], list[jax.Array]]:
    """``g(params, x_one, batched_kwargs_one)``: f on one example, batch axes removed.

    Returns the flat list of output leaves so callers can pick single outputs.
    """

    def g(params: Any, x_one: Any, kwargs_one: dict[str, Any]) -> list[jax.Array]:
        kwargs = dict(static_kwargs)
        for k, v in kwargs_one.items():
            kwargs[k] = _expand(v, batched_axes[k])
        out = jax.tree.leaves(f(params, _expand(x_one, vmap.in_axes), **kwargs))
        return [jnp.squeeze(o, a) for o, a in zip(out, out_axes, strict=True)]

    return g
