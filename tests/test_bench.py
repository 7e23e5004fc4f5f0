"""The benchmarks run and report what the README tables show (no timing asserted)."""

import json

import pytest

from ntk_dist.cli import main
from ntk_dist.empirical import kernel_fns


def test_bench_kernels_reports_every_implementation(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NTK_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NTK_DIST_AUTOTUNE", "model")  # AUTO's measurement: tests/test_autotune.py
    path = tmp_path / "rows.json"
    argv = ["bench", "kernels", "--n", "2", "--repeats", "1", "--tile-block", "1"]
    assert main([*argv, "--gemm-n", "32", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["gemm_flops_per_s"] > 0
    registered = sorted(kernel_fns._IMPLEMENTATIONS)
    paths = [f"impl {int(i)} {i.name}, one call" for i in registered]
    for network in ("docs CNN", "docs MLP"):
        rows = [r for r in result["rows"] if r["network"] == network]
        assert [r["path"] for r in rows[: len(paths)]] == paths
        auto, per_tile, tiles = rows[len(paths) :]
        assert auto["path"].startswith("AUTO (") and auto["path"].endswith("), one call")
        assert per_tile["path"] == "per-tile JC, blocks of 1 (baseline)"
        assert tiles["path"].startswith("AUTO tiles, block_size=None")
        for r in rows:
            assert r["n"] == 2 and r["seconds"] > 0
            assert r["examples2_per_s"] == pytest.approx(4 / r["seconds"])
        # blocks of 1 of a symmetric 2 x 2 kernel: tiles (0,0), (0,1), (1,1), each computing
        # the Jacobians of its row and column example: 6 evaluations of 2 examples
        assert per_tile["recompute"] == 3.0
        assert rows[0]["recompute"] == 1.0 and rows[0]["flops"] > 0
    goals = {(g["network"], g["measure"]) for g in result["goals"]}
    assert ("docs CNN", "best path ÷ per-tile JC (rate)") in goals
    assert ("docs MLP", "AUTO one call ÷ best implementation (rate)") in goals
    out = capsys.readouterr().out
    assert "| docs MLP | impl 1 JACOBIAN_CONTRACTION, one call | 2 |" in out


def test_bench_tiles_reports_every_ratio(tmp_path, capsys):
    path = tmp_path / "tiles.json"
    argv = ["bench", "tiles", "--n", "8", "--blocks", "2", "--repeats", "1"]
    assert main([*argv, "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert [r["measure"] for r in rows] == ["store ÷ one call"] * 4 + [
        "symmetric ÷ rectangular",
        "4 devices ÷ 1 device",
    ]
    for row in rows:
        assert set(row) == {"measure", "setup", "seconds", "baseline_seconds", "ratio", "goal"}
        assert row["seconds"] > 0 and row["baseline_seconds"] > 0
        assert row["ratio"] == pytest.approx(row["seconds"] / row["baseline_seconds"])
    assert "2x2 tiles" in rows[2]["setup"] and "1 tile" in rows[0]["setup"]
    assert rows[4]["goal"] == "~ 0.750 = (nb+1)/(2nb)"  # nb = 2 block rows
    assert "4 simulated CPU devices" in rows[5]["setup"]  # this process has 1 device
    assert "| symmetric ÷ rectangular | 8x8 NTK, 2 block rows" in capsys.readouterr().out


def test_bench_tiles_explains_sizes_it_cannot_split():
    with pytest.raises(ValueError, match="n=10 must be a multiple of blocks x 4 = 8"):
        main(["bench", "tiles", "--n", "10", "--blocks", "2"])


def test_bench_linalg_reports_every_ratio_on_simulated_devices(tmp_path, capfd):
    path = tmp_path / "linalg.json"
    argv = ["bench", "linalg", "--cholesky-n", "64", "--eigh-n", "32", "--devices", "2"]
    assert main([*argv, "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert [r["measure"] for r in rows] == ["tiled Cholesky ÷ numpy.linalg.cholesky"] * 2 + [
        "stored eigh ÷ numpy.linalg.eigh"
    ] * 4 + [
        "the first out-of-core eigh in a process ÷ numpy.linalg.eigh",
        "stored eigvalsh ÷ numpy.linalg.eigvalsh",
        "one prediction with method='krylov' ÷ the out-of-core eigh",
        "one more prediction once the eigenbasis is stored ÷ the eigh",
    ]
    for row in rows:
        assert set(row) == {"measure", "setup", "seconds", "baseline_seconds", "ratio", "goal"}
        assert row["seconds"] > 0 and row["baseline_seconds"] > 0
        assert row["ratio"] == pytest.approx(row["seconds"] / row["baseline_seconds"])
        assert "2 cpu device(s)" in row["setup"]  # the subprocess saw its simulated devices
    assert "K fits the bound" in rows[0]["setup"] and "out of core" in rows[1]["setup"]
    assert "in core" in rows[2]["setup"] and "out of core" in rows[3]["setup"]
    assert "spread spectrum, out of core" in rows[4]["setup"]
    assert "power law spectrum, out of core" in rows[5]["setup"]
    assert rows[6]["baseline_seconds"] == rows[4]["baseline_seconds"]  # numpy's, spread
    assert rows[8]["baseline_seconds"] == rows[5]["seconds"]  # the out-of-core eigh's
    assert rows[9]["baseline_seconds"] == rows[2]["seconds"]  # a fraction of the eigh time
    out = capfd.readouterr().out
    assert "| tiled Cholesky ÷ numpy.linalg.cholesky | N=64 float64, out of core" in out
