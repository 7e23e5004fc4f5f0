"""The examples run as a newcomer would run them (a subprocess, a small size)."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_large_kernel_example_agrees_across_methods(tmp_path):
    # The script asserts that method="krylov" and method="eigh" agree to 1e-9.
    args = [sys.executable, str(EXAMPLES / "large_kernel.py"), "--n", "300"]
    proc = subprocess.run([*args, "--folder", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("spectrum of the 240 x 240 NTK, out of core")
    assert [line.split(":")[0] for line in lines[2:4]] == ["method='krylov'", "method='eigh'"]
    accuracies = [float(line.split()[-1]) for line in lines[4:]]
    assert len(accuracies) == 3 and accuracies[-1] > 0.5  # 60 held-out digits, 10 classes
