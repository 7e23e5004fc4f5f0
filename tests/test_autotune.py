"""AUTO's tuning: measured decisions cached on disk, keyed by the request, never changing
results (against the explicit-Jacobian oracle), and block sizes chosen within the budget."""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_job import ROOT
from test_empirical_oracle import oracle_ntk

from ntk_dist.empirical import NtkImplementation, autotune, empirical_ntk_fn, kernel_fns
from ntk_dist.engine import compute_kernel

AUTO = NtkImplementation.AUTO


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b"]) @ p["w2"]


PARAMS = {"w1": _normal(0, (6, 16)), "b": _normal(1, (16,)), "w2": _normal(2, (16, 3))}
X1, X2 = _normal(3, (5, 6)), _normal(4, (4, 6))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh cache folder and fresh in-memory decisions for every test; measuring on."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("NTK_DIST_CACHE", str(folder))
    monkeypatch.setenv("NTK_DIST_AUTOTUNE", "measure")
    autotune.forget()
    yield folder / "autotune.json"
    autotune.forget()


def _entries(path):
    return json.loads(path.read_text())["decisions"]


def _oracle(x1, x2, trace_axes=(-1,), diagonal_axes=()):
    x2_ = x1 if x2 is None else x2
    return oracle_ntk(
        lambda p: mlp(p, x1), lambda p: mlp(p, x2_), PARAMS, trace_axes, diagonal_axes
    )


def test_second_call_reads_the_cache_instead_of_measuring(cache):
    before = autotune.COUNTERS.measurements
    got = jax.jit(empirical_ntk_fn(mlp, vmap_axes=0, implementation=AUTO))(X1, X2, PARAMS)
    measured = autotune.COUNTERS.measurements - before
    assert measured == 2  # the two candidates the cost model ranks first
    (entry,) = _entries(cache).values()
    assert entry["decision"]["source"] == "measured"
    names = {i.name for i in kernel_fns._IMPLEMENTATIONS}
    assert len(entry["decision"]["seconds"]) == 2 and set(entry["decision"]["seconds"]) <= names
    np.testing.assert_allclose(got, _oracle(X1, X2), rtol=1e-10)

    autotune.forget()  # what a new process starts with
    reads = autotune.COUNTERS.disk_reads
    again = jax.jit(empirical_ntk_fn(mlp, vmap_axes=0, implementation=AUTO))(X1, X2, PARAMS)
    assert autotune.COUNTERS.measurements - before == measured
    assert autotune.COUNTERS.disk_reads == reads + 1
    np.testing.assert_allclose(again, _oracle(X1, X2), rtol=1e-10)


_CHILD = """
import json, jax, jax.numpy as jnp, numpy as np
from ntk_dist.empirical import autotune, empirical_ntk_fn
def f(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]
rng = np.random.default_rng(0)
p = {"w": rng.standard_normal((6, 16)), "v": rng.standard_normal((16, 3))}
x = rng.standard_normal((5, 6))
jax.jit(empirical_ntk_fn(f, vmap_axes=0, implementation=0))(x, None, p)
c = autotune.COUNTERS
print(json.dumps({"measurements": c.measurements, "disk_reads": c.disk_reads}))
"""


def test_another_process_reuses_the_decision(cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"measurements": 2, "disk_reads": 0}
    assert runs[1] == {"measurements": 0, "disk_reads": 1}
    assert len(_entries(cache)) == 1


def test_keys_follow_shapes_axes_and_devices(cache, monkeypatch):
    monkeypatch.setenv("NTK_DIST_AUTOTUNE", "model")  # keys only: no need to measure
    spec = empirical_ntk_fn(mlp, vmap_axes=0, implementation=AUTO).autotune
    requests = [
        (X1, X2, {}),
        (X1, X2, {}),  # the same request: no new entry
        (X1, None, {}),  # x2 is x1
        (X1[:3], X2, {}),  # other shapes
        (X1.astype(jnp.float32), X2.astype(jnp.float32), {}),  # other dtype
        (X1, X2, {"n_devices": 4}),  # other device count
    ]
    sizes = []
    for x1, x2, options in requests:
        autotune.tune(spec, x1, x2, PARAMS, {}, **options)
        sizes.append(len(_entries(cache)))
    assert sizes == [1, 1, 2, 3, 4, 5]
    untraced = empirical_ntk_fn(mlp, (), vmap_axes=0, implementation=AUTO).autotune
    autotune.tune(untraced, X1, X2, PARAMS, {})  # other axes
    assert len(_entries(cache)) == 6
    bigger = {**PARAMS, "w2": _normal(5, (16, 4))}
    autotune.tune(spec, X1, X2, bigger, {})  # other model (parameter shapes)
    assert len(_entries(cache)) == 7
    keys = {json.dumps(e["request"], sort_keys=True) for e in _entries(cache).values()}
    assert len(keys) == 7


@pytest.mark.parametrize("content", ["{not json", '{"decisions": [1, 2]}', '{"format": 1}', ""])
def test_corrupt_cache_warns_tunes_and_is_replaced(cache, content, monkeypatch):
    monkeypatch.setenv("NTK_DIST_AUTOTUNE", "model")  # quicker; the cache is the same
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    with pytest.warns(UserWarning, match="corrupt"):
        got = empirical_ntk_fn(mlp, vmap_axes=0, implementation=AUTO)(X1, X2, PARAMS)
    np.testing.assert_allclose(got, _oracle(X1, X2), rtol=1e-10)
    assert len(_entries(cache)) == 1


def test_malformed_entry_warns_and_tunes_again(cache, monkeypatch):
    monkeypatch.setenv("NTK_DIST_AUTOTUNE", "model")
    empirical_ntk_fn(mlp, vmap_axes=0, implementation=AUTO)(X1, X2, PARAMS)
    data = json.loads(cache.read_text())
    (key,) = data["decisions"]
    data["decisions"][key]["decision"]["implementation"] = "NO_SUCH_IMPLEMENTATION"
    cache.write_text(json.dumps(data))
    autotune.forget()
    reads = autotune.COUNTERS.disk_reads
    with pytest.warns(UserWarning, match="malformed"):
        got = empirical_ntk_fn(mlp, vmap_axes=0, implementation=AUTO)(X1, X2, PARAMS)
    assert autotune.COUNTERS.disk_reads == reads
    np.testing.assert_allclose(got, _oracle(X1, X2), rtol=1e-10)
    (entry,) = _entries(cache).values()  # replaced by the new decision
    assert entry["decision"]["implementation"] in {i.name for i in kernel_fns._IMPLEMENTATIONS}


def test_unwritable_cache_warns_and_keeps_the_decision_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("NTK_DIST_AUTOTUNE", "model")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NTK_DIST_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="cannot write the autotune cache"):
        got = empirical_ntk_fn(mlp, vmap_axes=0, implementation=AUTO)(X1, X2, PARAMS)
    np.testing.assert_allclose(got, _oracle(X1, X2), rtol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered in memory: no second attempt to write
        empirical_ntk_fn(mlp, vmap_axes=0, implementation=AUTO)(X1, X2, PARAMS)


def test_model_mode_does_not_measure_and_bad_mode_is_explained(monkeypatch):
    monkeypatch.setenv("NTK_DIST_AUTOTUNE", "model")
    before = autotune.COUNTERS.measurements
    got = empirical_ntk_fn(mlp, vmap_axes=0, implementation=AUTO)(X1, X2, PARAMS)
    assert autotune.COUNTERS.measurements == before
    np.testing.assert_allclose(got, _oracle(X1, X2), rtol=1e-10)
    monkeypatch.setenv("NTK_DIST_AUTOTUNE", "fastest")
    with pytest.raises(ValueError, match="NTK_DIST_AUTOTUNE='fastest' is not one of"):
        empirical_ntk_fn(mlp, vmap_axes=0, implementation=AUTO)(X1[:2], X2, PARAMS)


@pytest.mark.parametrize("forced", sorted(kernel_fns._IMPLEMENTATIONS))
def test_auto_equals_the_oracle_whichever_is_picked(monkeypatch, forced):
    monkeypatch.setattr(autotune, "_decide", lambda *args, **kwargs: autotune.Decision(forced))
    used = []
    for impl, fn in list(kernel_fns._IMPLEMENTATIONS.items()):
        monkeypatch.setitem(
            kernel_fns._IMPLEMENTATIONS, impl, lambda pr, i=impl, g=fn: used.append(i) or g(pr)
        )
    cases = [((-1,), (), X2), ((), (), None), ((), (-1,), X2)]
    for trace_axes, diagonal_axes, x2 in cases:
        ntk_fn = empirical_ntk_fn(mlp, trace_axes, diagonal_axes, 0, AUTO)
        got = jax.jit(ntk_fn)(X1, x2, PARAMS)
        want = _oracle(X1, x2, trace_axes, diagonal_axes)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert used == [forced] * len(cases)


def test_compute_kernel_picks_blocks_within_the_budget(cache, tmp_path):
    x = np.asarray(_normal(6, (23, 6)))
    budget = 20_000
    ntk_fn = empirical_ntk_fn(mlp, vmap_axes=0, implementation=AUTO)
    store = compute_kernel(
        ntk_fn,
        x,
        None,
        PARAMS,
        store=tmp_path / "k",
        progress=False,
        memory_budget=budget,
    )
    np.testing.assert_allclose(store.to_numpy(), _oracle(x, None), rtol=1e-10)
    assert store.metadata["implementation"] == str(AUTO)  # what was asked for
    bm, bn = store.plan.block_shape
    assert bm < 23 and bm == bn  # the budget binds
    (entry,) = _entries(cache).values()
    assert entry["decision"]["block_shape"] == [bm, bn]
    chosen = NtkImplementation[entry["decision"]["implementation"]]
    # XLA's own account of one tile of the chosen implementation fits the budget, up to the
    # error of the tiler's memory model (a straight line through two compiled probes)
    tile = jax.ShapeDtypeStruct((bm, 6), x.dtype)
    spec = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), PARAMS)
    fn = empirical_ntk_fn(mlp, vmap_axes=0, implementation=chosen)
    stats = jax.jit(fn).lower(tile, tile, spec).compile().memory_analysis()
    used = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    assert used <= 1.1 * budget

    autotune.forget()
    before = autotune.COUNTERS.measurements
    again = compute_kernel(ntk_fn, x, None, PARAMS, progress=False, memory_budget=budget)
    assert autotune.COUNTERS.measurements == before  # blocks and pick read from the cache
    np.testing.assert_allclose(again, _oracle(x, None), rtol=1e-10)
