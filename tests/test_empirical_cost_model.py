"""AUTO's first stage: the cost model's parts and the choices it makes on its own."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_empirical_oracle import oracle_ntk

from ntk_dist.empirical import (
    CostEstimate,
    NtkImplementation,
    autotune,
    choose_implementation,
    cost_model,
    empirical_ntk_fn,
    estimate_costs,
    kernel_fns,
)
from ntk_dist.empirical.batching import canonicalize_vmap_axes
from ntk_dist.empirical.problem import make_problem

JC, NVP = NtkImplementation.JACOBIAN_CONTRACTION, NtkImplementation.NTK_VECTOR_PRODUCTS


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


MLP_PARAMS = {"w1": _normal(0, (6, 16)), "w2": _normal(1, (16, 2))}
X1, X2 = _normal(2, (4, 6)), _normal(3, (5, 6))


def wide_linear(p, x):
    """Many untraced outputs from a cheap forward pass: NTK-vector products are cheaper."""
    return x @ p


WIDE_PARAMS = _normal(4, (10, 50))


@pytest.mark.parametrize(
    ("analysis", "flops"),
    [
        ({"flops": 12.0, "bytes accessed": 3.0}, 12.0),
        ([{"flops": 7.0}], 7.0),
        ((), None),
        (None, None),
        ({"flops": 0.0}, None),
        ({"bytes accessed": 3.0}, None),
    ],
)
def test_flops_from_cost_analysis(analysis, flops):
    assert cost_model.flops_from_cost_analysis(analysis) == flops


def test_primal_flops_with_and_without_xla(monkeypatch):
    x = _normal(5, (8, 6))
    measured = cost_model.primal_flops(mlp, MLP_PARAMS, x, {})
    assert measured >= 2 * 8 * (6 * 16 + 16 * 2)  # at least the two matmuls
    monkeypatch.setattr(cost_model, "flops_from_cost_analysis", lambda analysis: None)
    assert cost_model.primal_flops(mlp, MLP_PARAMS, x, {}) == 2.0 * (6 * 16 + 16 * 2) * 8


def test_rank():
    assert cost_model.rank({JC: (10.0, 5.0), NVP: (20.0, 5.0)}, 100.0) == [JC, NVP]
    assert cost_model.rank({JC: (30.0, 5.0), NVP: (20.0, 5.0)}, 100.0) == [NVP, JC]
    assert cost_model.rank({JC: (10.0, 500.0), NVP: (20.0, 5.0)}, 100.0) == [NVP, JC]  # JC too big
    assert cost_model.rank({JC: (10.0, 500.0), NVP: (20.0, 300.0)}, 100.0) == [NVP, JC]  # by bytes
    assert cost_model.rank({JC: (10.0, 5.0), NVP: (10.0, 5.0)}, 100.0) == [JC, NVP]  # tie


@pytest.fixture(autouse=True)
def _cost_model_only(tmp_path, monkeypatch):
    """AUTO decided by the cost model alone (deterministic), cached in a fresh folder."""
    monkeypatch.setenv("NTK_DIST_AUTOTUNE", "model")
    monkeypatch.setenv("NTK_DIST_CACHE", str(tmp_path / "cache"))
    autotune.forget()
    yield
    autotune.forget()


@pytest.fixture
def formulas_only(monkeypatch):
    """AUTO chooses between the two implementations the cost model has formulas for."""
    for impl in list(kernel_fns._IMPLEMENTATIONS):
        if impl not in (JC, NVP):
            monkeypatch.delitem(kernel_fns._IMPLEMENTATIONS, impl)


def test_choices_follow_the_model(monkeypatch, formulas_only):
    traced = estimate_costs(mlp, X1, X2, MLP_PARAMS, (-1,), (), 0)
    assert isinstance(traced, CostEstimate) and traced.choice == JC
    assert traced.flops[JC] < traced.flops[NVP] and traced.ranking == [JC, NVP]
    assert choose_implementation(mlp, X1, X2, MLP_PARAMS, (-1,), (), 0) == JC

    wide = estimate_costs(wide_linear, _normal(6, (4, 10)), None, WIDE_PARAMS, ())
    assert wide.choice == NVP
    assert wide.flops[NVP] < wide.flops[JC]

    budget = (traced.peak_bytes[JC] + traced.peak_bytes[NVP]) / 2
    assert traced.peak_bytes[NVP] < budget < traced.peak_bytes[JC]
    monkeypatch.setattr(cost_model, "memory_budget_bytes", lambda: int(budget))
    monkeypatch.setattr(autotune, "memory_budget_bytes", lambda: int(budget))
    assert not estimate_costs(mlp, X1, X2, MLP_PARAMS, (-1,), (), 0).fits(JC)
    assert choose_implementation(mlp, X1, X2, MLP_PARAMS, (-1,), (), 0) == NVP


def test_unmodelled_implementations_are_ranked_by_xla_flops():
    problem = make_problem(mlp, X1, X2, MLP_PARAMS, {}, (-1,), (), canonicalize_vmap_axes(0))
    # an implementation without a formula: the one of JC, counted by XLA instead
    other = empirical_ntk_fn(mlp, (-1,), (), 0, JC)
    estimate = cost_model.estimate_problem(problem, {JC: other, 7: other})
    assert set(estimate.flops) == {JC, NVP, 7}
    assert estimate.peak_bytes[7] == 0.0  # not modelled
    # XLA counts at least the contraction 2 * P * N1 * N2 * O of the explicit count
    n_params = 6 * 16 + 16 * 2
    assert estimate.flops[7] >= 2 * n_params * 4 * 5 * 2


def _spy_implementations(monkeypatch):
    used = []
    for impl, fn in list(kernel_fns._IMPLEMENTATIONS.items()):

        def spy(problem, impl=impl, fn=fn):
            used.append(impl)
            return fn(problem)

        monkeypatch.setitem(kernel_fns._IMPLEMENTATIONS, impl, spy)
    return used


def test_auto_runs_the_choice_once_per_shapes(monkeypatch, formulas_only):
    used = _spy_implementations(monkeypatch)
    decisions = []
    original = kernel_fns.tune

    def counting(spec, x1, x2, params, kwargs, **options):
        decisions.append(np.shape(x1))
        return original(spec, x1, x2, params, kwargs, **options)

    monkeypatch.setattr(kernel_fns, "tune", counting)
    ntk_fn = empirical_ntk_fn(wide_linear, (), implementation=0)
    x = _normal(7, (3, 10))
    want = oracle_ntk(lambda p: wide_linear(p, x), lambda p: wide_linear(p, x), WIDE_PARAMS, ())
    for _ in range(2):
        np.testing.assert_allclose(ntk_fn(x, None, WIDE_PARAMS), want, rtol=1e-12)
    ntk_fn(x[:2], None, WIDE_PARAMS)
    assert decisions == [(3, 10), (2, 10)]
    assert used == [NVP, NVP, NVP]
