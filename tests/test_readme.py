"""The README's commands and snippets are what CI and users run: keep them true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
