"""Kernels for the linalg and stored-predictor tests: real NTKs, ill-conditioned SPD, stores."""

import jax
import jax.numpy as jnp
import numpy as np

from ntk_dist.store import KernelStore
from ntk_dist.tiling import TilePlan

# A child process that factors a store and SIGKILLs itself after 3 block columns:
# argv = store path, memory bound, tile backend.
KILLED_CHOLESKY = """
import os, signal, sys
import jax
jax.config.update("jax_enable_x64", True)
from ntk_dist.linalg import StoredKernelOperator
from ntk_dist.store import KernelStore

def die_after_three(done, total):
    if done == 3:
        os.kill(os.getpid(), signal.SIGKILL)

op = StoredKernelOperator(KernelStore.open(sys.argv[1]), memory_bound=int(sys.argv[2]),
                          progress=die_after_three, tile_backend=sys.argv[3])
op.cholesky()
"""


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def mlp_params(n_in=3, hidden=8, out=2, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "w1": jax.random.normal(k1, (n_in, hidden)),
        "b1": jax.random.normal(k2, (hidden,)),
        "w2": jax.random.normal(k3, (hidden, out)) / np.sqrt(hidden),
    }


def jacobian(params, x):
    """Explicit Jacobian (jax.jacrev) of the outputs, shape (len(x), out, n_params)."""
    jac = jax.jacrev(mlp)(params, x)
    leaves = jax.tree_util.tree_leaves(jac)
    return np.concatenate([np.asarray(j).reshape(j.shape[0], j.shape[1], -1) for j in leaves], -1)


def ntk(x1, x2, params, traced):
    """NTK in neural-tangents layout: (n1, n2) traced, (n1, n2, out, out) untraced."""
    j1, j2 = jacobian(params, x1), jacobian(params, x2)
    if traced:
        return np.einsum("icp,jcp->ij", j1, j2)
    return np.einsum("iap,jbp->ijab", j1, j2)


def ntk_train(n, traced=False, diag_reg=1e-6, seed=0):
    """Real untraced (or traced) NTK of a tiny MLP on n random inputs, plus diag_reg * mean diag."""
    params = mlp_params(seed=seed)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(seed + 1), (n, 3)))
    k = ntk(x, x, params, traced)
    k2 = to_2d(k)
    k2 = k2 + diag_reg * np.mean(np.diag(k2)) * np.eye(len(k2))
    return from_2d(k2, k.shape)


def ill_conditioned(n, cond=1e10, seed=0):
    """SPD (n, n) matrix with eigenvalues log-spaced from 1 to 1/cond."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    k = (q * np.logspace(0, -np.log10(cond), n)) @ q.T
    return (k + k.T) / 2


def to_2d(k):
    order = tuple(range(0, k.ndim, 2)) + tuple(range(1, k.ndim, 2))
    return k.transpose(order).reshape(int(np.prod(k.shape[0::2])), -1)


def from_2d(m, shape):
    half = shape[0::2] + shape[1::2]
    k = len(shape) // 2
    order = tuple(i for pair in zip(range(k), range(k, 2 * k), strict=True) for i in pair)
    return m.reshape(half).transpose(order)


def store_kernel(path, k, block, dtype=np.float64, symmetric=True):
    """A complete KernelStore on disk holding k (layout (n1, n2, ...)) in blocks of `block`."""
    plan = TilePlan(k.shape[0], k.shape[1], (block, block), symmetric=symmetric)
    store = KernelStore.create(
        path, plan=plan, entry_shape=k.shape[2:], dtype=dtype, fingerprint="test"
    )
    for t in plan:
        store.write_tile(t, k[t.rows, t.cols])
    return store


def rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


def write_low_rank_kernel(path, g_rows, g_cols, shift, block=512):
    """Store ``shift * I + G_rows G_cols^T / rank`` tile by tile (never the whole matrix)."""
    symmetric = g_rows is g_cols
    plan = TilePlan(len(g_rows), len(g_cols), (min(block, len(g_rows)), block), symmetric=symmetric)
    store = KernelStore.create(path, plan=plan, dtype=np.float64, fingerprint="test")
    for t in plan:
        k = g_rows[t.rows] @ g_cols[t.cols].T / g_rows.shape[1]
        if symmetric and t.i == t.j:
            k[np.diag_indices(len(k))] += shift
        store.write_tile(t, k)
    return store


def count_calls(monkeypatch, module, name, calls):
    """Wrap ``module.name`` so that ``calls[name]`` counts its calls (the real one runs)."""
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def stored_case(path, name, n_ntk, n_ill, block):
    """A real NTK (``"ntk"``, of ``n_ntk`` examples) or an ill-conditioned SPD matrix of
    order ``n_ill`` (``"ill"``, condition 1e10), stored in blocks of ``block``; returns
    its 2-D matrix and the store."""
    k = ntk_train(n_ntk) if name == "ntk" else ill_conditioned(n_ill, cond=1e10)
    return to_2d(k), store_kernel(path, k, block=block)
