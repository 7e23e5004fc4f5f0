"""``ntk-dist kernel`` and ``ntk-dist inspect``: stored kernels equal one in-memory call."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import zarr
from kernel_job import ROOT

import ntk_dist
from ntk_dist import KernelStore, models
from ntk_dist.cli import main
from ntk_dist.jobs import load_model

TINY_MODEL = """
import jax.numpy as jnp
import numpy as np


def mlp():
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(3, 8)), "b1": rng.normal(size=8)}
    params["w2"] = rng.normal(size=(8, 2))

    def f(params, x):
        return jnp.tanh(x @ params["w1"] / np.sqrt(3) + params["b1"]) @ params["w2"] / np.sqrt(8)

    return f, params
"""


@pytest.fixture
def job(tmp_path):
    """A model file and .npy inputs; returns (model spec, f, params, x1 path, x2 path)."""
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    spec = f"{tmp_path / 'tiny.py'}:mlp"
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(9, 3)), rng.normal(size=(7, 3))
    np.save(tmp_path / "x1.npy", x1)
    np.save(tmp_path / "x2.npy", x2)
    f, params = load_model(spec)
    return spec, f, params, tmp_path / "x1.npy", tmp_path / "x2.npy"


def test_kernel_command_stores_the_one_call_kernel_and_resumes(job, tmp_path, capsys):
    spec, f, params, x1, x2 = job
    out = str(tmp_path / "k.zarr")
    argv = ["kernel", "--model", spec, "--x1", str(x1), "--x2", str(x2), "--out", out]
    argv += ["--trace-axes", "", "--implementation", "ntk_vector_products", "--block-size", "4,3"]
    assert main([*argv, "--devices", "1"]) == 0
    assert "9 of 9 tiles computed" in capsys.readouterr().out

    store = KernelStore.open(out)
    oracle = ntk_dist.empirical_ntk_fn(f, trace_axes=(), implementation=2)
    expected = np.asarray(oracle(np.load(x1), np.load(x2), params))
    assert store.shape == expected.shape == (9, 7, 2, 2)
    np.testing.assert_allclose(store.to_numpy(), expected, rtol=1e-10, atol=1e-12)
    assert store.metadata["kind"] == "ntk" and store.metadata["trace_axes"] == []
    assert store.metadata["model_name"] == spec

    assert main(argv) == 0  # same job again: nothing to compute
    assert "0 of 9 tiles computed" in capsys.readouterr().out


def test_nngp_of_a_zarr_input_is_symmetric_when_x2_is_omitted(job, tmp_path):
    spec, f, params, x1, _ = job
    x = np.load(x1)
    zarr.create_array(tmp_path / "x1.zarr", data=x, chunks=(2, 3))
    out = str(tmp_path / "nngp.zarr")
    argv = ["kernel", "--model", spec, "--x1", str(tmp_path / "x1.zarr"), "--out", out]
    argv += ["--kind", "nngp", "--trace-axes", "", "--diagonal-axes", "-1", "--block-size", "4"]
    assert main(argv) == 0
    store = KernelStore.open(out)
    assert store.plan.symmetric and len(store.plan) == 6 and store.metadata["kind"] == "nngp"
    expected = ntk_dist.empirical_nngp_fn(f, trace_axes=(), diagonal_axes=(-1,))(x, None, params)
    np.testing.assert_allclose(store.to_numpy(), expected, rtol=1e-10, atol=1e-12)


def test_console_script_in_a_subprocess_on_two_devices(tmp_path):
    x = np.random.default_rng(2).normal(size=(10, 8, 8, 1)).astype(np.float32)
    np.save(tmp_path / "digits.npy", x)
    out = tmp_path / "k.zarr"
    command = [sys.executable, "-m", "ntk_dist.cli", "kernel", "--model"]
    command += ["ntk_dist.models:digits_cnn", "--x1", str(tmp_path / "digits.npy")]
    command += ["--out", str(out), "--block-size", "4", "--devices", "2", "--vmap-axes", "0"]
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "6 of 6 tiles computed" in proc.stdout and "on 2 device(s)" in proc.stdout
    assert "tiles 6/6" in proc.stderr and "ETA" in proc.stderr  # progress goes to stderr

    f, params = models.digits_cnn()
    expected = np.asarray(ntk_dist.empirical_ntk_fn(f, vmap_axes=0)(x, None, params))
    stored = KernelStore.open(out).to_numpy()
    assert stored.dtype == np.float32 and expected.dtype == np.float32
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_inspect_describes_the_store_and_verify_names_a_truncated_chunk(job, tmp_path, capsys):
    spec, _, _, x1, _ = job
    out = str(tmp_path / "k.zarr")
    argv = ["kernel", "--model", spec, "--x1", str(x1), "--out", out, "--block-size", "4"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["inspect", out]) == 0
    report = capsys.readouterr().out
    store = KernelStore.open(out)
    for line in ("kind          ntk", "shape         (9, 9) float64", "trace axes    [-1]"):
        assert line in report
    assert "tiles         6 / 6 done (100.0 %)" in report and store.fingerprint in report
    assert "4 x 4, grid 3 x 3, symmetric" in report

    os.truncate(os.path.join(out, "c", "0", "1"), 10)
    assert main(["inspect", out, "--verify"]) == 1
    report = capsys.readouterr().out
    assert "1 of 6 completed tiles FAILED" in report
    assert "damaged tile (0, 1): rows 0:4, cols 4:8" in report

    assert main(argv) == 0  # rerunning the job recomputes exactly the damaged tile
    assert "1 of 6 tiles computed" in capsys.readouterr().out
    assert main(["inspect", out, "--verify"]) == 0
    assert "all 6 completed tiles match their checksums" in capsys.readouterr().out


def test_mistakes_are_explained(job, tmp_path, capsys):
    spec, _, _, x1, _ = job
    base = ["kernel", "--x1", str(x1), "--out", str(tmp_path / "k")]
    with pytest.raises(ValueError, match="module:function"):
        main([*base, "--model", "digits_cnn"])
    with pytest.raises(ValueError, match="has no function 'nope'"):
        main([*base, "--model", "ntk_dist.models:nope"])
    n = jax.local_device_count() + 1
    with pytest.raises(ValueError, match=f"asked for {n} devices.*device_count={n}"):
        main([*base, "--model", spec, "--devices", str(n)])
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=r"\.npy file or a Zarr array"):
        main([*base, "--model", spec, "--x2", str(tmp_path / "x.txt")])
    with pytest.raises(SystemExit):
        main([*base, "--model", spec, "--trace-axes", "last"])
    assert "comma-separated list of integer axes" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no ntk_dist kernel store"):
        main(["inspect", str(tmp_path / "nothing")])
