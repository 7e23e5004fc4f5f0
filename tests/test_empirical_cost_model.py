"""AUTO: the cost model's parts, its decisions, its cache, and that it never changes results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_empirical_oracle import oracle_ntk

from ntk_dist.empirical import (
    CostEstimate,
    NtkImplementation,
    choose_implementation,
    cost_model,
    empirical_ntk_fn,
    estimate_costs,
    kernel_fns,
)

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


def test_decide():
    assert cost_model.decide((10.0, 5.0), (20.0, 5.0), 100.0) == JC
    assert cost_model.decide((30.0, 5.0), (20.0, 5.0), 100.0) == NVP
    assert cost_model.decide((10.0, 500.0), (20.0, 5.0), 100.0) == NVP  # JC does not fit
    assert cost_model.decide((10.0, 500.0), (20.0, 300.0), 100.0) == NVP  # neither: less memory
    assert cost_model.decide((10.0, 5.0), (10.0, 5.0), 100.0) == JC  # tie


def test_choices_follow_the_model(monkeypatch):
    traced = estimate_costs(mlp, X1, X2, MLP_PARAMS, (-1,), (), 0)
    assert isinstance(traced, CostEstimate) and traced.choice == JC
    assert traced.jacobian_contraction_flops < traced.ntk_vector_products_flops
    assert choose_implementation(mlp, X1, X2, MLP_PARAMS, (-1,), (), 0) == JC

    wide = estimate_costs(wide_linear, _normal(6, (4, 10)), None, WIDE_PARAMS, ())
    assert wide.choice == NVP
    assert wide.ntk_vector_products_flops < wide.jacobian_contraction_flops

    budget = (traced.jacobian_contraction_bytes + traced.ntk_vector_products_bytes) / 2
    assert traced.ntk_vector_products_bytes < budget < traced.jacobian_contraction_bytes
    monkeypatch.setattr(cost_model, "memory_budget_bytes", lambda: int(budget))
    assert choose_implementation(mlp, X1, X2, MLP_PARAMS, (-1,), (), 0) == NVP


def _spy_implementations(monkeypatch):
    used = []
    for impl, fn in list(kernel_fns._IMPLEMENTATIONS.items()):

        def spy(problem, impl=impl, fn=fn):
            used.append(impl)
            return fn(problem)

        monkeypatch.setitem(kernel_fns._IMPLEMENTATIONS, impl, spy)
    return used


def test_auto_runs_the_choice_once_per_shapes(monkeypatch):
    used = _spy_implementations(monkeypatch)
    estimates = []
    original = kernel_fns.estimate_problem

    def counting(problem):
        estimates.append(problem.shapes1)
        return original(problem)

    monkeypatch.setattr(kernel_fns, "estimate_problem", counting)
    ntk_fn = empirical_ntk_fn(wide_linear, (), implementation=0)
    x = _normal(7, (3, 10))
    want = oracle_ntk(lambda p: wide_linear(p, x), lambda p: wide_linear(p, x), WIDE_PARAMS, ())
    for _ in range(2):
        np.testing.assert_allclose(ntk_fn(x, None, WIDE_PARAMS), want, rtol=1e-12)
    ntk_fn(x[:2], None, WIDE_PARAMS)
    assert estimates == [[(3, 50)], [(2, 50)]]
    assert used == [NVP, NVP, NVP]


@pytest.mark.parametrize("forced", [JC, NVP])
def test_auto_result_does_not_depend_on_the_choice(monkeypatch, forced):
    used = _spy_implementations(monkeypatch)
    monkeypatch.setattr(cost_model, "decide", lambda jc, nvp, budget: forced)
    monkeypatch.setattr(cost_model, "flops_from_cost_analysis", lambda analysis: None)

    def heads(p, x):
        return [mlp(p, x), jnp.sin(mlp(p, x))]

    got = jax.jit(empirical_ntk_fn(heads, (), (0,), 0, NtkImplementation.AUTO))(
        X1, X1 + 1.0, MLP_PARAMS
    )
    assert used == [forced]
    for i in range(2):
        want = oracle_ntk(
            lambda p, i=i: heads(p, X1)[i],
            lambda p, i=i: heads(p, X1 + 1.0)[i],
            MLP_PARAMS,
            (),
            (0,),
        )
        np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-12)
