"""The spawned side of the DeepSpeed tests: one process group, many engines (engine setup is slow).

``run_cases(rank, world, cases)`` builds one engine per case on the CPU accelerator, trains
``STEPS`` steps with the same batch on every rank and returns, on every rank, the full
parameters and ``exp_avg`` gathered from the ranks' partitions.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

from tests.deepspeed_cases import HYPER, STEPS, Case, batch, loss_of, make_model, param_groups


def setup(rank: int, world: int) -> None:
    """Environment DeepSpeed expects from a launcher; the harness already made the gloo group."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def build(case: Case, world: int) -> tuple[Any, Any]:
    """``(engine, LionSF)`` for ``case`` through its route."""
    import deepspeed

    from lion_sf_dist import LionSF
    from lion_sf_dist import deepspeed as lds

    model = make_model()
    cfg = case.config(world)
    if case.route == "config":
        engine, _, _, _ = lds.initialize(model=model, config=cfg)
    elif case.route == "callable":
        engine, _, _, _ = lds.initialize(
            model=model, model_parameters=param_groups(model, case.two_groups),
            optimizer=lambda params: LionSF(params, lr=HYPER[0]["lr"], agreement=case.agreement), config=cfg)
    else:
        opt = LionSF(param_groups(model, case.two_groups), lr=HYPER[0]["lr"], agreement=case.agreement)
        init = deepspeed.initialize if case.route == "plain" else lds.initialize
        engine, _, _, _ = init(model=model, optimizer=opt, config=cfg)
    inner = engine.optimizer if isinstance(engine.optimizer, LionSF) else engine.optimizer.optimizer
    assert isinstance(inner, LionSF)
    return engine, inner


def gather_fragments(engine: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full params, exp_avg and per-element coverage counts rebuilt from every rank's ``zero_fragments``."""
    from lion_sf_dist.layouts.zero import zero_fragments

    mine = [(f.name, tuple(f.shape), f.offset, f.param.clone(), f.exp_avg.clone(), f.replicated)
            for f in zero_fragments(engine)]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    params, exp_avg, cover = {}, {}, {}
    for frags in everyone:
        for name, shape, off, p, m, replicated in frags:
            if name not in params:
                n = torch.Size(shape).numel()
                params[name], exp_avg[name] = torch.zeros(n), torch.zeros(n)
                cover[name] = torch.zeros(n, dtype=torch.int64)
            params[name][off:off + p.numel()] = p
            exp_avg[name][off:off + p.numel()] = m
            cover[name][off:off + p.numel()] += 1
        if frags and frags[0][5]:
            break  # replicated (ZeRO-0): one rank's copy is the whole
    shapes = {name: torch.Size(shape) for frags in everyone for name, shape, *_ in frags}
    return ({k: v.view(shapes[k]) for k, v in params.items()}, {k: v.view(shapes[k]) for k, v in exp_avg.items()},
            cover)


def gather_deepspeed(engine: Any, opt: Any, use_state: bool) -> tuple[dict, dict]:
    """Full params and exp_avg through DeepSpeed's own public accessors (independent of our mapping)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params, exp_avg = {}, {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        params[name] = (p.detach() if full is None else full).clone()
        if use_state:
            state = safe_get_full_optimizer_state(p, "exp_avg")
            exp_avg[name] = (opt.state[p]["exp_avg"] if state is None else state).clone()
    return params, exp_avg


def run_case(case: Case, world: int) -> dict[str, Any]:
    engine, opt = build(case, world)
    if case.local_counts:
        for part in opt._layout.partitions:
            part.process_group = None  # the control: count only this rank's elements
    x, y = batch()
    error = None
    for _ in range(STEPS):
        loss = loss_of(engine, x, y)
        engine.backward(loss)
        try:
            engine.step()
        except RuntimeError as e:
            if case.route != "plain":
                raise
            error = str(e)
            break
    out: dict[str, Any] = {"error": error, "clip": engine.gradient_clipping()}
    if error is None:
        # DeepSpeed's stage 1/2 optimizer-state views assume the original parameter order: skip
        # them under round-robin ordering (the fragments below cover that case).
        out["ds_params"], out["ds_exp_avg"] = gather_deepspeed(engine, opt, use_state=not case.round_robin)
        out["params"], out["exp_avg"], out["cover"] = gather_fragments(engine)
        out["scale"] = opt.last_scale.clone()
    return out


def run_cases(rank: int, world: int, cases: list[Case]) -> dict[str, Any]:
    """Every case on this rank: ``{case name: result}``, plus ``"_seconds"`` per case."""
    setup(rank, world)
    results: dict[str, Any] = {"_seconds": {}}
    for case in cases:
        t = time.time()
        results[case.name] = run_case(case, world)
        results["_seconds"][case.name] = time.time() - t
    return results
