"""Progress lines (steps done, rate, ETA) of the kernel computation and the tiled Cholesky."""

import json
import re

import numpy as np
from linalg_helpers import ill_conditioned, rel, store_kernel

from ntk_dist.cli import main
from ntk_dist.linalg import StoredKernelOperator
from ntk_dist.linalg.cholesky import PANELS
from ntk_dist.progress import ProgressReporter

LINE = re.compile(
    r"\[ntk_dist\] (?P<what>[a-z ]+) (?P<done>\d+)/(?P<total>\d+) \| "
    r"(?P<rate>[\d,.e+-]+) (?P<unit>[A-Za-z ]+)/s \| ETA (?P<eta>\d+:\d\d:\d\d)"
)


def lines(err: str) -> list[re.Match]:
    """Every progress line in captured stderr (lines are rewritten in place with \\r)."""
    parts = [p for p in re.split(r"[\r\n]", err) if p]
    assert all(LINE.fullmatch(p) for p in parts), parts
    return [LINE.fullmatch(p) for p in parts]


def test_reporter_prints_every_line_asked_for_and_ends_with_a_newline(capsys):
    work = [1.0, 2.0, 3.0, 4.0]
    report = ProgressReporter(
        "steps", 5, "GFLOP", done=1, every=0.0, work_left=lambda d: sum(work[d - 1 :])
    )
    for w in work:
        report.update(w)
    err = capsys.readouterr().err
    found = lines(err)
    assert [(m["what"], int(m["done"]), int(m["total"])) for m in found] == [
        ("steps", d, 5) for d in range(2, 6)
    ]
    assert all(m["unit"] == "GFLOP" and float(m["rate"].replace(",", "")) > 0 for m in found)
    assert found[-1]["eta"] == "0:00:00" and err.endswith("\n") and err.count("\n") == 1


def test_disabled_reporter_prints_nothing(capsys):
    report = ProgressReporter("tiles", 2, "kernel entries", enabled=False)
    report.update(10)
    report.update(10)
    report.note("resuming")
    assert capsys.readouterr().err == ""


def test_tiled_cholesky_prints_columns_rate_and_eta(tmp_path, capsys):
    a = ill_conditioned(80, cond=1e4)
    store = store_kernel(tmp_path / "k", a, block=8)
    op = StoredKernelOperator(store, memory_bound=PANELS * 80 * 8 * 16, progress=True)
    lower = op.cholesky().to_dense()
    assert rel(lower @ lower.T, a) <= 1e-12
    found = lines(capsys.readouterr().err)
    last = found[-1]
    assert (last["what"], last["done"], last["total"], last["unit"]) == (
        "cholesky block columns",
        "5",
        "5",
        "GFLOP",
    )
    assert [int(m["done"]) for m in found] == sorted(int(m["done"]) for m in found)


def test_a_progress_callback_is_called_and_prints_nothing(tmp_path, capsys):
    a = ill_conditioned(40, cond=10)
    store = store_kernel(tmp_path / "k", a, block=8)
    calls = []
    op = StoredKernelOperator(
        store, memory_bound=PANELS * 40 * 8 * 8, progress=lambda d, t: calls.append((d, t))
    )
    np.testing.assert_allclose(op.cholesky().to_dense(), np.linalg.cholesky(a), atol=1e-12)
    assert calls == [(d, 5) for d in range(1, 6)] and capsys.readouterr().err == ""


def test_bench_linalg_prints_the_factorisations_progress(tmp_path, capsys):
    path = tmp_path / "rows.json"
    argv = ["bench", "linalg", "--cholesky-n", "64", "--eigh-n", "--progress"]
    assert main([*argv, "--tile-backend", "host", "--json", str(path)]) == 0
    found = lines(capsys.readouterr().err)
    assert found and found[-1]["what"] == "cholesky block columns"
    assert found[-1]["done"] == found[-1]["total"] == "16"  # 64 rows in tiles of 4
    rows = json.loads(path.read_text())
    assert "out of core (host tile kernels)" in rows[1]["setup"]
