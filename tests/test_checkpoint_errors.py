"""Checkpoint failures in one process: named errors, crash safety, restart modes, retention."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lion_sf_dist import LionSF, checkpoint
from lion_sf_dist.checkpoint import store
from lion_sf_dist.checkpoint.fragments import flat_range_boxes
from tests.checkpoint_cases import Tiny, assert_same, full_state, make_optimizer, train, trained

REPO = Path(__file__).resolve().parents[1]



def _fresh() -> tuple[Tiny, LionSF]:
    model = Tiny(seed=7)
    return model, make_optimizer(model)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict]:
    """A root holding one checkpoint, and the full state it holds."""
    model, opt = trained()
    checkpoint.save(tmp_path / "run", model, opt, extra={"step": 2})
    return tmp_path / "run", full_state(model, opt)


def _shard(root: Path) -> Path:
    files = sorted(checkpoint.latest(root).glob("*.distcp"))
    assert files, "no shard file written"
    return files[0]


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="'.*nowhere' does not exist"):
        checkpoint.load(tmp_path / "nowhere", *_fresh())


def test_root_without_complete_checkpoint(tmp_path: Path) -> None:
    (tmp_path / ".tmp-ckpt-00000000-abcd").mkdir()
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="no complete checkpoint.*only unfinished saves"):
        checkpoint.load(tmp_path, *_fresh())


def test_truncated_shard_named(saved: tuple[Path, dict]) -> None:
    root, _ = saved
    shard = _shard(root)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    truncated = f"'{shard.name}' is truncated.*{size // 2} bytes, {size}"
    with pytest.raises(checkpoint.CheckpointCorruptError, match=truncated):
        checkpoint.load(root, *_fresh())


def test_missing_shard_named_and_previous_suggested(saved: tuple[Path, dict]) -> None:
    root, first = saved
    model, opt = trained(3)
    checkpoint.save(root, model, opt)
    shard = _shard(root)
    shard.unlink()
    previous = checkpoint.latest(root).parent / "ckpt-00000000"
    with pytest.raises(checkpoint.CheckpointCorruptError, match=f"'{shard.name}' is missing.*{previous.name}"):
        checkpoint.load(root, *_fresh())
    model, opt = _fresh()
    checkpoint.load(previous, model, opt)
    assert_same(full_state(model, opt), first, "previous checkpoint")


class _Wider(Tiny):
    def __init__(self) -> None:
        super().__init__(out=3)
        self.c = torch.nn.Linear(3, 1)


class _Narrower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(7, 6)
        self.register_buffer("seen", torch.zeros(2))


@pytest.mark.parametrize("model_cls,message", [
    (_Wider, r"model parameter\(s\) missing from the checkpoint: \['c.weight', 'c.bias'\]"),
    (_Narrower, r"checkpoint parameter\(s\) the model does not have: \['b.weight', 'b.bias'\]"),
    (lambda: Tiny(out=4), r"parameter 'b.weight' has shape \(3, 6\) in the checkpoint but \(4, 6\) in the model"),
])
def test_different_model_named(saved: tuple[Path, dict], model_cls, message: str) -> None:
    root, _ = saved
    with pytest.raises(checkpoint.ModelMismatchError, match=message):
        checkpoint.load(root, model_cls(), None)


def test_different_optimizer(saved: tuple[Path, dict]) -> None:
    root, first = saved
    model = Tiny(seed=7)
    adam = torch.optim.AdamW(model.parameters())
    with pytest.raises(checkpoint.OptimizerMismatchError, match="LionSF state but the running optimizer is AdamW"):
        checkpoint.load(root, model, adam)
    checkpoint.load(root, model, adam, optimizer_state=False)
    assert_same({"params": dict(model.named_parameters())}, {"params": first["params"]}, "params only")


def test_params_only_checkpoint_needs_fresh_state(tmp_path: Path) -> None:
    model, _ = trained()
    checkpoint.save(tmp_path, model, None)
    with pytest.raises(checkpoint.OptimizerMismatchError, match="no optimizer state .saved with optimizer=None"):
        checkpoint.load(tmp_path, *_fresh())
    fresh, opt = _fresh()
    checkpoint.load(tmp_path, fresh, opt, optimizer_state=False)
    assert_same({"params": dict(fresh.named_parameters())}, {"params": dict(model.named_parameters())}, "params")


def test_fresh_state_restart(saved: tuple[Path, dict]) -> None:
    root, first = saved
    model, opt = trained(seed=3)  # holds non-zero exp_avg and agreement averages of its own
    checkpoint.load(root, model, opt, optimizer_state=False)
    state = full_state(model, opt)
    assert_same({k: state[k] for k in ("params", "buffers")}, {k: first[k] for k in ("params", "buffers")}, "fresh")
    assert all(not m.any() for m in state["exp_avg"].values())
    assert "ema" not in state
    train(model, opt, range(2, 3))
    assert any(m.any() for m in full_state(model, opt)["exp_avg"].values())


def test_hyper_parameters_running_wins_by_default(saved: tuple[Path, dict]) -> None:
    root, _ = saved
    model = Tiny(seed=7)
    opt = make_optimizer(model)
    opt.param_groups[0]["lr"] = 5e-3
    opt.pow = 1.0
    with pytest.warns(UserWarning, match=r"running optimizer's values apply.*pow: checkpoint 0.5, running 1.0.*"
                                         r"group 0 lr: checkpoint 0.01, running 0.005"):
        checkpoint.load(root, model, opt)
    assert opt.param_groups[0]["lr"] == 5e-3 and opt.pow == 1.0
    with pytest.warns(UserWarning, match="checkpoint's values apply once the load succeeds"):
        checkpoint.load(root, model, opt, hparams="checkpoint")
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.pow == 0.5
    opt.param_groups[1]["betas"] = (0.8, 0.9)
    with pytest.raises(checkpoint.OptimizerMismatchError, match=r"group 1 betas: checkpoint \[0.9, 0.99\]"):
        checkpoint.load(root, model, opt, hparams="error")


def test_keep_last_and_latest(tmp_path: Path) -> None:
    model, opt = trained()
    for step in range(4):
        checkpoint.save(tmp_path, model, opt, extra={"step": step}, keep=2)
    assert sorted(d.name for d in tmp_path.iterdir() if d.name != store.LOCK) == ["ckpt-00000002", "ckpt-00000003"]
    assert checkpoint.latest(tmp_path).name == "ckpt-00000003"
    assert checkpoint.load(tmp_path, *_fresh())["step"] == 3


def test_extra_round_trip_and_weights_only(tmp_path: Path) -> None:
    model, opt = trained()
    rng = torch.get_rng_state()
    checkpoint.save(tmp_path / "a", model, opt, extra={"step": 5, "rng": rng, "pos": [3, 4]})
    extra = checkpoint.load(tmp_path / "a", *_fresh())
    assert extra["step"] == 5 and extra["pos"] == [3, 4] and torch.equal(extra["rng"], rng)
    checkpoint.save(tmp_path / "b", model, opt, extra={"when": _Opaque()})
    with pytest.raises(checkpoint.CheckpointError, match="weights_only=False"):
        checkpoint.load(tmp_path / "b", *_fresh())
    assert isinstance(checkpoint.load(tmp_path / "b", *_fresh(), weights_only=False)["when"], _Opaque)


class _Opaque:
    pass


class _Injected(RuntimeError):
    pass


def _fail(*args, **kwargs):
    raise _Injected("injected failure")


@pytest.mark.parametrize("stage", ["shard write", "meta write", "rename"])
def test_failed_save_leaves_previous_loadable(saved: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch,
                                             stage: str) -> None:
    root, first = saved
    model, opt = trained(4)
    with monkeypatch.context() as m:
        if stage == "shard write":
            m.setattr("torch.distributed.checkpoint.filesystem._write_item", _fail)
        elif stage == "meta write":
            m.setattr(store, "write_durable", _fail)
        else:
            m.setattr(store.os, "rename", _fail)
        with pytest.raises((_Injected, checkpoint.CheckpointError), match="injected failure"):
            checkpoint.save(root, model, opt)
    fresh, fresh_opt = _fresh()
    checkpoint.load(root, fresh, fresh_opt)
    assert_same(full_state(fresh, fresh_opt), first, stage)
    checkpoint.save(root, model, opt)  # the next save succeeds and clears the leftovers
    assert not [d for d in root.iterdir() if d.name.startswith((store.TMP, store.DELETED))]


def test_killed_save_leaves_previous_loadable(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.checkpoint_kill", str(tmp_path / "run"),
                           str(tmp_path / "first.pt")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [d.name for d in (tmp_path / "run").iterdir() if d.name.startswith(store.TMP)]
    assert leftovers and any((tmp_path / "run" / d).glob("*.distcp") for d in leftovers), leftovers
    model, opt = _fresh()
    assert checkpoint.load(tmp_path / "run", model, opt) == {"step": 1}
    assert_same(full_state(model, opt), torch.load(tmp_path / "first.pt"), "after a killed save")


@pytest.mark.parametrize("shape", [(5,), (4, 7), (3, 4, 5), (2, 1, 3, 4), (1, 6), ()])
def test_flat_range_boxes_tile_the_range_in_order(shape: tuple[int, ...]) -> None:
    n = math.prod(shape)
    index = torch.arange(n).view(shape)
    gen = torch.Generator().manual_seed(len(shape))
    drawn = [tuple(sorted(torch.randint(0, n + 1, (2,), generator=gen).tolist())) for _ in range(20)]
    ranges = [(0, n), (0, 0)] + drawn
    for start, end in ranges:
        boxes = flat_range_boxes(shape, start, end)
        got = [index[tuple(slice(o, o + s) for o, s in zip(off, size))].reshape(-1) for off, size in boxes]
        got = torch.cat(got) if got else torch.zeros(0, dtype=torch.int64)
        assert torch.equal(got, torch.arange(start, end)), (shape, start, end, boxes)
        assert len(boxes) <= max(1, 2 * len(shape) - 1)


def test_async_save_writes_the_state_of_its_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = trained()
    at_call = full_state(model, opt)
    started, release = threading.Event(), threading.Event()
    real_write = checkpoint.api.write

    def slow_write(job, group=None):  # holds the write until training has changed the live tensors
        started.set()
        release.wait(30)
        return real_write(job, group)

    monkeypatch.setattr(checkpoint.api, "write", slow_write)
    handle = checkpoint.save_async(tmp_path, model, opt, extra={"step": 2})
    assert started.wait(30) and not handle.done()
    train(model, opt, range(2, 4))
    assert not store.complete(tmp_path)  # nothing is loadable before the write is sealed
    release.set()
    assert handle.wait() == checkpoint.latest(tmp_path)
    fresh, fresh_opt = _fresh()
    assert checkpoint.load(tmp_path, fresh, fresh_opt) == {"step": 2}
    assert_same(full_state(fresh, fresh_opt), at_call, "asynchronous save")
    assert not fresh.a.weight.equal(model.a.weight)  # training did change the live tensors meanwhile


def test_async_save_failure_raised_by_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = trained()
    monkeypatch.setattr("torch.distributed.checkpoint.filesystem._write_item", _fail)
    handle = checkpoint.save_async(tmp_path, model, opt)
    with pytest.raises(checkpoint.CheckpointError, match="(?s)asynchronous save .* failed.*injected failure"):
        handle.wait()
    monkeypatch.undo()
    checkpoint.save(tmp_path, model, opt)  # the failure was reported once; the next save proceeds


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_model_uses_plain_names(tmp_path: Path) -> None:
    model, opt = trained()
    checkpoint.save(tmp_path, torch.compile(model), opt)  # parameters named "_orig_mod.a.weight" there
    fresh, fresh_opt = _fresh()
    checkpoint.load(tmp_path, fresh, fresh_opt)
    assert_same(full_state(fresh, fresh_opt), full_state(model, opt), "torch.compile -> plain")
