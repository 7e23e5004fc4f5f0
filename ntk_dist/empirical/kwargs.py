"""Splitting per-call keyword arguments between the f(x1) and f(x2) calls.

Follows neural-tangents' convention so that stochastic networks (dropout) give the same
kernels: ``rng`` is shared when x2 is None or equal to x1 and otherwise folded for x2, and a
2-tuple ``(v1, v2)`` sends ``v1`` to the x1 call and ``v2`` to the x2 call.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _equal(x1: Any, x2: Any) -> bool | jax.Array:
    """Whether pytrees x1 and x2 hold equal arrays: a Python bool when known statically."""
    if x1 is x2:
        return True
    leaves1, tree1 = jax.tree.flatten(x1)
    leaves2, tree2 = jax.tree.flatten(x2)
    if tree1 != tree2 or any(
        jnp.shape(a) != jnp.shape(b) for a, b in zip(leaves1, leaves2, strict=True)
    ):
        return False
    return jnp.all(
        jnp.array([jnp.array_equal(a, b) for a, b in zip(leaves1, leaves2, strict=True)])
    )


def _second_key(rng: jax.Array, same: bool | jax.Array) -> jax.Array:
    """``rng`` if ``same`` else ``fold_in(rng, 1)``; ``same`` may be traced (under jit)."""
    if same is True:
        return rng
    folded = jax.random.fold_in(rng, 1)
    if same is False:
        return folded
    return jax.lax.select(same, rng, folded)


def split_kwargs(
    kwargs: dict[str, Any], x1: Any, x2: Any | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the keyword arguments of the f(x1) call and of the f(x2) call.

    When ``x2`` is None there is only one call; its arguments are returned twice.
    """
    kwargs1: dict[str, Any] = {}
    kwargs2: dict[str, Any] = {}
    for name, value in kwargs.items():
        is_pair = isinstance(value, tuple) and len(value) == 2
        if is_pair:
            kwargs1[name], kwargs2[name] = value
        elif name == "rng" and x2 is not None:
            kwargs1[name] = value
            kwargs2[name] = _second_key(value, _equal(x1, x2))
        else:
            kwargs1[name] = kwargs2[name] = value
    if x2 is None:
        return kwargs1, kwargs1
    return kwargs1, kwargs2
