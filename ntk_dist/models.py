"""Small reference networks in plain JAX, as ``(f, params)`` pairs.

They serve the demo, the benchmarks and the examples: every function here
returns ``f(params, x)`` and an initial parameter pytree, which is all
ntk_dist needs. Weights use the NTK parameterisation (standard-normal weights,
scaled by ``1/sqrt(fan_in)`` in the forward pass), the usual choice in NTK
studies because the kernel then has a finite wide limit.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
ApplyFn = Callable[..., jax.Array]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "erf": jax.scipy.special.erf,
    "gelu": jax.nn.gelu,
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}"
        ) from None


def mlp(
    key: jax.Array,
    in_dim: int,
    widths: Sequence[int],
    activation: str = "relu",
    w_std: float = 1.0,
    b_std: float = 0.05,
    dtype: Any = jnp.float32,
) -> tuple[ApplyFn, PyTree]:
    """A fully connected network ``in_dim -> widths[0] -> ... -> widths[-1]``.

    Inputs of any shape ``(N, ...)`` are flattened to ``(N, in_dim)``.
    """
    act = _activation(activation)
    params = []
    fan_in = in_dim
    for width in widths:
        key, wkey, bkey = jax.random.split(key, 3)
        params.append(
            {
                "w": jax.random.normal(wkey, (fan_in, width), dtype),
                "b": jax.random.normal(bkey, (width,), dtype),
            }
        )
        fan_in = width

    def f(params: PyTree, x: jax.Array) -> jax.Array:
        h = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(params):
            if i:
                h = act(h)
            h = (w_std / jnp.sqrt(h.shape[-1])) * h @ layer["w"] + b_std * layer["b"]
        return h

    return f, params


def cnn(
    key: jax.Array,
    in_shape: Sequence[int],
    channels: Sequence[int],
    out_dim: int,
    kernel_size: tuple[int, int] = (3, 3),
    padding: str = "VALID",
    activation: str = "relu",
    w_std: float = 1.0,
    b_std: float = 0.05,
    dtype: Any = jnp.float32,
) -> tuple[ApplyFn, PyTree]:
    """Convolutions (NHWC) with ``channels``, then flatten and a dense readout.

    ``in_shape`` is one example's ``(H, W, C)``. Like neural-tangents' ``stax``
    example, the last convolution is followed directly by the readout.
    """
    act = _activation(activation)
    h, w, c = in_shape
    dims = ("NHWC", "HWIO", "NHWC")
    convs = []
    for out_c in channels:
        key, wkey, bkey = jax.random.split(key, 3)
        convs.append(
            {
                "w": jax.random.normal(wkey, (*kernel_size, c, out_c), dtype),
                "b": jax.random.normal(bkey, (out_c,), dtype),
            }
        )
        c = out_c
    probe = jax.eval_shape(
        lambda x: _conv_stack(convs, x, padding, dims, act, w_std, b_std),
        jax.ShapeDtypeStruct((1, h, w, in_shape[2]), dtype),
    )
    flat = probe.shape[1] * probe.shape[2] * probe.shape[3]
    key, wkey, bkey = jax.random.split(key, 3)
    readout = {
        "w": jax.random.normal(wkey, (flat, out_dim), dtype),
        "b": jax.random.normal(bkey, (out_dim,), dtype),
    }

    def f(params: PyTree, x: jax.Array) -> jax.Array:
        y = _conv_stack(params["convs"], x, padding, dims, act, w_std, b_std)
        y = y.reshape(y.shape[0], -1)
        dense = params["readout"]
        return (w_std / jnp.sqrt(y.shape[-1])) * y @ dense["w"] + b_std * dense["b"]

    return f, {"convs": convs, "readout": readout}


def _conv_stack(convs, x, padding, dims, act, w_std, b_std):
    for i, layer in enumerate(convs):
        if i:
            x = act(x)
        fan_in = layer["w"].shape[0] * layer["w"].shape[1] * layer["w"].shape[2]
        x = jax.lax.conv_general_dilated(x, layer["w"], (1, 1), padding, dimension_numbers=dims)
        x = (w_std / jnp.sqrt(fan_in)) * x + b_std * layer["b"]
    return x


def docs_mlp(key: jax.Array, dtype: Any = jnp.float32) -> tuple[ApplyFn, PyTree]:
    """The MLP of neural-tangents' empirical-kernel docs: 3072-1024-1024-10 on 32x32x3."""
    return mlp(key, 32 * 32 * 3, (1024, 1024, 10), dtype=dtype)


def docs_cnn(key: jax.Array, dtype: Any = jnp.float32) -> tuple[ApplyFn, PyTree]:
    """The CNN of those docs: three 3x3 convolutions with 32 channels, then dense 10."""
    return cnn(key, (32, 32, 3), (32, 32, 32), 10, dtype=dtype)


def digits_cnn(seed: int = 0, dtype: Any = jnp.float32) -> tuple[ApplyFn, PyTree]:
    """The demo's CNN for 8x8x1 digits: two 3x3 convolutions (32 channels, SAME), dense 10.

    Takes no required argument, so ``ntk-dist kernel --model ntk_dist.models:digits_cnn``
    can build it.
    """
    return cnn(jax.random.PRNGKey(seed), (8, 8, 1), (32, 32), 10, padding="SAME", dtype=dtype)
