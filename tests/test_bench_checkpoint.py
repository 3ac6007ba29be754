"""launch/bench_checkpoint.py runs end to end, and its baseline really has checksums off.

The benchmark compares loads and saves with checksums against the same with checksums
switched off by patching; if the patch stopped reaching the code (a rename), both sides
would verify and the printed cost would read as zero.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lion_sf_dist import checkpoint
from lion_sf_dist.checkpoint import checksum
from tests.checkpoint_cases import trained
from tests.test_train import ENV, ROOT

sys.path.insert(0, str(ROOT / "launch"))
import bench_checkpoint as bench  # noqa: E402

sys.path.remove(str(ROOT / "launch"))


def test_checksums_off_skips_verification_and_is_undone(tmp_path: Path) -> None:
    model, opt = trained()
    shard = next(checkpoint.save(tmp_path, model, opt).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointCorruptError, match=shard.name):
        checkpoint.load(tmp_path, model, opt)
    with bench._checksums_off():
        assert checksum.new().hexdigest() == bench._NoHash().hexdigest()
        checkpoint.load(tmp_path, model, opt)  # the flipped byte lies in the data: read without a check
    with pytest.raises(checkpoint.CheckpointCorruptError, match=shard.name):
        checkpoint.load(tmp_path, model, opt)


def test_save_hashing_is_timed_and_unchanged(tmp_path: Path) -> None:
    """The in-save figure times the checksums the save really computes, and leaves them as they were."""
    model, opt = trained()
    spent: list[float] = []
    with bench._hashing_timed(spent):
        spent.append(0.0)
        checkpoint.save(tmp_path, model, opt)
    assert spent[-1] > 0.0
    assert checksum.new().__class__ is not bench._TimedHash
    checkpoint.load(tmp_path, model, opt)  # verifies every file against the checksums the timed save recorded


def test_bench_checkpoint_runs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "launch/bench_checkpoint.py", "--worlds", "1", "--blocks", "1",
                           "--repeats", "2", "--loads-per-save", "2", "--cold", "--dir", str(tmp_path)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"checksums ({checksum.ALGORITHM})" in proc.stdout and "paired medians" in proc.stdout, proc.stdout
    assert "W=1 -> 1 process: load" in proc.stdout
    assert "inside the saves, hashing took" in proc.stdout and "one core hashes the checkpoint" in proc.stdout
