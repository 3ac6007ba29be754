"""The GPU scripts run here too (CPU as the device), so they work when a GPU machine is lent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_gpu_check_passes_on_cpu() -> None:
    proc = subprocess.run([sys.executable, "launch/gpu_check.py", "--device", "cpu"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "| yes |" in line]
    assert len(rows) == 6, proc.stdout  # three paths, two precisions
    assert "non-blocking step: yes: n/a" in proc.stdout


@pytest.mark.parametrize("keep_freed", [False, True], ids=["default-malloc", "keep-freed-memory"])
def test_bench_step_takes_a_device(keep_freed: bool) -> None:
    proc = subprocess.run([sys.executable, "launch/bench_step.py", "--device", "cpu", "--blocks", "1", "--rounds", "1",
                           "--threads", "1", "--skip-compiled"] + (["--keep-freed-memory"] if keep_freed else []),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on cpu" in proc.stdout and "| AdamW fused |" in proc.stdout
    assert ("--keep-freed-memory: memory freed" in proc.stdout) == keep_freed
