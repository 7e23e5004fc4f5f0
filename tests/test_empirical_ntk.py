"""empirical_ntk_fn of every implementation against the explicit-Jacobian oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_empirical_oracle import apply_axes, oracle_full_ntk, oracle_ntk

from ntk_dist.empirical import NtkImplementation, empirical_ntk_fn

IMPLS = [0, 1, 2]
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _as_tuple(axes):
    return (axes,) if isinstance(axes, int) else tuple(axes)


def _oracle(f, params, x1, x2, trace_axes=(-1,), diagonal_axes=(), kw1=None, kw2=None):
    kw1 = kw1 or {}
    kw2 = kw1 if kw2 is None else kw2
    return oracle_ntk(
        lambda p: f(p, x1, **kw1), lambda p: f(p, x2, **kw2), params, trace_axes, diagonal_axes
    )


# -- a model with multi-axis outputs ---------------------------------------------------------


def multi_axis_model(p, x):
    """(N, H, 3) -> (N, H, 4, 2); positions along H interact, examples do not."""
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    h = jnp.einsum("nhi,hg->ngi", h, p["mix"])
    return jnp.einsum("nhi,icd->nhcd", h, p["w2"])


MULTI_PARAMS = {
    "w1": _normal(0, (3, 5)),
    "b1": _normal(1, (5,)),
    "mix": _normal(2, (2, 2)),
    "w2": _normal(3, (5, 4, 2)),
}
X1, X2, X2_SAME_N = _normal(4, (3, 2, 3)), _normal(5, (4, 2, 3)), _normal(6, (3, 2, 3))


@functools.cache
def _multi_full(batch_tied):
    """Untraced oracle kernel of multi_axis_model, computed once per x2."""
    x2 = X2_SAME_N if batch_tied else X2
    return oracle_full_ntk(
        lambda p: multi_axis_model(p, X1), lambda p: multi_axis_model(p, x2), MULTI_PARAMS
    )


AXES = [
    ((-1,), ()),
    ((), ()),
    ((1,), ()),
    ((1, 2), ()),
    ((0,), ()),
    ((-1,), (0,)),
    ((), (1,)),
    ((), (-1,)),
    ((-1,), (-1,)),  # overlapping: counts as traced
    ((1,), (1, 0)),  # overlapping on axis 1
    ((-3, -1), (-4,)),  # negative axes
    (-1, 0),  # bare ints
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("trace_axes", "diagonal_axes"), AXES)
def test_axes_match_oracle(impl, trace_axes, diagonal_axes):
    trace, diag = _as_tuple(trace_axes), _as_tuple(diagonal_axes)
    batch_tied = 0 in {a % 4 for a in trace + diag}  # then x1, x2 need equal batch sizes
    x2 = X2_SAME_N if batch_tied else X2
    ntk_fn = empirical_ntk_fn(multi_axis_model, trace_axes, diagonal_axes, implementation=impl)
    got = ntk_fn(X1, x2, MULTI_PARAMS)
    want = apply_axes(_multi_full(batch_tied), 4, trace, diag)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize(
    ("out_shape", "trace_axes", "diagonal_axes", "kernel_shape"),
    [
        ((4, 3), (-1,), (), (4, 5)),
        ((4, 3), (), (), (4, 5, 3, 3)),
        ((4, 2, 3), (-1,), (0,), (4, 2, 2)),
        ((4, 2, 3), (), (1,), (4, 5, 2, 3, 3)),
    ],
)
def test_documented_shapes(out_shape, trace_axes, diagonal_axes, kernel_shape):
    def f(p, x):
        return jnp.tanh(x * p)

    n2 = 4 if 0 in diagonal_axes else 5
    x1, x2 = _normal(40, out_shape), _normal(41, (n2, *out_shape[1:]))
    k = empirical_ntk_fn(f, trace_axes, diagonal_axes)(x1, x2, 0.7)
    assert k.shape == kernel_shape  # all implementations are checked against the oracle above


def test_x2_none_equals_x1():
    want = _oracle(multi_axis_model, MULTI_PARAMS, X1, X1, (), (1,))
    for impl in IMPLS:
        got = empirical_ntk_fn(multi_axis_model, (), (1,), implementation=impl)(
            X1, None, MULTI_PARAMS
        )
        np.testing.assert_allclose(got, want, **TOL)


# -- MLP, CNN, BatchNorm -----------------------------------------------------------------------


def mlp(p, x):
    for w, b in p[:-1]:
        x = jnp.tanh(x @ w + b)
    w, b = p[-1]
    return x @ w + b


MLP_PARAMS = [
    (_normal(10, (5, 7)) / 2, _normal(11, (7,))),
    (_normal(12, (7, 6)) / 2, _normal(13, (6,))),
    (_normal(14, (6, 3)) / 2, _normal(15, (3,))),
]


@pytest.mark.parametrize("impl", IMPLS)
def test_mlp(impl):
    x1, x2 = _normal(50, (6, 5)), _normal(51, (8, 5))
    for trace_axes, vmap_axes in [((-1,), None), ((), 0)]:
        ntk_fn = jax.jit(empirical_ntk_fn(mlp, trace_axes, (), vmap_axes, impl))
        want = _oracle(mlp, MLP_PARAMS, x1, x2, trace_axes)
        np.testing.assert_allclose(ntk_fn(x1, x2, MLP_PARAMS), want, **TOL)


def cnn(p, x, padding):
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(x, p["k1"], (1, 1), padding, dimension_numbers=dn)
    h = jnp.tanh(h + p["b1"])
    return jax.lax.conv_general_dilated(h, p["k2"], (1, 1), padding, dimension_numbers=dn)


CNN_PARAMS = {
    "k1": _normal(20, (2, 2, 2, 3)),
    "b1": _normal(21, (3,)),
    "k2": _normal(22, (2, 2, 3, 2)),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_cnn(impl, padding):
    def f(p, x):
        return cnn(p, x, padding)

    x1, x2 = _normal(60, (2, 4, 4, 2)), _normal(61, (3, 4, 4, 2))
    full = oracle_full_ntk(lambda p: f(p, x1), lambda p: f(p, x2), CNN_PARAMS)
    want = apply_axes(full, 4, (-1,), ())
    assert want.shape == ((2, 3, 4, 4, 4, 4) if padding == "SAME" else (2, 3, 2, 2, 2, 2))
    got = jax.jit(empirical_ntk_fn(f, (-1,), (), None, impl))(x1, x2, CNN_PARAMS)
    np.testing.assert_allclose(got, want, **TOL)
    got = jax.jit(empirical_ntk_fn(f, (), (1, 2), 0, impl))(x1, x2, CNN_PARAMS)
    np.testing.assert_allclose(got, apply_axes(full, 4, (), (1, 2)), **TOL)


def batchnorm_model(p, x):
    """Normalises over the batch, so examples interact: only vmap_axes=None is right."""
    h = x @ p["w1"]
    h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-3)
    return jnp.tanh(h) @ p["w2"]


BN_PARAMS = {"w1": _normal(30, (4, 6)), "w2": _normal(31, (6, 3))}


@pytest.mark.parametrize("impl", IMPLS)
def test_batchnorm_needs_no_vmap(impl):
    x1, x2 = _normal(70, (5, 4)), _normal(71, (5, 4))
    full = oracle_full_ntk(
        lambda p: batchnorm_model(p, x1), lambda p: batchnorm_model(p, x2), BN_PARAMS
    )
    for trace_axes, diagonal_axes in [((), ()), ((-1,), (0,))]:
        want = apply_axes(full, 2, trace_axes, diagonal_axes)
        ntk_fn = jax.jit(empirical_ntk_fn(batchnorm_model, trace_axes, diagonal_axes, None, impl))
        np.testing.assert_allclose(ntk_fn(x1, x2, BN_PARAMS), want, **TOL)
    # vmap_axes=0 wrongly declares examples independent; per-example work then differs
    wrong = jax.jit(empirical_ntk_fn(batchnorm_model, (-1,), (0,), 0, impl))(x1, x2, BN_PARAMS)
    assert not np.allclose(wrong, want)


# -- vmap_axes -------------------------------------------------------------------------------


def _batch_axis1_out(p, x):
    return jnp.moveaxis(multi_axis_model(p, x), 0, 1)


def _batch_axis1_in(p, xt):
    return multi_axis_model(p, jnp.moveaxis(xt, 1, 0))


def _masked(p, x, mask):
    return multi_axis_model(p, x) * mask[:, :, None, None]


MASKS = (_normal(80, (3, 2)), _normal(81, (3, 2)))
VMAP_CASES = {
    # name: (f, input batch axis, vmap_axes, output batch axis, per-call kwargs)
    "int": (multi_axis_model, 0, 0, 0, {}),
    "triple": (multi_axis_model, 0, (0, 0, None), 0, {}),
    "out_axis_1": (_batch_axis1_out, 0, (0, 1, {}), 1, {}),
    "negative_out_axis": (_batch_axis1_out, 0, (0, -3, {}), 1, {}),
    "in_axis_1": (_batch_axis1_in, 1, (1, 0, {}), 0, {}),
    "batched_kwarg": (_masked, 0, (0, 0, {"mask": 0}), 0, {"mask": MASKS}),
}


@functools.cache
def _vmap_case_full(name):
    f, in_axis, _, _, kwargs = VMAP_CASES[name]
    x1, x2 = jnp.moveaxis(X1, 0, in_axis), jnp.moveaxis(X2_SAME_N, 0, in_axis)
    kw1 = {k: v[0] for k, v in kwargs.items()}
    kw2 = {k: v[1] for k, v in kwargs.items()}
    return (
        x1,
        x2,
        oracle_full_ntk(lambda p: f(p, x1, **kw1), lambda p: f(p, x2, **kw2), MULTI_PARAMS),
    )


@pytest.mark.parametrize("impl", [1, 2])
@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_vmap_axes_match_no_vmap(impl, name):
    f, _, vmap_axes, b, kwargs = VMAP_CASES[name]
    x1, x2, full = _vmap_case_full(name)
    for trace_axes, diagonal_axes in [((-1,), ()), ((), (b,)), ((b, -1), ())]:
        want = apply_axes(full, 4, trace_axes, diagonal_axes)
        got = empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, impl)(
            x1, x2, MULTI_PARAMS, **kwargs
        )
        np.testing.assert_allclose(got, want, **TOL)
    plain = empirical_ntk_fn(f, (-1,), (), None, impl)(x1, x2, MULTI_PARAMS, **kwargs)
    vmapped = empirical_ntk_fn(f, (-1,), (), vmap_axes, impl)(x1, x2, MULTI_PARAMS, **kwargs)
    np.testing.assert_allclose(vmapped, plain, **TOL)


# -- pytree outputs ----------------------------------------------------------------------------


def _heads(p, x):
    h = jnp.tanh(x @ p["w"])
    return h @ p["a"], jnp.einsum("ni,ijk->njk", h, p["b"])


HEAD_PARAMS = {"w": _normal(90, (4, 5)), "a": _normal(91, (5, 3)), "b": _normal(92, (5, 2, 2))}
HX1, HX2 = _normal(93, (3, 4)), _normal(94, (2, 4))


def _as_list(p, x):
    return list(_heads(p, x))


def _as_dict(p, x):
    a, b = _heads(p, x)
    return {"a": a, "b": b}


@functools.cache
def _heads_full(i):
    return oracle_full_ntk(lambda p: _heads(p, HX1)[i], lambda p: _heads(p, HX2)[i], HEAD_PARAMS)


@pytest.mark.parametrize("impl", [1, 2])
@pytest.mark.parametrize(
    ("f", "vmap_axes", "trace_axes", "diagonal_axes"),
    [(_heads, None, (-1,), ()), (_as_list, 0, (), (-1,)), (_as_dict, 0, (-1,), ())],
)
def test_pytree_outputs(impl, f, vmap_axes, trace_axes, diagonal_axes):
    got = empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, impl)(HX1, HX2, HEAD_PARAMS)
    assert type(got) is type(f(HEAD_PARAMS, HX1))
    if isinstance(got, dict):
        assert sorted(got) == ["a", "b"]
        got = [got["a"], got["b"]]
    assert len(got) == 2
    for i in range(2):
        full = _heads_full(i)
        want = apply_axes(full, full.ndim // 2, trace_axes, diagonal_axes)
        np.testing.assert_allclose(got[i], want, **TOL)


# -- keyword arguments -----------------------------------------------------------------------


def dropout_model(p, x, rng=None, scale=1.0):
    h = jnp.tanh(x @ p["w1"])
    if rng is not None:
        keep = jax.random.bernoulli(rng, 0.6, h.shape)
        h = jnp.where(keep, h / 0.6, 0.0)
    return scale * (h @ p["w2"])


DROP_PARAMS = {"w1": _normal(100, (3, 8)), "w2": _normal(101, (8, 2))}
DX1, DX2 = _normal(102, (4, 3)), _normal(103, (3, 3))


@pytest.mark.parametrize("impl", [1, 2])
@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key])
def test_rng_is_shared_or_folded(impl, make_key):
    rng = make_key(7)
    ntk_fn = empirical_ntk_fn(dropout_model, implementation=impl)
    shared = _oracle(dropout_model, DROP_PARAMS, DX1, DX1, kw1={"rng": rng})
    np.testing.assert_allclose(ntk_fn(DX1, None, DROP_PARAMS, rng=rng), shared, **TOL)
    equal_copy = DX1 + 0.0
    np.testing.assert_allclose(ntk_fn(DX1, equal_copy, DROP_PARAMS, rng=rng), shared, **TOL)

    kw2 = {"rng": jax.random.fold_in(rng, 1)}
    folded = _oracle(dropout_model, DROP_PARAMS, DX1, DX2, kw1={"rng": rng}, kw2=kw2)
    got = ntk_fn(DX1, DX2, DROP_PARAMS, rng=rng)
    np.testing.assert_allclose(got, folded, **TOL)
    unfolded = _oracle(dropout_model, DROP_PARAMS, DX1, DX2, kw1={"rng": rng})
    assert not np.allclose(got, unfolded)

    k1, k2 = make_key(1), make_key(2)
    pair = _oracle(dropout_model, DROP_PARAMS, DX1, DX2, kw1={"rng": k1}, kw2={"rng": k2})
    np.testing.assert_allclose(ntk_fn(DX1, DX2, DROP_PARAMS, rng=(k1, k2)), pair, **TOL)


def test_rng_equality_under_jit():
    rng = jax.random.PRNGKey(3)
    ntk_fn = jax.jit(empirical_ntk_fn(dropout_model))
    shared = _oracle(dropout_model, DROP_PARAMS, DX1, DX1, kw1={"rng": rng})
    # x1 == x2 is only known at run time here: the key must still be shared
    np.testing.assert_allclose(ntk_fn(DX1, DX1 + 0.0, DROP_PARAMS, rng=rng), shared, **TOL)
    differs = ntk_fn(DX1, DX1.at[0, 0].add(1e-3), DROP_PARAMS, rng=rng)
    assert not np.allclose(differs, shared, rtol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_pair_and_shared_kwargs(impl):
    ntk_fn = empirical_ntk_fn(dropout_model, (), implementation=impl)
    kw1, kw2 = {"scale": 2.0}, {"scale": 3.0}
    split = _oracle(dropout_model, DROP_PARAMS, DX1, DX2, (), kw1=kw1, kw2=kw2)
    np.testing.assert_allclose(ntk_fn(DX1, DX2, DROP_PARAMS, scale=(2.0, 3.0)), split, **TOL)
    both = _oracle(dropout_model, DROP_PARAMS, DX1, DX2, (), kw1={"scale": 2.5})
    np.testing.assert_allclose(ntk_fn(DX1, DX2, DROP_PARAMS, scale=2.5), both, **TOL)


# -- jit -------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_matches_eager(impl):
    ntk_fn = empirical_ntk_fn(multi_axis_model, (-1,), (1,), 0, impl)
    jitted = jax.jit(ntk_fn)
    for x2 in [X2, None]:
        want = _oracle(multi_axis_model, MULTI_PARAMS, X1, X1 if x2 is None else x2, (-1,), (1,))
        np.testing.assert_allclose(ntk_fn(X1, x2, MULTI_PARAMS), want, **TOL)
        np.testing.assert_allclose(jitted(X1, x2, MULTI_PARAMS), want, **TOL)


# -- errors ----------------------------------------------------------------------------------


def _scale(p, x):
    return p * x


def test_mismatched_feature_shapes():
    with pytest.raises(ValueError, match=r"f\(params, x2\) failed.*same feature shape"):
        empirical_ntk_fn(mlp)(_normal(1, (2, 5)), _normal(2, (2, 4)), MLP_PARAMS)
    with pytest.raises(ValueError, match=r"\(2, 3\) for x1 but \(2, 3, 1\).*same feature shape"):
        empirical_ntk_fn(_scale)(_normal(1, (2, 3)), _normal(2, (2, 3, 1)), 2.0)
    with pytest.raises(ValueError, match=r"trace axis 1 .* size 3 for x1 .* but 4 for x2"):
        empirical_ntk_fn(_scale)(_normal(1, (2, 3)), _normal(2, (2, 4)), 2.0)
    with pytest.raises(ValueError, match=r"diagonal axis 0 .* size 2 .* but 5 .*diagonal_axes"):
        empirical_ntk_fn(_scale, (), (0,))(_normal(1, (2, 3)), _normal(2, (5, 3)), 2.0)


@pytest.mark.parametrize(
    ("trace_axes", "diagonal_axes", "message"),
    [
        ((2,), (), r"trace_axes=\(2,\) contains 2"),
        ((), (-3,), r"diagonal_axes=\(-3,\) contains -3"),
    ],
)
def test_axes_out_of_range(trace_axes, diagonal_axes, message):
    ntk_fn = empirical_ntk_fn(_scale, trace_axes, diagonal_axes)
    with pytest.raises(ValueError, match=message + r".*2 axes.*use axes in \[-2, 1\]"):
        ntk_fn(_normal(1, (2, 5)), None, 2.0)


@pytest.mark.parametrize("bad", [4, -1, "jacobian", 1.0, True, None])
def test_bad_implementation(bad):
    with pytest.raises(ValueError, match="implementation=.*NTK_VECTOR_PRODUCTS=2"):
        empirical_ntk_fn(mlp, implementation=bad)


def test_implementation_values():
    assert [(m.name, int(m)) for m in NtkImplementation] == [
        ("AUTO", 0),
        ("JACOBIAN_CONTRACTION", 1),
        ("NTK_VECTOR_PRODUCTS", 2),
        ("STRUCTURED_DERIVATIVES", 3),
    ]


@pytest.mark.parametrize("bad", ["batch", (0, 0), 1.5, (0, 0, [1])])
def test_bad_vmap_axes(bad):
    with pytest.raises(ValueError, match="vmap_axes"):
        empirical_ntk_fn(mlp, vmap_axes=bad)


def test_bad_out_axes():
    ntk_fn = empirical_ntk_fn(_scale, vmap_axes=(0, 2, {}))
    with pytest.raises(ValueError, match=r"out_axes entry 2 .* shape \(2, 3\)"):
        ntk_fn(_normal(1, (2, 3)), None, 2.0)
