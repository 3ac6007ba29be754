"""The README's commands and snippets are what CI and users run: keep them true."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_main_job_and_the_tests():
    main_job, tests = bash_blocks()[:2]
    assert "torchrun" in main_job and "launch/train.py" in main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    command = [line for line in bash_blocks()[1].splitlines() if line and not line.startswith("#")]
    assert len(command) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command[0] in ci, ".ci/run must run the README's test command verbatim"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_python_snippets_run_in_order(tmp_path):
    """Each snippet in a fresh process as a 1-rank torchrun job would run it, in one directory,
    so the resume snippet loads the checkpoint the FSDP2 snippet wrote."""
    blocks = python_blocks()
    assert len(blocks) >= 4
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = []
    for i, code in enumerate(blocks):
        env["MASTER_PORT"] = str(free_port())
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"README python block {i} failed:\n{proc.stderr[-3000:]}"
        out.append(proc.stdout)
    assert "resumed at step 3" in out[2]
