"""launch/train.py end to end under torchrun: loss falls, resume at another world size, SIGTERM, restarts."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--block", "32", "--batch-size", "8",
        "--data-bytes", "300000", "--eval-batches", "2", "--lr", "3e-3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def torchrun(nproc: int, *args: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            str(ROOT / "launch" / "train.py"), *TINY, *args]


def run(nproc: int, *args: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun(nproc, *args, extra=extra), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def rows(out: Path, *, evaluations_only: bool = True) -> list[dict[str, float | None]]:
    """metrics.csv as numbers, ``val_loss`` None in a row without an evaluation.

    ``evaluations_only`` keeps the rows with a validation loss. A last line still being
    written by a live run is left out.
    """
    with open(out / "metrics.csv") as f:
        complete = [r for r in csv.DictReader(f) if None not in r.values() and r["world_size"]]
    parsed = [{k: float(v) if v else None for k, v in r.items()} for r in complete]
    return [r for r in parsed if r["val_loss"] is not None] if evaluations_only else parsed


def workers_of(pid: int) -> list[int]:
    """Child processes of ``pid`` (torchrun's workers)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def stop(proc: subprocess.Popen) -> None:
    """Kill torchrun and, first, its workers (they would outlive it)."""
    for pid in workers_of(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()


def wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise AssertionError("timed out waiting for the training run")
        time.sleep(0.1)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_loss_falls(world, tmp_path):
    run(world, "--engine", "ddp", "--steps", "40", "--eval-every", "10", "--checkpoint-every", "0",
        "--out", str(tmp_path))
    r = rows(tmp_path)
    assert [(x["step"], x["world_size"]) for x in r] == [(10, world), (20, world), (30, world), (40, world)]
    assert r[-1]["val_loss"] < r[0]["val_loss"] - 0.3 and r[-1]["loss"] < 5.0
    assert all(0.0 <= x["scale_mean"] <= 1.0 for x in r)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "deepspeed"])
def test_every_engine_trains_in_one_process(engine, tmp_path):
    run(1, "--engine", engine, "--steps", "30", "--eval-every", "15", "--checkpoint-every", "0", "--out", str(tmp_path))
    r = rows(tmp_path)
    assert [x["world_size"] for x in r] == [1, 1] and r[-1]["val_loss"] < r[0]["val_loss"]


def test_log_every_rows_between_evaluations_and_a_summary_line(tmp_path):
    proc = run(1, "--steps", "20", "--log-every", "5", "--eval-every", "10", "--checkpoint-every", "0",
               "--out", str(tmp_path))
    r = rows(tmp_path, evaluations_only=False)
    assert [x["step"] for x in r] == [5, 10, 15, 20]
    assert [x["val_loss"] is None for x in r] == [True, False, True, False]
    assert all(x["loss"] > 0 and 0.0 <= x["scale_mean"] <= 1.0 and x["tokens_per_s"] > 0 for x in r)
    summary = re.fullmatch(r"train\.py: step 20: final val loss (\S+), (\d+) tokens/s, checkpoint (\S+)",
                           proc.stdout.strip().splitlines()[-1])
    assert summary, proc.stdout
    assert float(summary.group(1)) == pytest.approx(r[-1]["val_loss"], abs=1e-4)
    assert Path(summary.group(3)).parent == tmp_path / "checkpoints" and Path(summary.group(3)).is_dir()


def test_use_triton_reaches_lionsf():
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import train
    finally:
        sys.path.remove(str(ROOT / "launch"))
    from lion_sf_dist import LionSF

    for flags, wanted in (([], False), (["--use-triton"], True)):
        options = train.lionsf_options(train.parse(flags))
        assert options["use_triton"] is wanted
        LionSF(torch.nn.Linear(2, 2).named_parameters(), **options)  # every option is one LionSF takes


def test_fresh_run_starts_a_new_log_and_resume_appends(tmp_path):
    for _ in range(2):
        run(1, "--steps", "10", "--eval-every", "5", "--out", str(tmp_path))
    assert [x["step"] for x in rows(tmp_path)] == [5, 10]
    run(1, "--steps", "15", "--eval-every", "5", "--resume", "--out", str(tmp_path))
    assert [x["step"] for x in rows(tmp_path)] == [5, 10, 15]


def test_fsdp2_and_deepspeed_resume_at_another_world_size_and_agree(tmp_path):
    """FSDP2 W=2 -> W=3 and DeepSpeed ZeRO-2 W=2 -> ZeRO-3 W=3 on the same data: the same run.

    Both engines average the same per-rank gradients and LionSF is exact under both, so
    their logged losses agree to float rounding (DeepSpeed reduces gradients in another order).
    """
    logs = {}
    for engine, first, second in (("fsdp2", (), ()), ("deepspeed", ("--zero-stage", "2"), ("--zero-stage", "3"))):
        out = tmp_path / engine
        run(2, "--engine", engine, *first, "--steps", "20", "--eval-every", "10", "--checkpoint-every", "10",
            "--out", str(out))
        proc = run(3, "--engine", engine, *second, "--steps", "30", "--eval-every", "10", "--resume", "--out", str(out))
        assert "resuming at step 20 on 3 processes" in proc.stderr
        logs[engine] = rows(out)
        assert [(x["step"], x["world_size"]) for x in logs[engine]] == [(10, 2), (20, 2), (30, 3)]
        assert logs[engine][-1]["val_loss"] < logs[engine][0]["val_loss"]
    for a, b in zip(logs["fsdp2"], logs["deepspeed"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
        assert a["scale_mean"] == pytest.approx(b["scale_mean"], abs=1e-4)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    proc = subprocess.run(torchrun(1, "--steps", "5", "--resume", "--out", str(tmp_path)), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--resume" in proc.stderr and "checkpoint" in proc.stderr


def test_resume_with_newest_checkpoint_corrupt_names_an_intact_one_and_resume_from_it(tmp_path):
    run(1, "--steps", "10", "--eval-every", "5", "--checkpoint-every", "5", "--out", str(tmp_path))
    newest = tmp_path / "checkpoints" / "ckpt-00000001"
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, other contents
    shard.write_bytes(bytes(data))
    proc = subprocess.run(torchrun(1, "--steps", "15", "--resume", "--out", str(tmp_path)), env=ENV,
                          capture_output=True, text=True, timeout=300)
    older = tmp_path / "checkpoints" / "ckpt-00000000"
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert f"'{shard.name}' is corrupt" in proc.stderr and f"--resume-from {older}" in proc.stderr, proc.stderr[-3000:]
    resumed = run(1, "--steps", "15", "--eval-every", "5", "--resume-from", str(older), "--out", str(tmp_path))
    assert "resuming at step 5 on 1 processes" in resumed.stderr


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--engine", "fsdp2", "--zero-stage", "3"], "--zero-stage is a DeepSpeed setting"),
    (["--width", "30", "--heads", "4"], "--width a multiple of --heads"),
])
def test_bad_flag_is_a_clear_error(flags, message):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *flags], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = str(tmp_path)
    proc = subprocess.Popen(torchrun(2, "--engine", "ddp", "--steps", "100000", "--eval-every", "5",
                                     "--checkpoint-every", "0", "--out", out),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "metrics.csv").exists() and len(rows(tmp_path)) >= 1)
        for pid in workers_of(proc.pid):
            os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: checkpoint written at step" in err
    stopped = int(re.search(r"checkpoint written at step (\d+)", err).group(1))
    assert 1 <= stopped < 100000 and rows(tmp_path)[-1]["step"] == stopped
    resumed = run(2, "--engine", "ddp", "--steps", str(stopped + 5), "--eval-every", "5", "--resume", "--out", out)
    assert f"resuming at step {stopped} on 2 processes" in resumed.stderr


def local_rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"LOCAL_RANK=")).split(b"=", 1)[1])


def test_killed_rank_restarts_from_last_checkpoint(tmp_path):
    """SIGKILL one rank under ``torchrun --max-restarts=1``: the job restarts and resumes.

    Every step after the last checkpoint is logged again by the restarted attempt (those
    past it before the kill were lost with it), and none is skipped.
    """
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(torchrun(2, "--engine", "ddp", "--steps", "200", "--eval-every", "5",
                                         "--checkpoint-every", "10", "--out", str(out), extra=("--max-restarts=1",)),
                                env=ENV, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: any((out / "checkpoints").glob("ckpt-*")))
            os.kill(next(pid for pid in workers_of(proc.pid) if local_rank_of(pid) == 1), signal.SIGKILL)
            proc.wait(timeout=240)
        finally:
            stop(proc)
    err = log.read_text()
    assert proc.returncode == 0, err[-4000:]
    # the surviving rank ended by itself (its collective failed): torchrun never had to SIGKILL it
    assert "forcefully exiting" not in err
    resumed_at = int(re.search(r"resuming at step (\d+)", err).group(1))
    assert resumed_at >= 10 and resumed_at % 10 == 0
    steps = [int(x["step"]) for x in rows(out)]
    restart = len(steps) - 1 - steps[::-1].index(resumed_at + 5)
    assert steps[restart:] == list(range(resumed_at + 5, 201, 5))
    assert steps[:restart] == list(range(5, steps[restart - 1] + 1, 5)) and steps[restart - 1] >= resumed_at
