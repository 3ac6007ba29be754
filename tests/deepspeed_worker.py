"""The spawned side of the DeepSpeed tests: one process group, many engines (engine setup is slow).

``run_cases(rank, world, cases)`` builds one engine per case on the CPU accelerator, trains
``STEPS`` steps with the same batch on every rank and returns, on every rank, the full
parameters and ``exp_avg`` gathered from the ranks' partitions.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from tests.deepspeed_cases import (
    HYPER,
    STEPS,
    Case,
    batch,
    launch_config,
    loss_of,
    make_model,
    param_groups,
    poison,
)


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
    if case.route == "json":
        engine, _, _, _ = lds.initialize(model=model, config=str(launch_config(case.stage)))
    elif case.route == "config":
        engine, _, _, _ = lds.initialize(model=model, config=cfg)
        assert cfg["optimizer"]["type"] == "LionSF" and "gradient_clipping" not in cfg, "caller's config was modified"
    elif case.route == "callable":
        engine, _, _, _ = lds.initialize(
            model=model, model_parameters=param_groups(model, case.two_groups),
            optimizer=lambda params: LionSF(params, lr=HYPER[0]["lr"], agreement=case.agreement), config=cfg)
    else:
        opt = LionSF(param_groups(model, case.two_groups), lr=HYPER[0]["lr"], **case.options())
        if case.route == "prestepped":
            x, y = batch(0)
            loss_of(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        init = deepspeed.initialize if case.route == "plain" else lds.initialize
        engine, _, _, _ = init(model=model, optimizer=opt, config=cfg)
    inner = engine.optimizer if isinstance(engine.optimizer, LionSF) else engine.optimizer.optimizer
    assert isinstance(inner, LionSF)
    return engine, inner


def gather_fragments(engine: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full params, exp_avg and per-element coverage counts rebuilt from every rank's ``LionSF.fragments()``."""
    from lion_sf_dist import LionSF

    opt = engine.optimizer if isinstance(engine.optimizer, LionSF) else engine.optimizer.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    mine = [(names[id(f.param)], tuple(f.shape), f.offset, f.data.reshape(-1).clone(), f.exp_avg.reshape(-1).clone(),
             f.whole) for f in opt.fragments()]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    params, exp_avg, cover = {}, {}, {}
    for frags in everyone:
        for name, shape, off, p, m, _replicated in frags:
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
    """Full params and exp_avg through DeepSpeed's own means (independent of our mapping).

    Parameters: stages 0-2 leave the model's (here fp32) parameters all-gathered after each
    step; stage 3 gathers them with ``safe_get_full_fp32_param``. ``exp_avg``:
    ``safe_get_full_optimizer_state``, or the state itself at stage 0.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params, exp_avg = {}, {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if engine.zero_optimization_stage() == 3 else None
        params[name] = (p.detach() if full is None else full).clone()
        if use_state:
            state = safe_get_full_optimizer_state(p, "exp_avg")
            exp_avg[name] = (opt.state[p]["exp_avg"] if state is None else state).clone()
    return params, exp_avg


def run_case(case: Case, world: int) -> dict[str, Any]:
    REDUCTIONS.clear()
    if case.route in ("resume", "resume_late"):
        return resume_case(case, world)
    if case.route == "unsupported":
        try:
            build(case, world)
        except (TypeError, NotImplementedError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        return {"error": None}
    if case.route.startswith("accelerate"):
        from tests.deepspeed_accelerate import accelerate_case

        res = accelerate_case(case, world)
        if res["error"] is not None:
            return {"error": res["error"]}
        engine, opt = res["engine"], res["opt"]
        return finish(case, engine, opt, None)
    engine, opt = build(case, world)
    REDUCTIONS.clear()  # count the engine's steps only
    replays = record_steps(engine, opt) if case.replay else None
    if case.local_counts:
        for part in opt.layout.partitions:
            part.process_group = None  # the control: count only this rank's elements
    error = None
    weight = dict(engine.module.named_parameters())["0.weight"]
    for step in range(case.first_step, STEPS):
        x, y = batch(step)
        if case.bf16:
            x, y = x.bfloat16(), y.bfloat16()
        hook = weight.register_hook(lambda g: poison(g.clone())) if step == case.poison else None
        try:
            for _ in range(case.gas):
                engine.backward(loss_of(engine, x, y))
                engine.step()  # a real step only at the accumulation boundary
        except RuntimeError as e:
            if case.route != "plain":
                raise
            error = str(e)
            break
        if hook is not None:
            hook.remove()
    out = finish(case, engine, opt, error)
    out["replays"] = replays
    return out


def _train(engine: Any, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        engine.backward(loss_of(engine, x, y))
        engine.step()


def resume_case(case: Case, world: int) -> dict[str, Any]:
    """DeepSpeed's own ``save_checkpoint`` after one step, ``load_checkpoint`` into a fresh engine, go on.

    Returns the resumed run's gathered tensors and the uninterrupted run's.
    """
    import tempfile

    holder: list[Any] = [tempfile.mkdtemp(prefix="lionsf_ds_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    engine, opt = build(case, world)
    _train(engine, range(1))
    engine.save_checkpoint(holder[0], tag="one")
    _train(engine, range(1, STEPS))
    uninterrupted = gather_fragments(engine)
    if case.route == "resume_late":
        from lion_sf_dist import deepspeed as lds

        engine, opt = build(dataclasses.replace(case, route="plain"), world)
        engine.load_checkpoint(holder[0], tag="one")  # LionSF.load_state_dict before any attach
        assert lds.attach(engine) is opt and lds.attach(engine) is opt  # the second attach changes nothing
    else:
        engine, opt = build(case, world)
        engine.load_checkpoint(holder[0], tag="one")
    _train(engine, range(1, STEPS))
    resumed = gather_fragments(engine)
    dist.barrier()
    if dist.get_rank() == 0:
        import shutil

        shutil.rmtree(holder[0])
    return {"error": None, "uninterrupted": uninterrupted, "resumed": resumed}


def _snapshot(layout: Any, segments: list, names: dict[int, str], grads: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Full ``p`` (and ``g``), ``m`` of every parameter, gathered from all ranks' segments of one engine step.

    The ZeRO layout hands one segment per slice of each partition, in partition and slice order.
    """
    slices = [sl for part in layout.partitions for sl in part.slices]
    assert len(slices) == len(segments)
    mine = [(names[id(sl.param)], sl.shape, sl.param_offset, seg.p.clone(), seg.g.clone() if grads else None,
             seg.m.clone()) for sl, seg in zip(slices, segments) if sl.numel]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    full: dict[str, dict[str, torch.Tensor]] = {}
    for frags in everyone:
        for name, shape, off, p, g, m in frags:
            n = torch.Size(shape).numel()
            entry = full.setdefault(name, {"p": torch.zeros(n), "g": torch.zeros(n), "m": torch.zeros(n),
                                           "shape": torch.Size(shape)})
            for key, value in (("p", p), ("g", g), ("m", m)):
                if value is not None:
                    entry[key][off:off + value.numel()] = value
    return full


def record_steps(engine: Any, opt: Any) -> list:
    """Wrap the layout to log, per engine step, the full tensors before and after the optimizer's update."""
    layout = opt.layout
    names = {id(p): n for n, p in engine.module.named_parameters()}
    real_segments, real_finish = layout.segments, layout.finish
    log: list = []
    current: list = []

    def segments(*args: Any, **kwargs: Any) -> Any:
        out = real_segments(*args, **kwargs)
        if out is not None:
            current[:] = [out, _snapshot(layout, out, names, grads=True)]
        return out

    def finish() -> None:
        real_finish()
        if current:
            segs, before = current
            log.append((before, _snapshot(layout, segs, names, grads=False)))
            current.clear()

    layout.segments, layout.finish = segments, finish
    return log


def finish(case: Case, engine: Any, opt: Any, error: Optional[str]) -> dict[str, Any]:
    """What the test compares: gathered params and ``exp_avg`` (both ways), coverage, scales."""
    from lion_sf_dist.layouts import zero_internals as zi

    zo = engine.optimizer
    stage = engine.zero_optimization_stage()
    attrs = zi.STAGE3_ATTRS if stage == 3 else zi.STAGE12_ATTRS if stage else ()
    markers = ("ds_id", "ds_numel", "ds_shape") if stage == 3 else ("_hp_mapping",) if stage else ()
    params = list(engine.module.parameters())
    out: dict[str, Any] = {
        "error": error, "clip": engine.gradient_clipping(), "stage": stage,
        "reductions": list(REDUCTIONS),
        "partitions": len(getattr(opt.layout, "partitions", [])),
        "missing_attrs": [n for n in attrs if not hasattr(zo, n)],
        "missing_markers": [m for m in markers for p in params if not hasattr(p, m)],
        "flattened": [zi.flattened_by_deepspeed(p) for p in params],
    }
    if error is None:
        # DeepSpeed's stage 1/2 optimizer-state views assume the original parameter order: skip
        # them under round-robin ordering (the fragments below cover that case).
        out["ds_params"], out["ds_exp_avg"] = gather_deepspeed(engine, opt, use_state=not case.round_robin)
        out["params"], out["exp_avg"], out["cover"] = gather_fragments(engine)
        out["scale"] = opt.last_scale.clone()
    return out


REDUCTIONS: list[int] = []


def _count_reductions() -> None:
    """Record, per ``reduce_counts`` call, how many collectives it issues (groups of more than one rank)."""
    import lion_sf_dist.optimizer as module

    real = module.reduce_counts

    def counting(slotted: torch.Tensor, groups: list) -> torch.Tensor:
        REDUCTIONS.append(sum(1 for g in groups if g is not None and dist.get_world_size(g) > 1))
        return real(slotted, groups)

    module.reduce_counts = counting


def run_cases(rank: int, world: int, cases: list[Case]) -> dict[str, Any]:
    """Every case on this rank: ``{case name: result}``, plus ``"_seconds"`` per case."""
    setup(rank, world)
    _count_reductions()
    results: dict[str, Any] = {"_seconds": {}}
    for case in cases:
        t = time.time()
        results[case.name] = run_case(case, world)
        results["_seconds"][case.name] = time.time() - t
    return results
