"""A zoo of small float64 JAX models for the empirical-kernel acceptance tests.

Plain JAX, independent of ``ntk_dist.models``: an MLP (tanh, relu and erf layers),
convolutions (VALID, SAME, strided, dilated; NHWC and NCHW) with average pooling, a residual
block with layer norm, an embedding, self-attention, keyword arguments and pytree outputs.
Features share a model where they compose, which keeps the number of compilations down.
Each ``ZooCase`` carries its kernel request (trace/diagonal/vmap axes), two input batches
and a tile block shape.

Parameters and inputs are numpy arrays, so importing this module does not depend on JAX's
x64 setting (the tests turn it on before any array reaches JAX).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "OIHW", "NCHW")
# One width for inputs and hidden layers, so models share the op-by-op executables that
# unjitted kernels compile per shape.
WIDTH = 4


@dataclasses.dataclass(frozen=True)
class ZooCase:
    """One model and kernel request: ``ntk_fn(x1, x2, params, **kwargs)`` and its tiling.

    ``x2`` has as many examples as ``x1`` when the batch axis is a diagonal axis.
    ``block`` is the tile shape for ``compute_kernel`` (ragged against the batches).
    """

    name: str
    f: Callable[..., Any]
    params: Any
    x1: np.ndarray
    x2: np.ndarray
    trace_axes: tuple[int, ...]
    diagonal_axes: tuple[int, ...]
    vmap_axes: int | None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    block: tuple[int, int] = (2, 3)

    @property
    def n_outputs(self) -> int:
        """How many arrays f returns (more than one: a kernel per output leaf)."""
        return len(jax.tree.leaves(jax.eval_shape(self.apply, self.x1[:1])))

    def apply(self, x: Any, params: Any = None) -> Any:
        """f(params, x, **kwargs) with this case's keyword arguments."""
        return self.f(self.params if params is None else params, x, **self.kwargs)


def _normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return rng.normal(size=shape) * scale


def _dense(rng: np.random.Generator, d_in: int, d_out: int) -> dict[str, np.ndarray]:
    return {"w": _normal(rng, d_in, d_out, scale=d_in**-0.5), "b": _normal(rng, d_out, scale=0.1)}


def _apply_dense(p: dict, x: Any) -> Any:
    return x @ p["w"] + p["b"]


def mlp(params: list, x: Any) -> Any:
    """Hidden layers with tanh, relu and erf in turn; params a list of dense layers."""
    h = x
    for layer, activation in zip(params[:-1], (jnp.tanh, jax.nn.relu, erf), strict=True):
        h = activation(_apply_dense(layer, h))
    return _apply_dense(params[-1], h)


def conv(p: dict, x: Any, dn: tuple[str, str, str], **options: Any) -> Any:
    """``lax.conv_general_dilated`` plus a per-channel bias in the layout of ``dn``."""
    out = jax.lax.conv_general_dilated(x, p["k"], dimension_numbers=dn, **options)
    channel = dn[2].index("C")
    return out + jnp.expand_dims(p["b"], tuple(range(1, 4 - channel)))


def cnn_nhwc(p: dict, x: Any) -> Any:
    """(N, 8, 8, 2) -> (N, 2, 2, 2), NHWC: a stride-2 SAME convolution, 2x2 average
    pooling (stride 2) and a VALID 1x1 convolution; the output is a spatial map."""
    h = jnp.tanh(conv(p["strided"], x, NHWC, window_strides=(2, 2), padding="SAME"))
    h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    return conv(p["valid"], h, NHWC, window_strides=(1, 1), padding="VALID")


def cnn_nchw(p: dict, x: Any) -> Any:
    """(N, 2, 6, 6) -> (N, 2), NCHW: a SAME convolution, a VALID 3x3 one with dilation 2
    (6 -> 2 pixels), spatial mean and a dense readout."""
    h = jax.nn.relu(conv(p["same"], x, NCHW, window_strides=(1, 1), padding="SAME"))
    h = conv(p["dilated"], h, NCHW, window_strides=(1, 1), padding="VALID", rhs_dilation=(2, 2))
    return _apply_dense(p["out"], jnp.tanh(h).mean(axis=(2, 3)))


def _layer_norm(p: dict, h: Any) -> Any:
    """Normalise the last axis, then the learnt ``scale`` and ``shift``."""
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["shift"]


def residual_layer_norm(p: dict, x: Any) -> Any:
    """(N, 4) -> (N, 3): a pre-norm residual block h + W2 tanh(W1 LN(h)), LN, readout."""
    h = _apply_dense(p["in"], x)
    inner = jnp.tanh(_apply_dense(p["block"][0], _layer_norm(p["norm"][0], h)))
    h = h + _apply_dense(p["block"][1], inner)
    return _apply_dense(p["out"], _layer_norm(p["norm"][1], h))


def embedding(p: dict, tokens: Any) -> Any:
    """Integer tokens (N, T) -> (N, T, 3): table lookup, tanh projection per position."""
    return _apply_dense(p["out"], jnp.tanh(jnp.take(p["table"], tokens, axis=0)))


def attention(p: dict, x: Any) -> Any:
    """Tokens (N, T, d) -> (N, T, 3): one softmax self-attention head and a projection."""
    q, k, v = (x @ p[name] for name in ("q", "k", "v"))
    scores = jnp.einsum("ntd,nsd->nts", q, k) / np.sqrt(q.shape[-1])
    mixed = jnp.einsum("nts,nsd->ntd", jax.nn.softmax(scores, axis=-1), v)
    return mixed @ p["o"]


def scaled_masked(p: list, x: Any, *, scale: float = 1.0, mask: Any = None) -> Any:
    """An MLP taking keyword arguments: a feature mask on the input and an output scale."""
    if mask is not None:
        x = x * mask
    return scale * mlp(p, x)


def two_heads(p: dict, x: Any) -> dict[str, Any]:
    """(N, 4) -> {"logits": (N, 3), "pairs": (N, 2, 2)}: a shared trunk and two heads."""
    h = jnp.tanh(_apply_dense(p["trunk"], x))
    pairs = jnp.einsum("ni,ijk->njk", h, p["pairs"])
    return {"logits": _apply_dense(p["logits"], h), "pairs": pairs}


def cases() -> list[ZooCase]:
    """Every zoo model with its kernel request; deterministic (fixed seeds)."""
    rng = np.random.default_rng(2026)
    n1, n2 = 5, 4

    def batch(*shape: int, n: int = n1) -> np.ndarray:
        return _normal(rng, n, *shape)

    def conv_params(*shape: int, channels: int) -> dict[str, np.ndarray]:
        fan_in = int(np.prod(shape)) // channels
        return {"k": _normal(rng, *shape, scale=fan_in**-0.5), "b": _normal(rng, channels)}

    def mlp_params(d_in: int, d_out: int) -> list:
        return [_dense(rng, d_in, WIDTH) for _ in range(3)] + [_dense(rng, WIDTH, d_out)]

    tokens = rng.integers(0, 7, size=(n1 + n2, 4))

    def norm() -> dict[str, np.ndarray]:
        return {
            "scale": 1 + _normal(rng, WIDTH, scale=0.2),
            "shift": _normal(rng, WIDTH, scale=0.2),
        }

    return [
        ZooCase("mlp", mlp, mlp_params(WIDTH, 3), batch(WIDTH), batch(WIDTH, n=n2), (-1,), (), 0),
        ZooCase(
            "cnn_nhwc",
            cnn_nhwc,
            {
                "strided": conv_params(3, 3, 2, 3, channels=3),
                "valid": conv_params(1, 1, 3, 2, channels=2),
            },
            batch(8, 8, 2),
            batch(8, 8, 2, n=n2),
            (-1,),
            (1, 2),
            0,
        ),
        ZooCase(
            "cnn_nchw",
            cnn_nchw,
            {
                "same": conv_params(3, 2, 3, 3, channels=3),
                "dilated": conv_params(2, 3, 3, 3, channels=2),
                "out": _dense(rng, 2, 2),
            },
            batch(2, 6, 6),
            batch(2, 6, 6),  # diagonal over the batch: as many x2 as x1
            (-1,),
            (0,),
            None,
        ),
        ZooCase(
            "residual_layer_norm",
            residual_layer_norm,
            {
                "in": _dense(rng, WIDTH, WIDTH),
                "norm": [norm(), norm()],
                "block": [_dense(rng, WIDTH, WIDTH), _dense(rng, WIDTH, WIDTH)],
                "out": _dense(rng, WIDTH, 3),
            },
            batch(WIDTH),
            batch(WIDTH, n=n2),
            (),
            (),
            None,
            block=(3, 3),
        ),
        ZooCase(
            "embedding",
            embedding,
            {"table": _normal(rng, 7, WIDTH), "out": _dense(rng, WIDTH, 3)},
            tokens[:n1],
            tokens[n1:],
            (-1,),
            (1,),
            0,
        ),
        ZooCase(
            "attention",
            attention,
            {name: _normal(rng, WIDTH, WIDTH, scale=0.5) for name in ("q", "k", "v")}
            | {"o": _normal(rng, WIDTH, 3, scale=0.5)},
            batch(3, WIDTH),
            batch(3, WIDTH, n=n2),
            (-1,),
            (),
            0,
            block=(4, 3),
        ),
        ZooCase(
            "scaled_masked_kwargs",
            scaled_masked,
            mlp_params(WIDTH, 3),
            batch(WIDTH),
            batch(WIDTH, n=n2),
            (),
            (-1,),
            None,
            kwargs={"scale": 0.7, "mask": np.array([1.0, 0.0, 1.0, 0.5])},
        ),
        ZooCase(
            "two_heads_dict",
            two_heads,
            {
                "trunk": _dense(rng, WIDTH, WIDTH),
                "logits": _dense(rng, WIDTH, 3),
                "pairs": _normal(rng, WIDTH, 2, 2, scale=0.4),
            },
            batch(WIDTH),
            batch(WIDTH, n=n2),
            (-1,),
            (),
            0,
        ),
    ]
