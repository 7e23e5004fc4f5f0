"""The benchmarks run and report what the README tables show (no timing asserted)."""

import json

import pytest

from ntk_dist.cli import main


def test_bench_kernels_reports_every_implementation(tmp_path, capsys):
    path = tmp_path / "rows.json"
    assert main(["bench", "kernels", "--n", "2", "--repeats", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert [r["network"] for r in rows] == ["docs CNN", "docs MLP"]
    for row in rows:
        rates = row["examples2_per_s"]
        assert set(rates) == {"JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS", "AUTO"}
        assert all(rate > 0 for rate in rates.values())
        assert row["auto_chose"] in {"JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS"}
    assert rows[1]["params"] == 3072 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    assert "| docs MLP | 2 |" in capsys.readouterr().out


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
    ] * 2 + ["one more prediction once the eigenbasis is stored ÷ the eigh"]
    for row in rows:
        assert set(row) == {"measure", "setup", "seconds", "baseline_seconds", "ratio", "goal"}
        assert row["seconds"] > 0 and row["baseline_seconds"] > 0
        assert row["ratio"] == pytest.approx(row["seconds"] / row["baseline_seconds"])
        assert "2 cpu device(s)" in row["setup"]  # the subprocess saw its simulated devices
    assert "in core" in rows[0]["setup"] and "out of core" in rows[1]["setup"]
    assert "in core" in rows[2]["setup"] and "out of core" in rows[3]["setup"]
    assert rows[4]["baseline_seconds"] == rows[2]["seconds"]  # a fraction of the eigh time
    out = capfd.readouterr().out
    assert "| tiled Cholesky ÷ numpy.linalg.cholesky | N=64 float64, out of core" in out
