"""What each spawned world size does in the checkpoint tests: one spawn per world size.

Each function runs on every rank (see ``tests/harness.py``) and returns full copies of the
states it saved or loaded, compared in the pytest process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel as DDP

from lion_sf_dist import checkpoint
from tests.checkpoint_cases import STEPS, Tiny, full_state, make_optimizer, train


def fsdp2(world: int, seed: int = 0, out: int = 3, hsdp: bool = False, tp: bool = False) -> Any:
    """:class:`Tiny` with ``fully_shard`` on each layer and the root, on all ranks
    (``hsdp``: on a (replicate=2, shard=W/2) mesh; ``tp``: tensor parallel over 2 ranks, then FSDP2)."""
    if tp:
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        model = parallelize_module(Tiny(seed, out), mesh["tp"], {"a": ColwiseParallel(), "b": RowwiseParallel()})
        fully_shard(model.a, mesh=mesh["dp"])
        fully_shard(model.b, mesh=mesh["dp"])
        return fully_shard(model, mesh=mesh["dp"])
    if hsdp:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    model = Tiny(seed, out)
    fully_shard(model.a, mesh=mesh)
    fully_shard(model.b, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def load_fresh(path: str, world: int, hsdp: bool = False, tp: bool = False, **kw: Any) -> dict[str, Any]:
    """Load ``path`` into a freshly initialised FSDP2 (HSDP, TP x FSDP2) model and optimizer; their full state."""
    model = fsdp2(world, seed=7, hsdp=hsdp, tp=tp)
    opt = make_optimizer(model)
    extra = checkpoint.load(path, model, opt, **kw)
    return {"state": full_state(model, opt), "extra": extra}


def resume_matches(rank: int, world: int, root: str) -> dict[str, Any]:
    """Train ``STEPS``, save, train ``STEPS`` more; a fresh model loading the save and training
    the last ``STEPS`` must end bitwise equal. Returns the saved and both final states."""
    model = fsdp2(world)
    opt = make_optimizer(model)
    train(model, opt, range(STEPS), rank, world)
    saved = full_state(model, opt)
    checkpoint.save(root, model, opt, extra={"step": STEPS, "world": world})
    train(model, opt, range(STEPS, 2 * STEPS), rank, world)
    model2 = fsdp2(world, seed=7)
    opt2 = make_optimizer(model2)
    extra = checkpoint.load(root, model2, opt2)
    train(model2, opt2, range(extra["step"], 2 * STEPS), rank, world)
    return {"saved": saved, "uninterrupted": full_state(model, opt), "resumed": full_state(model2, opt2),
            "extra": extra}


def wrong_model_error(root: str, world: int) -> str:
    """The message of loading ``root`` into a model whose ``b`` has 4 outputs, on every rank."""
    model = fsdp2(world, out=4)
    try:
        checkpoint.load(root, model, make_optimizer(model))
    except checkpoint.ModelMismatchError as e:
        return str(e)
    return "no error"


def world3(rank: int, world: int, root4: str, root3: str) -> dict[str, Any]:
    """4 -> 3 (when ``root4`` exists) and a W=3 save for 3 -> 4."""
    out: dict[str, Any] = {}
    if root4:
        out["from4"] = load_fresh(root4, world)
    else:
        out["resume"] = resume_matches(rank, world, root3)
    return out


def world4(rank: int, world: int, root3: str, root4: str) -> dict[str, Any]:
    """3 -> 4, a W=4 save with the bitwise resume check, and a wrong-model error at W=4."""
    return {"from3": load_fresh(root3, world), "hsdp_from3": load_fresh(root3, world, hsdp=True),
            "tp_from3": load_fresh(root3, world, tp=True),
            "resume": resume_matches(rank, world, root4),
            "wrong": wrong_model_error(root4, world)}


def world2(rank: int, world: int, root4: str, root1: str, root_ddp: str, root_fsdp2: str) -> dict[str, Any]:
    """4 -> 2 under FSDP2; single process -> DDP; a DDP save with resume check; an FSDP2 W=2 save."""
    out: dict[str, Any] = {"from4": load_fresh(root4, world)}
    ddp = DDP(Tiny(seed=7))
    opt = make_optimizer(ddp)
    extra = checkpoint.load(root1, ddp, opt)
    out["ddp_from1"] = {"state": full_state(ddp, opt), "extra": extra}
    ddp = DDP(Tiny())
    opt = make_optimizer(ddp)
    train(ddp, opt, range(STEPS), rank, world)
    out["ddp_saved"] = full_state(ddp, opt)
    checkpoint.save(root_ddp, ddp, opt, extra={"step": STEPS})
    train(ddp, opt, range(STEPS, 2 * STEPS), rank, world)
    ddp2 = DDP(Tiny(seed=7))
    opt2 = make_optimizer(ddp2)
    checkpoint.load(root_ddp, ddp2, opt2)
    train(ddp2, opt2, range(STEPS, 2 * STEPS), rank, world)
    out["ddp_uninterrupted"], out["ddp_resumed"] = full_state(ddp, opt), full_state(ddp2, opt2)
    model = fsdp2(world)
    opt = make_optimizer(model)
    train(model, opt, range(STEPS), rank, world)
    out["fsdp2_saved"] = full_state(model, opt)
    checkpoint.save(root_fsdp2, model, opt, extra={"step": STEPS})
    handle = checkpoint.save_async(root_fsdp2 + "_async", model, opt, extra={"step": STEPS})
    train(model, opt, range(STEPS, 2 * STEPS), rank, world)  # overlaps the write; must not leak into it
    handle.wait()
    out["async_loaded"] = load_fresh(root_fsdp2 + "_async", world)["state"]
    out["errors"] = {
        "missing": _error_of(root_fsdp2 + "_nowhere", world),
        "truncated": _truncated_error(root_fsdp2, world),
    }
    dist.barrier()
    return out


def _error_of(path: str, world: int) -> str:
    """``"Class: message"`` of loading ``path`` into an FSDP2 model on this rank."""
    try:
        load_fresh(path, world)
    except checkpoint.CheckpointError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _truncated_error(root: str, world: int) -> str:
    """The error of loading a copy of ``root``'s checkpoint whose first shard file rank 0 cut in half."""
    bad = Path(root + "_truncated")
    if dist.get_rank() == 0:
        shutil.copytree(checkpoint.latest(root), bad)
        shard = sorted(bad.glob("*.distcp"))[0]
        os.truncate(shard, shard.stat().st_size // 2)
    dist.barrier()
    return _error_of(str(bad), world)
