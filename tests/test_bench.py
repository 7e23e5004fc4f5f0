"""The kernel benchmark runs and reports what the README table shows (no timing asserted)."""

import json

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
