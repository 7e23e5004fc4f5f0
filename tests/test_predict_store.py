"""Predictors on KernelStores equal the in-memory predictors; factorisations are reused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from linalg_helpers import mlp, mlp_params, ntk, rel, store_kernel, to_2d

from ntk_dist.linalg import StoredKernelOperator
from ntk_dist.linalg.cholesky import PANELS
from ntk_dist.predict import gradient_descent, gradient_descent_mse
from ntk_dist.store import KernelStore

N_TRAIN, N_TEST = 23, 9


class Problem:
    def __init__(self, tmp_path, traced):
        params = mlp_params()
        x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (N_TRAIN + N_TEST, 3)))
        x_train, x_test = x[:N_TRAIN], x[N_TRAIN:]
        self.k = ntk(x_train, x_train, params, traced)
        self.kt = ntk(x_test, x_train, params, traced)
        self.y = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (N_TRAIN, 2)))
        self.fx_train_0 = np.asarray(mlp(params, x_train))
        self.fx_test_0 = np.asarray(mlp(params, x_test))
        self.store = store_kernel(tmp_path / "train", self.k, block=5)
        self.test_store = store_kernel(tmp_path / "test", self.kt, block=4, symmetric=False)
        self.trace_axes = (-1,) if traced else ()
        self.n2d = len(to_2d(self.k))

    def streamed(self, store, tiled):
        """An operator that streams every product (and factorises tiled if asked)."""
        bound = PANELS * self.n2d * 8 * 7 if tiled else 4 * self.n2d**2 * 8
        return StoredKernelOperator(store, memory_bound=bound)


def close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert rel(x, y) <= 1e-9


@pytest.mark.parametrize("traced", [True, False])
def test_mse_on_stores_equals_in_memory(tmp_path, traced):
    p = Problem(tmp_path, traced)
    kw = {"learning_rate": 0.5, "diag_reg": 1e-4, "trace_axes": p.trace_axes}
    memory = gradient_descent_mse(p.k, p.y, **kw)
    for t in [None, 2.0, np.array([[0.0, 1.0], [5.0, 30.0]])]:
        train_op = p.streamed(p.store, tiled=t is None)
        stored = gradient_descent_mse(train_op, p.y, **kw)
        test_op = p.streamed(p.test_store, tiled=True)
        want = memory(t, p.fx_train_0, p.fx_test_0, p.kt)
        close(stored(t, p.fx_train_0, p.fx_test_0, test_op), want)
        want_test = memory(t, None, p.fx_test_0, p.kt)
        close(stored(t, None, p.fx_test_0, p.test_store), want_test)
        close(stored(t, p.fx_train_0), want[0])


def test_second_predictor_on_a_store_reuses_its_factorisations(tmp_path):
    p = Problem(tmp_path, traced=False)
    first = gradient_descent_mse(p.store, p.y, diag_reg=1e-4, trace_axes=())
    for t in [None, 1.0, np.array([2.0, 3.0])]:
        first(t, p.fx_train_0, p.fx_test_0, p.test_store)
    assert first.kernel_operator.factorizations == {"cholesky": 1, "eigh": 1}
    again = gradient_descent_mse(
        KernelStore.open(tmp_path / "train"), p.y, diag_reg=1e-4, trace_axes=()
    )
    assert again.kernel_operator.factorizations == {}
    memory = gradient_descent_mse(p.k, p.y, diag_reg=1e-4, trace_axes=())
    for t in [None, 7.0]:
        want = memory(t, p.fx_train_0, p.fx_test_0, p.kt)
        close(again(t, p.fx_train_0, p.fx_test_0, p.test_store), want)
    assert again.kernel_operator.factorizations == {}
    assert again.kernel_operator.reused == {"cholesky": 1, "eigh": 1}


def cross_entropy(fx, y):
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(fx) * jax.nn.softmax(y), axis=-1))


def mse(fx, y):
    return 0.5 * jnp.mean((fx - y) ** 2)


@pytest.mark.parametrize("traced", [True, False])
@pytest.mark.parametrize("loss", [mse, cross_entropy])
@pytest.mark.parametrize("momentum", [None, 0.9])
def test_ode_on_stores_equals_in_memory(tmp_path, traced, loss, momentum):
    p = Problem(tmp_path, traced)
    kw = {"learning_rate": 0.5, "momentum": momentum, "trace_axes": p.trace_axes}
    memory = gradient_descent(loss, p.k, p.y, **kw)
    stored = gradient_descent(loss, p.streamed(p.store, tiled=True), p.y, **kw)
    t = np.array([0.0, 1.0, 4.0])
    want = memory(t, p.fx_train_0, p.fx_test_0, p.kt)
    close(stored(t, p.fx_train_0, p.fx_test_0, p.streamed(p.test_store, tiled=True)), want)
    close(gradient_descent(loss, p.store, p.y, **kw)(2.0, p.fx_train_0), memory(2.0, p.fx_train_0))
