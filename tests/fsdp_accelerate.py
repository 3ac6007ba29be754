"""HF Accelerate's own FSDP2 ``prepare`` on CPU, inside a gloo rank (see ``tests/fsdp_worker.py``).

Accelerate enables FSDP only for GPU backends; on CPU its FSDP2 path is reached by
building ``Accelerator(cpu=True, fsdp_plugin=...)`` and setting the states'
``distributed_type`` and ``fsdp_plugin`` by hand. ``prepare`` then ``fully_shard`` s the
model and swaps the sharded DTensors into the optimizer's ``param_groups`` after the
optimizer was built (its state still keyed by the old parameters). ``save_state`` and
``load_state`` then go through ``torch.distributed.checkpoint`` with ``exp_avg`` as a DTensor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from tests.fsdp_cases import STEPS, full_grads, make_optimizer, tiny_model
from tests.fsdp_layouts import full, set_grads


def _save_step_load(accelerator: Any, named: list, opt: Any) -> dict[str, bool]:
    """``accelerator.save_state``, one more step, ``load_state``: are params and exp_avg back, exactly?"""
    where = [tempfile.mkdtemp(prefix="lion_sf_acc_") if dist.get_rank() == 0 else ""]
    dist.broadcast_object_list(where, src=0)
    try:
        accelerator.save_state(where[0])
        before = {n: (full(p), full(opt.state[p]["exp_avg"])) for n, p in named}
        set_grads(named, full_grads(STEPS))
        opt.step()
        moved = any(not torch.equal(full(p), before[n][0]) for n, p in named)
        accelerator.load_state(where[0])
        back = all(torch.equal(full(p), before[n][0]) and torch.equal(full(opt.state[p]["exp_avg"]), before[n][1])
                   for n, p in named)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(where[0], ignore_errors=True)
    return {"moved": moved, "back": back}


def accelerate_case(rank: int, world: int, option: str) -> dict[str, Any]:
    """``STEPS`` steps of a LionSF prepared by Accelerate (FSDP2), gradients set directly."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    # As Accelerate does on GPU (AcceleratorState.__init__): the shared PartialState says FSDP too,
    # or the next AcceleratorState() (in save_state) copies MULTI_CPU back.
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    model = tiny_model()
    opt = make_optimizer(list(model.named_parameters()), option)
    model, opt = accelerator.prepare(model, opt)
    sd = opt.state_dict()
    named = list(model.named_parameters())
    for step in range(STEPS):
        set_grads(named, full_grads(step))
        opt.step()
    inner = opt.optimizer
    saved = _save_step_load(accelerator, named, inner)
    return {
        "restored": saved,
        "param_types": sorted({type(p).__name__ for g in inner.param_groups for p in g["params"]}),
        "state_keys": sorted(sd["state"]),
        "exp_avg_types": sorted({type(s["exp_avg"]).__name__ for s in sd["state"].values()}),
        "n_params": len(named),
        "params": {n: full(p) for n, p in named},
        "exp_avg": {n: full(inner.state[p]["exp_avg"]) for n, p in named},
    }
