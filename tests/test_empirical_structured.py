"""Structured derivatives (implementation 3), rule by rule, against the explicit-Jacobian oracle.

Every kernel is compared with the oracle of tests/test_empirical_oracle.py (full
``jax.jacrev`` Jacobians contracted by numpy, then ``apply_axes``) to 1e-10 relative.
Shapes are chosen so that the route under test (Gram or Jacobian) is the cheaper one, and
the tests check that it was taken, so each rule is really exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
from test_empirical_oracle import apply_axes, oracle_full_ntk

from ntk_dist import LocalExecutor, compute_kernel
from ntk_dist.empirical import NtkImplementation, empirical_ntk_fn

STRUCTURED = NtkImplementation.STRUCTURED_DERIVATIVES
NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "OIHW", "NCHW")


def _normal(seed, *shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale)


def _leaf_names(params):
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    return [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in paths]


def _gram_leaves(ntk_fn, x, params, **kwargs):
    """Names of the parameter leaves that take the Gram route on the block x."""
    names = _leaf_names(params)
    features = jax.eval_shape(lambda x_, p: ntk_fn.features(x_, p, **kwargs), x, params)
    return {names[i] for i in features.inputs}


def _assert_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()


def _full_oracle(f, params, x1, x2, **kwargs):
    """The untraced oracle kernel (x1's output axes, then x2's); x2=None means x1."""
    other = x1 if x2 is None else x2
    # jit: one compilation instead of one per op, which dominates at these sizes
    f1, f2 = (jax.jit(lambda p, x=x: f(p, x, **kwargs)) for x in (x1, other))
    return oracle_full_ntk(f1, f2, params)


def _check(f, params, x1, x2, trace=(-1,), diag=(), gram=None, full=None, vmap_axes=0):
    """Implementation 3 (under jit) equals the oracle, whose untraced kernel ``full`` may be
    given; ``gram``: the leaves expected on the Gram route. Returns (ntk_fn, oracle)."""
    ntk_fn = empirical_ntk_fn(f, trace, diag, vmap_axes, implementation=STRUCTURED)
    full = _full_oracle(f, params, x1, x2) if full is None else full
    want = apply_axes(full, full.ndim // 2, trace, diag)
    _assert_close(jax.jit(ntk_fn)(x1, x2, params), want)
    if gram is not None:
        assert _gram_leaves(ntk_fn, x1, params) == gram
    return ntk_fn, want


# -- dense layers ------------------------------------------------------------------------------


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


MLP = {"w1": _normal(0, 6, 8), "b1": _normal(1, 8), "w2": _normal(2, 8, 3)}


def test_dense_every_axes_rule():
    x1 = _normal(3, 4, 6)
    others = {"x2": _normal(4, 3, 6), "x3": _normal(5, 4, 6), "none": None}
    full = {name: _full_oracle(mlp, MLP, x1, x) for name, x in others.items()}
    for trace, diag, name in [
        ((-1,), (), "x2"),
        ((), (), "x2"),
        ((), (-1,), "none"),
        ((0,), (1,), "x3"),  # the batch axis traced: pairs of equal examples only
        ((), (0, 1), "x3"),
    ]:
        ntk_fn, want = _check(mlp, MLP, x1, others[name], trace, diag, {"w1", "w2"}, full[name])
    _assert_close(ntk_fn(x1, others["x3"], MLP), want)  # eagerly, not only under jit


def tokens_model(p, x):
    """(N, T, 6) -> (N, T, 2): per-token dense layers (W on either side of dot_general),
    a weight with two feature axes and mixing across tokens."""
    h = jnp.tanh(x @ p["w_in"])  # W as rhs, positions (1, T)
    h = jnp.einsum("ntd,dgh->ntgh", h, p["w_pair"]).reshape(*h.shape[:2], -1)
    h = jnp.tanh(h + jnp.mean(h, axis=1, keepdims=True))
    y = jax.lax.dot_general(p["w_out"], h, (((1,), (2,)), ((), ())))  # W as lhs: (2, N, T)
    return jnp.transpose(y, (1, 2, 0))


TOKENS = {"w_in": _normal(6, 6, 8), "w_pair": _normal(7, 8, 2, 5), "w_out": _normal(8, 2, 10)}


def test_dense_with_positions():
    x1, x2, x3 = _normal(9, 3, 2, 6), _normal(10, 2, 2, 6), _normal(11, 3, 2, 6)
    full12, full13 = (_full_oracle(tokens_model, TOKENS, x1, x) for x in (x2, x3))
    gram = {"w_in", "w_pair", "w_out"}
    for trace, diag, other, full in [
        ((-1,), (), x2, full12),
        ((), (), x2, full12),
        ((-1,), (1,), x2, full12),  # tokens kept once
        ((1,), (0,), x3, full13),
    ]:
        _check(tokens_model, TOKENS, x1, other, trace, diag, gram=gram, full=full)


# -- convolutions ------------------------------------------------------------------------------


def conv_model(dn, **options):
    """A convolution (2 x 2 output positions) averaged over space, then a dense readout."""

    def f(p, x):
        h = jax.lax.conv_general_dilated(x, p["k"], dimension_numbers=dn, **options)
        spatial = tuple(i for i, c in enumerate(dn[2]) if c not in "NC")
        return jnp.tanh(h).mean(axis=spatial) @ p["out"]

    return f


def _conv_params(seed, shape):
    return {"k": _normal(seed, *shape, scale=0.2), "out": _normal(seed + 1, 32, 2)}


def test_convolutions_padding_strides_dilations_layouts():
    for seed, (dn, kernel, image, options) in enumerate(
        [
            (NHWC, (2, 2, 16, 32), (3, 3, 16), {"window_strides": (1, 1), "padding": "VALID"}),
            (NCHW, (32, 16, 2, 2), (16, 4, 4), {"window_strides": (2, 2), "padding": "SAME"}),
            (
                NHWC,
                (2, 2, 16, 32),
                (2, 4, 16),
                {"window_strides": (1, 1), "padding": ((1, 0), (0, 0)), "rhs_dilation": (2, 2)},
            ),
            (  # transposed convolution (input dilation)
                NCHW,
                (32, 16, 2, 2),
                (16, 2, 2),
                {"window_strides": (1, 1), "padding": ((0, 0), (0, 0)), "lhs_dilation": (2, 2)},
            ),
        ]
    ):
        x1, x2 = _normal(20 + seed, 3, *image), _normal(30 + seed, 2, *image)
        _check(conv_model(dn, **options), _conv_params(seed, kernel), x1, x2, gram={"k", "out"})


def test_large_convolution_takes_the_jacobian_route():
    # 4 x 4 = 16 output positions, 2 traced outputs: per pair of examples the Gram route
    # costs S^2 (C + 2 F) = 256 (64 + 64), more than C F 2 = 64 * 32 * 2 for the Jacobians
    f = conv_model(NHWC, window_strides=(1, 1), padding="SAME")
    params = _conv_params(40, (2, 2, 16, 32))
    _check(f, params, _normal(41, 2, 4, 4, 16), _normal(42, 3, 4, 4, 16), gram={"out"})


def test_blocks_taking_different_routes():
    """x1's examples are small enough for the Gram route, x2's are not: the Gram side's
    Jacobian is materialised from X and G (this checks W's layout, also for OHWI kernels)."""
    dn = ("NHWC", "OHWI", "NHWC")
    f = conv_model(dn, window_strides=(1, 1), padding="VALID")
    params = _conv_params(50, (32, 2, 2, 16))
    x1, x2 = _normal(51, 3, 3, 3, 16), _normal(52, 2, 5, 5, 16)
    ntk_fn, _ = _check(f, params, x1, x2, gram={"k", "out"})
    assert _gram_leaves(ntk_fn, x2, params) == {"out"}

    def pooled_tokens(p, x):  # (N, T, 8) -> (N, 2)
        return jnp.tanh(x @ p["w"]).mean(axis=1) @ p["out"]

    params = {"w": _normal(53, 8, 8), "out": _normal(54, 8, 2)}
    x1, x2 = _normal(55, 3, 1, 8), _normal(56, 2, 4, 8)
    ntk_fn, _ = _check(pooled_tokens, params, x1, x2, gram={"w", "out"})
    assert _gram_leaves(ntk_fn, x2, params) == {"out"}


# -- leaves without structure ------------------------------------------------------------------


def fallback_model(p, tokens):
    """Integer tokens (N, 3) -> (N, 2) through leaves no rule covers, and one a rule does."""
    h = jnp.take(p["embed"], tokens, axis=0)  # gather
    mean = h.mean(-1, keepdims=True)
    h = (h - mean) / jnp.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    h = h * p["scale"] + p["shift"]  # layer-norm scale and shift
    h = jnp.tanh(h @ p["tied"]) @ p["tied"].T  # a leaf used twice
    h = h @ jnp.sin(p["warped"])  # a parameter through an unknown primitive
    h = jax.checkpoint(lambda a, w: jnp.tanh(a @ w))(h, p["remat"])  # inside remat
    pooled = h.mean(axis=1)
    return jax.jit(lambda a, w: a @ w)(pooled, p["in_jit"])  # nested jit is inlined: structured


FALLBACK = {
    "embed": _normal(60, 7, 6),
    "scale": 1 + _normal(61, 6, scale=0.2),
    "shift": _normal(62, 6, scale=0.2),
    "tied": _normal(63, 6, 6, scale=0.4),
    "warped": _normal(64, 6, 6, scale=0.4),
    "remat": _normal(65, 6, 6, scale=0.4),
    "in_jit": _normal(66, 6, 2, scale=0.4),
}


def test_leaves_without_structure_fall_back_to_jacobians():
    rng = np.random.default_rng(67)
    t1, t2 = rng.integers(0, 7, size=(3, 3)), rng.integers(0, 7, size=(2, 3))
    _check(fallback_model, FALLBACK, t1, t2, gram={"in_jit"})


# -- the API: jit, vmap_axes, kwargs, pytree outputs, tiles --------------------------------------


def keyword_model(p, x, mask, scale=1.0):
    """x (3, N) batched along axis 1 with a per-example mask; a dict of outputs, one of
    them with the batch along axis 1."""
    h = jnp.tanh((x * mask).T @ p["w1"])
    return {"wide": scale * (h @ p["w2"]).T, "sum": jnp.sum(h, axis=-1) * p["gain"]}


KEYWORD = {"w1": _normal(70, 3, 8), "w2": _normal(71, 8, 3), "gain": jnp.asarray(1.3)}


def test_vmap_axes_kwargs_and_pytree_outputs():
    x1, x2 = _normal(72, 3, 4), _normal(73, 3, 3)
    m1, m2 = _normal(74, 3, 4), _normal(75, 3, 3)
    vmap_axes = (1, {"wide": 1, "sum": 0}, {"mask": 1})
    ntk_fn = empirical_ntk_fn(keyword_model, (), (), vmap_axes, implementation=STRUCTURED)

    def side(x, mask, key):
        return jax.jit(lambda p: keyword_model(p, x, mask, scale=0.5)[key])

    want = {}
    for key in ("wide", "sum"):
        full = oracle_full_ntk(side(x1, m1, key), side(x2, m2, key), KEYWORD)
        want[key] = apply_axes(full, full.ndim // 2, (), ())
    got = jax.jit(ntk_fn, static_argnames="scale")(x1, x2, KEYWORD, mask=(m1, m2), scale=0.5)
    assert set(got) == {"wide", "sum"}
    for key in got:
        _assert_close(got[key], want[key])
    assert _gram_leaves(ntk_fn, x1, KEYWORD, mask=m1, scale=0.5) == {"w1", "w2"}
    # vmap_axes=None: examples may interact, so every leaf takes the Jacobian route
    _check(mlp, MLP, _normal(76, 4, 6), _normal(77, 2, 6), (), (), vmap_axes=None)


def test_tiles_reuse_structured_features():
    x1, x2 = _normal(80, 7, 6), _normal(81, 5, 6)
    ntk_fn, want = _check(mlp, MLP, x1, x2, (-1,), (), gram={"w1", "w2"})
    executor = LocalExecutor()
    out = compute_kernel(ntk_fn, x1, x2, MLP, block_size=(3, 2), executor=executor, progress=False)
    assert executor.reuse.mode == "panels"
    assert executor.reuse.rows == 1.0 and executor.reuse.cols == 1.0
    _assert_close(out, want)
