"""The spawned side of the DeepSpeed checkpoint tests (one spawn per world size).

W=3: a ZeRO-2 engine trains, saves, trains on; a fresh engine loads and trains the same
steps (must match bitwise); an FSDP2 model trains and saves. W=2: a ZeRO-3 engine loads the
ZeRO-2 checkpoint and saves again, an FSDP2 model loads the ZeRO-2 checkpoint, a second
ZeRO-3 engine loads the FSDP2 one. Full states come from DeepSpeed's own accessors.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from lion_sf_dist import checkpoint
from tests.checkpoint_cases import BATCH, STEPS, Tiny, batch, full_state, make_optimizer, train
from tests.checkpoint_worker import fsdp2


def setup(rank: int, world: int) -> None:
    """Environment DeepSpeed expects from a launcher; the harness already made the gloo group."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def engine(stage: int, world: int, seed: int = 0, **zero: Any) -> Any:
    """A ZeRO-``stage`` engine of :class:`Tiny` stepping an attached LionSF (two param groups);
    ``zero``: more ``zero_optimization`` settings."""
    from lion_sf_dist import deepspeed as lds

    model = Tiny(seed)
    config = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
              "train_batch_size": BATCH, "zero_optimization": {"stage": stage, **zero},
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
              "steps_per_print": 10 ** 9}
    eng, _, _, _ = lds.initialize(model=model, optimizer=make_optimizer(model), config=config)
    return eng


def train_engine(eng: Any, steps: range, rank: int, world: int) -> None:
    for step in steps:
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(eng(x.chunk(world)[rank]), y.chunk(world)[rank])
        eng.backward(loss)
        eng.step()
        with torch.no_grad():
            eng.module.seen += 1


def engine_state(eng: Any) -> dict[str, Any]:
    """Full fp32 params, buffers and ``exp_avg`` through DeepSpeed's accessors (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params, exp_avg = {}, {}
    for name, p in eng.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None under ZeRO-0: the parameter is the master
        state = safe_get_full_optimizer_state(p, "exp_avg")
        params[name] = (p.detach() if full is None else full).clone()
        exp_avg[name] = (eng.optimizer.state[p]["exp_avg"] if state is None else state).clone()
    return {"params": params, "buffers": {n: b.clone() for n, b in eng.module.named_buffers()}, "exp_avg": exp_avg,
            "ema": engine_ema(eng)}


def engine_ema(eng: Any) -> dict[str, torch.Tensor]:
    """Each parameter's unit's agreement average (zero where none is held yet)."""
    from lion_sf_dist import LionSF

    opt = eng.optimizer if isinstance(eng.optimizer, LionSF) else eng.optimizer.optimizer
    names = {id(p): n for n, p in eng.module.named_parameters()}
    averages = opt.agreement_average()
    out = {}
    for params, ids in zip(opt.original_params(), opt.units.ids):
        for p, unit in zip(params, ids):
            out[names[id(p)]] = averages[unit].clone() if averages is not None else torch.zeros(())
    return out


def world3(rank: int, world: int, root_z2: str, root_f3: str) -> dict[str, Any]:
    setup(rank, world)
    eng = engine(2, world)
    train_engine(eng, range(STEPS), rank, world)
    out: dict[str, Any] = {"z2_saved": engine_state(eng)}
    checkpoint.save(root_z2, eng, eng.optimizer, extra={"step": STEPS})
    train_engine(eng, range(STEPS, 2 * STEPS), rank, world)
    fresh = engine(2, world, seed=7)
    extra = checkpoint.load(root_z2, fresh, fresh.optimizer)
    train_engine(fresh, range(extra["step"], 2 * STEPS), rank, world)
    out["z2_uninterrupted"], out["z2_resumed"] = engine_state(eng), engine_state(fresh)
    model = fsdp2(world)
    opt = make_optimizer(model)
    train(model, opt, range(STEPS), rank, world)
    out["f3_saved"] = full_state(model, opt)
    checkpoint.save(root_f3, model, opt, extra={"step": STEPS})
    return out


def world2(rank: int, world: int, root_z2: str, root_f3: str, root_z3: str) -> dict[str, Any]:
    setup(rank, world)
    eng = engine(3, world, seed=7)
    out: dict[str, Any] = {"z3_extra": checkpoint.load(root_z2, eng, eng.optimizer)}
    out["z3_from_z2"] = engine_state(eng)
    out["z3_output"] = eng(batch(0)[0]).detach()  # computed with the bit16 copies the load refreshed
    checkpoint.save(root_z3, eng, eng.optimizer)
    model = fsdp2(world, seed=7)
    opt = make_optimizer(model)
    checkpoint.load(root_z2, model, opt)
    out["fsdp2_from_z2"] = full_state(model, opt)
    eng2 = engine(3, world, seed=7)
    checkpoint.load(root_f3, eng2, eng2.optimizer)
    out["z3_from_f3"] = engine_state(eng2)
    sub = engine(3, world, seed=7, sub_group_size=8, offload_optimizer={"device": "cpu"})
    checkpoint.load(root_z2, sub, sub.optimizer)
    out["z3sub_from_z2"], out["z3sub_output"] = engine_state(sub), sub(batch(0)[0]).detach()
    eng0 = engine(0, world, seed=7)
    checkpoint.load(root_z2, eng0, eng0.optimizer)
    out["z0_from_z2"] = engine_state(eng0)
    out["z0_output"] = eng0(batch(0)[0]).detach()
    eng3 = engine(3, world, seed=7)
    train_engine(eng3, range(1), rank, world)  # non-zero exp_avg of its own
    checkpoint.load(root_z2, eng3, eng3.optimizer, optimizer_state=False)
    out["z3_fresh_from_z2"] = engine_state(eng3)
    dist.barrier()
    return out
