"""DeepSpeed engines: each rank's ZeRO fragments as logical-parameter pieces, and the refresh after a load.

The fp32 master weights and ``exp_avg`` that ZeRO partitions are stored (padding dropped),
as slices of each logical parameter, via :func:`lion_sf_dist.layouts.zero.zero_fragments`;
loading writes into the same slices of the running engine's partitions (any stage, any world
size), then refreshes the bit16 weights DeepSpeed computes with. The engine's LionSF must be
attached (:func:`lion_sf_dist.deepspeed.initialize` or ``attach``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lion_sf_dist.checkpoint.collect import Snapshot, describe_tensor, persistent_buffers, canonical
from lion_sf_dist.checkpoint.fragments import Fragments


def client_optimizer(engine: Any) -> Any:
    """The LionSF an engine steps (inside its ZeRO optimizer, if any)."""
    from lion_sf_dist.layouts.zero_internals import client_optimizer as inner, zero_stage_of
    from lion_sf_dist.optimizer import LionSF

    opt = inner(engine.optimizer) if zero_stage_of(engine.optimizer) else engine.optimizer
    if not isinstance(opt, LionSF):
        raise TypeError(f"checkpoint: the DeepSpeed engine steps {type(opt).__name__}; lion_sf_dist.checkpoint "
                        "saves engines stepping a LionSF (lion_sf_dist.deepspeed.initialize or attach)")
    return opt


def zero_snapshot(engine: Any, optimizer: Optional[torch.optim.Optimizer]) -> Snapshot:
    """Logical pieces of ``engine``'s master parameters, buffers and (given ``optimizer``) ``exp_avg``."""
    from lion_sf_dist.layouts.zero import zero_fragments

    module: nn.Module = engine.module
    opt = client_optimizer(engine)
    params = {canonical(n): p for n, p in module.named_parameters()}
    name_of = {id(p): n for n, p in params.items()}
    trainable = [[name_of[id(p)] for p in group if p is not None] for group in opt.original_params()]
    snap = Snapshot(kind=f"zero{getattr(engine, 'zero_optimization_stage', lambda: '?')()}")
    pieces: dict[str, list] = {n: [] for names in trainable for n in names}
    states: dict[str, list] = {n: [] for n in pieces}
    whole: dict[str, Any] = {}
    for f in zero_fragments(engine):
        name = canonical(f.name)
        if f.replicated:
            whole[name] = (f.param.view(f.shape), f.exp_avg.view(f.shape))
        else:
            pieces[name].append((f.offset, f.param))
            states[name].append((f.offset, f.exp_avg))
    for name, p in params.items():
        shape = torch.Size(getattr(p, "ds_shape", p.shape))
        snap.shapes[name] = tuple(shape)
        if name in whole:
            snap.params[name] = whole[name][0]
            snap.exp_avg[name] = whole[name][1]
        elif name in pieces:
            snap.params[name] = Fragments(shape, pieces[name])
            snap.exp_avg[name] = Fragments(shape, states[name])
        elif hasattr(p, "ds_id"):
            raise NotImplementedError(
                f"checkpoint: parameter {name!r} is partitioned by ZeRO-3 but not trained by the LionSF "
                "(frozen); checkpoints of frozen ZeRO-3 parameters are not supported")
        else:
            snap.params[name] = p.detach()
        held = snap.params[name]
        dtype = held.pieces[0][1].dtype if isinstance(held, Fragments) and held.pieces else (
            torch.float32 if isinstance(held, Fragments) else held.dtype)
        snap.dtypes[name] = str(dtype).removeprefix("torch.")
    for name, b in persistent_buffers(module).items():
        snap.buffers[name] = b.detach()
        describe_tensor(snap, name, b)
    if optimizer is None:
        snap.exp_avg = {}
    else:
        snap.optimizer_names = trainable
        snap.ema = _ema_by_name(opt, name_of)
    return snap


def _unit_by_name(opt: Any, name_of: dict[int, str]) -> dict[str, int]:
    """Agreement unit of every trained parameter, by name (units are kept by position)."""
    return {name_of[id(p)]: u for params, ids in zip(opt.original_params(), opt.units.ids)
            for p, u in zip(params, ids) if p is not None and id(p) in name_of}


def _ema_vector(opt: Any) -> Optional[torch.Tensor]:
    """The per-unit agreement average ZeRO 1-3 keep in every partition's state, if any."""
    return next((st["agreement_ema"] for st in opt.state.values()
                 if st.get("agreement_ema") is not None and st["agreement_ema"].dim() == 1), None)


def _ema_by_name(opt: Any, name_of: dict[int, str]) -> dict[str, torch.Tensor]:
    """Each trained parameter's unit's agreement average (0-d float32), as the other layouts store it."""
    if not getattr(opt, "agreement_ema", False):
        return {}
    vector = _ema_vector(opt)
    param_of = {name_of[id(p)]: p for params in opt.original_params() for p in params
                if p is not None and id(p) in name_of}
    out = {}
    for name, unit in _unit_by_name(opt, name_of).items():
        own = opt.state.get(param_of[name], {}).get("agreement_ema")  # ZeRO-0: LionSF keeps it per parameter
        value = own if own is not None else (vector[unit] if vector is not None else None)
        if value is not None:
            out[name] = value.detach().float().cpu().clone()
    return out


def install_ema(engine: Any, ema: dict[str, torch.Tensor]) -> bool:
    """Give a ZeRO 1-3 engine's partitions the loaded per-unit averages; ``False`` under ZeRO-0
    (its LionSF keeps them per parameter, as without DeepSpeed)."""
    from lion_sf_dist.layouts.zero_internals import zero_stage_of

    if not zero_stage_of(engine.optimizer):
        return False
    opt = client_optimizer(engine)
    name_of = {id(p): canonical(n) for n, p in engine.module.named_parameters()}
    vector = torch.zeros(opt.units.count, dtype=torch.float32)
    for name, unit in _unit_by_name(opt, name_of).items():
        if name in ema:
            vector[unit] = ema[name]
    for state in opt.state.values():
        if ema:
            state["agreement_ema"] = vector  # the layout adopts it (and its device) at the next step
        else:
            state.pop("agreement_ema", None)
    return True


def refresh(engine: Any) -> None:
    """Recompute the bit16 weights DeepSpeed computes with from the (just loaded) fp32 masters; collective."""
    from lion_sf_dist.layouts.zero_internals import zero_stage_of

    zo = engine.optimizer
    stage = zero_stage_of(zo)
    if stage == 1:
        zo.update_lp_params()
    elif stage == 3:
        for i in range(len(zo.fp32_partitioned_groups_flat)):
            zo._reassign_or_swap_out_partitioned_parameters(i)
        if zo.persistent_parameters:
            zo.persistent_parameters[0].all_gather(zo.persistent_parameters)
        invalidate = getattr(zo, "invalidate_secondary_tensor", None)
        if invalidate is not None:
            invalidate()
