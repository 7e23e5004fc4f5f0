"""Linearised and Taylor-expanded networks in parameter space (neural-tangents' API)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def linearize(f: Callable[..., Any], params: Any) -> Callable[..., Any]:
    """Return ``f_lin(p, *args, **kwargs) = f(params, ...) + J(params) (p - params)``.

    The first-order Taylor expansion of f in its parameters: the network whose training
    the NTK describes exactly.
    """

    def f_lin(p: Any, *args: Any, **kwargs: Any) -> Any:
        dparams = jax.tree.map(jnp.subtract, p, params)
        f0, df = jax.jvp(lambda q: f(q, *args, **kwargs), (params,), (dparams,))
        return jax.tree.map(jnp.add, f0, df)

    return f_lin


def _derivatives(g: Callable[[jax.Array], Any], order: int) -> Callable[[jax.Array], list[Any]]:
    """``t -> [g(t), g'(t), ..., g^(order)(t)]`` by nested forward-mode derivatives."""
    if order == 0:
        return lambda t: [g(t)]
    lower = _derivatives(g, order - 1)

    def all_orders(t: jax.Array) -> list[Any]:
        values, tangents = jax.jvp(lower, (t,), (jnp.ones_like(t),))
        return [*values, tangents[-1]]

    return all_orders


def taylor_expand(f: Callable[..., Any], params: Any, degree: int) -> Callable[..., Any]:
    """Return ``f_taylor(p, *args, **kwargs)``: f's Taylor polynomial in params of ``degree``.

    Around ``params``: ``sum_k D^k f(params)[p - params]^k / k!`` for ``k <= degree``, the
    derivatives taken along the line ``params + t (p - params)`` by nested JVPs. Degree 0 is
    the constant f(params) and degree 1 equals ``linearize``.
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree={degree!r} must be a non-negative int.")

    def f_taylor(p: Any, *args: Any, **kwargs: Any) -> Any:
        dparams = jax.tree.map(jnp.subtract, p, params)
        leaves = jax.tree.leaves(params)
        t0 = jnp.zeros((), jnp.result_type(*leaves) if leaves else float)

        def along_line(t: jax.Array) -> Any:
            def shift(p0: Any, d: Any) -> jax.Array:
                return (p0 + t * d).astype(jnp.result_type(p0))

            return f(jax.tree.map(shift, params, dparams), *args, **kwargs)

        terms = _derivatives(along_line, degree)(t0)
        return jax.tree.map(
            lambda *ds: sum(d / math.factorial(k) for k, d in enumerate(ds)), *terms
        )

    return f_taylor
