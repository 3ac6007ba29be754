"""What each rank does in the two-rank safety tests (``tests/test_checkpoint_safety.py``).

Each case runs on every rank (see ``tests/harness.py``) and records, per rank, the error it
raised (class and message), how long it took to raise, and whether the running model and
optimizer were left as they were.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as fs

from lion_sf_dist import checkpoint
from lion_sf_dist.checkpoint.storage import METADATA, SafeReader
from lion_sf_dist.checkpoint.verification import Verification
from tests.checkpoint_cases import STEPS, Tiny, full_state, make_optimizer, train
from tests.checkpoint_worker import fsdp2


def _outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    """``{"error": "Class: message" or None, "seconds": time to return or raise}`` of ``fn()``."""
    t0 = time.perf_counter()
    try:
        fn()
        error = None
    except checkpoint.CheckpointError as e:
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "seconds": time.perf_counter() - t0}


def _unpicklable() -> Any:
    return lambda: None  # a lambda does not pickle


def one_rank_bad(rank: int, world: int, root: str) -> dict[str, Any]:
    """Bad input on rank 1 only: an unpicklable ``extra``, another model at save, another at load."""
    model = Tiny()
    opt = make_optimizer(model)
    out = {"extra": _outcome(lambda: checkpoint.save(root, model, opt,
                                                     extra=_unpicklable() if rank == 1 else {"step": 1}))}
    other = Tiny(out=4) if rank == 1 else Tiny()
    out["save_model"] = _outcome(lambda: checkpoint.save(root, other, make_optimizer(other)))
    checkpoint.save(root, model, opt, extra={"step": 1})
    out["load_model"] = _outcome(lambda: checkpoint.load(root, other, make_optimizer(other)))
    out["complete"] = [d.name for d in Path(root).iterdir() if d.name.startswith("ckpt-")]
    return out


def garbled_file_of_one_rank(rank: int, world: int, root: str) -> dict[str, Any]:
    """A load whose shard file only one rank reads is garbled (same size), with ``hparams="checkpoint"``.

    Without agreement averages the only replicated tensor is the buffer, written into one
    rank's file, which every rank reads; the other file holds only its writer's FSDP2
    shards, so only that rank reads it (and finds it corrupt).
    """
    model = fsdp2(world)
    opt = make_optimizer(model, ema=False)
    train(model, opt, range(STEPS), rank, world)
    ckpt = checkpoint.save(root, model, opt, extra={"step": STEPS})
    train(model, opt, range(STEPS, STEPS + 2), rank, world)
    opt.param_groups[0]["lr"], opt.pow = 5e-3, 1.0  # differ from the checkpoint's 1e-2 and 0.5
    before = full_state(model, opt)
    md = pickle.loads((ckpt / METADATA).read_bytes())  # our own checkpoint: trusted
    shared = {info.relative_path for index, info in md.storage_data.items() if index.fqn.startswith("buffer/")}
    (garbled,) = sorted({info.relative_path for info in md.storage_data.values()} - shared)
    if rank == 0:
        data = bytearray((ckpt / garbled).read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
        (ckpt / garbled).write_bytes(bytes(data))
    dist.barrier()
    hashing = _record_hashing()
    out = _outcome(lambda: checkpoint.load(root, model, opt, hparams="checkpoint"))
    after = full_state(model, opt)
    out["unchanged"] = all(torch.equal(before[k][n], after[k][n]) for k in before for n in before[k])
    out["hparams"] = (opt.param_groups[0]["lr"], opt.pow)
    out["garbled"] = garbled
    out["hashing"] = hashing
    return out


def _record_hashing() -> list[tuple[str, list[str]]]:
    """From now on in this process: ``("start", files)`` / ``("start in plan", files)`` (begun from
    ``SafeReader.prepare_local_plan``) and ``("check", files)``, in the order they happen."""
    events: list[tuple[str, list[str]]] = []
    planning: list[bool] = []
    start, check, plan = Verification.start, Verification.check, SafeReader.prepare_local_plan

    def in_plan(self: SafeReader, local: Any) -> Any:
        planning.append(True)
        try:
            return plan(self, local)
        finally:
            planning.pop()

    def started(self: Verification, names: list[str]) -> None:
        events.append(("start in plan" if planning else "start", sorted(names)))
        start(self, names)

    def checked(self: Verification, names: list[str]) -> None:
        events.append(("check", sorted(names)))
        check(self, names)

    SafeReader.prepare_local_plan, Verification.start, Verification.check = in_plan, started, checked
    return events


def async_then_destroy(rank: int, world: int, root: str, store: str) -> dict[str, Any]:
    """``save_async`` then at once ``destroy_process_group()``, rank 1's writes slowed down.

    A new process group is made afterwards (``store``) for the harness's own teardown.
    """
    model = fsdp2(world)
    opt = make_optimizer(model)
    train(model, opt, range(STEPS), rank, world)
    saved = full_state(model, opt)
    if rank == 1:
        write = fs._write_item

        def slow_write(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.3)
            return write(*args, **kwargs)

        fs._write_item = slow_write
    handle = checkpoint.save_async(root, model, opt, extra={"step": STEPS})
    error = None
    try:
        dist.destroy_process_group()
    except checkpoint.CheckpointError as e:
        error = f"{type(e).__name__}: {e}"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    return {"saved": saved, "error": error, "path": str(handle.path), "done": handle.done()}
