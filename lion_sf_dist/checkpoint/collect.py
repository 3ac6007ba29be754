"""What a model and its LionSF hold, per logical parameter name, in the form DCP reads and writes.

One collector for every layout: the parameters the optimizer trains, and their
``exp_avg``, come from :meth:`LionSF.fragments` (whole tensors, DTensors, or 1-D slices of
ZeRO's flat fp32 masters); parameters it does not train and buffers come from the model.
Names are those of the unwrapped model's ``named_parameters()``, whatever wraps or shards
it, so a checkpoint holds the same logical tensors whatever wrote it:

- single process and DDP: full tensors (DCP writes each replicated tensor once);
- FSDP2 / HSDP / tensor parallel: DTensors, written shard by shard and resharded on load;
- ZeRO flat partitions: :class:`~lion_sf_dist.checkpoint.fragments.Fragments`, turned into
  boxes of the logical tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lion_sf_dist._torch_private import compiled_inner_module, persistent_buffers
from lion_sf_dist.checkpoint import comm
from lion_sf_dist.checkpoint.errors import CheckpointError
from lion_sf_dist.checkpoint.fragments import Fragments, flat_range_boxes, sharded_tensor
from lion_sf_dist.engines import is_deepspeed_engine, lionsf_of
from lion_sf_dist.layouts.zero_internals import logical_shape, partitioned_by_zero3
from lion_sf_dist.optimizer import LionSF

Local = Union[Tensor, Fragments]
_WRAPPER_TOKENS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


@dataclass
class Snapshot:
    """Local references to a model's and optimizer's tensors, by logical name.

    ``params``, ``buffers`` and ``exp_avg`` hold views of the live tensors (writing into them
    on load restores in place); ``ema`` holds each trained parameter's unit's agreement
    average (0-d float32). ``shapes``/``dtypes`` describe the logical (unsharded) tensors;
    ``optimizer_names`` the trained parameters per param group; ``unit_of`` their units.
    """

    kind: str
    params: dict[str, Local] = field(default_factory=dict)
    buffers: dict[str, Local] = field(default_factory=dict)
    exp_avg: dict[str, Local] = field(default_factory=dict)
    ema: dict[str, Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    optimizer_names: list[list[str]] = field(default_factory=list)
    unit_of: dict[str, int] = field(default_factory=dict)
    state_dtypes: dict[str, str] = field(default_factory=dict)  # dtype of each trained parameter's exp_avg


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP, ``torch.compile`` and DeepSpeed wrappers."""
    while True:
        inner = compiled_inner_module(model)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) or is_deepspeed_engine(model):
            wrapped = model.module
            assert isinstance(wrapped, nn.Module)
            model = wrapped
        elif inner is not None:
            model = inner
        else:
            return model


def optimizer_of(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Optional[torch.optim.Optimizer]:
    """The optimizer whose state is checkpointed: under DeepSpeed, the LionSF inside the engine."""
    if optimizer is None or not is_deepspeed_engine(model):
        return optimizer
    return lionsf_of(model)


def canonical(name: str) -> str:
    """``name`` without the tokens wrappers insert (compile, activation checkpointing, FSDP1)."""
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


def _reshard(module: nn.Module) -> None:
    """Put FSDP2 modules back to their sharded parameters.

    After a forward without backward (an evaluation) FSDP2 leaves the root module's
    parameters unsharded, as plain full tensors the optimizer does not hold.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _kind(model: Any, params: Mapping[str, Tensor]) -> str:
    if is_deepspeed_engine(model):
        return f"zero{model.zero_optimization_stage()}"
    if any(isinstance(p, DTensor) for p in params.values()):
        return "dtensor"
    return "ddp" if isinstance(model, torch.nn.parallel.DistributedDataParallel) else "plain"


def snapshot(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Snapshot:
    """The tensors of ``model`` (and ``optimizer``'s state when it is a LionSF) by logical name.

    Under DeepSpeed the trained parameters are always read from the engine's LionSF (its
    fp32 masters), with or without ``optimizer``.
    """
    inner = unwrap(model)
    _reshard(inner)
    params = {canonical(n): p for n, p in inner.named_parameters()}
    snap = Snapshot(kind=_kind(model, params))
    trainer = lionsf_of(model) if is_deepspeed_engine(model) else optimizer
    if isinstance(trainer, LionSF):
        _add_trained(snap, trainer, params)
    for name, p in params.items():
        if name in snap.params:
            continue
        if partitioned_by_zero3(p):
            raise NotImplementedError(
                f"checkpoint: parameter {name!r} is partitioned by ZeRO-3 but not trained by the LionSF "
                "(frozen); checkpoints of frozen ZeRO-3 parameters are not supported"
            )
        snap.params[name] = p.detach()
        _describe(snap, name, p.shape, p.dtype)
    for name, b in persistent_buffers(inner).items():
        snap.buffers[canonical(name)] = b.detach()
        _describe(snap, canonical(name), b.shape, b.dtype)
    if not isinstance(optimizer_of(model, optimizer), LionSF):
        snap.exp_avg, snap.ema, snap.optimizer_names, snap.unit_of, snap.state_dtypes = {}, {}, [], {}, {}
    return snap


def _describe(snap: Snapshot, name: str, shape: torch.Size, dtype: torch.dtype) -> None:
    snap.shapes[name] = tuple(shape)
    snap.dtypes[name] = str(dtype).removeprefix("torch.")


def _add_trained(snap: Snapshot, opt: LionSF, params: Mapping[str, Tensor]) -> None:
    """The parameters ``opt`` trains, their ``exp_avg`` and agreement averages, from its fragments."""
    name_of = {id(p): n for n, p in params.items()}

    def name(p: Tensor) -> str:
        if id(p) not in name_of:
            raise CheckpointError(
                f"the optimizer holds a tensor of shape {tuple(p.shape)} that is not a parameter of the model "
                "(build the optimizer from this model's parameters, after wrapping it)"
            )
        return name_of[id(p)]

    pieces: dict[str, list[tuple[int, Tensor]]] = {}
    states: dict[str, list[tuple[int, Tensor]]] = {}
    for f in opt.fragments():
        n = name(f.param)
        snap.state_dtypes.setdefault(n, str(f.exp_avg.dtype).removeprefix("torch."))
        if f.whole:
            snap.params[n], snap.exp_avg[n] = f.data, f.exp_avg.detach()
            _describe(snap, n, f.param.shape, f.param.dtype)
        else:
            pieces.setdefault(n, []).append((f.offset, f.data))
            states.setdefault(n, []).append((f.offset, f.exp_avg))
    snap.optimizer_names = [[name(p) for p in group] for group in opt.logical_params()]
    averages = opt.agreement_average() if opt.agreement_ema else None
    for group, ids in zip(snap.optimizer_names, opt.units.ids):
        for n, unit in zip(group, ids):
            snap.unit_of[n] = unit
            if averages is not None:
                snap.ema[n] = averages[unit].clone()
            if n in snap.params:
                continue
            shape = logical_shape(params[n])
            snap.params[n] = Fragments(shape, pieces.get(n, []))
            snap.exp_avg[n] = Fragments(shape, states.get(n, []))
            held = pieces.get(n)
            _describe(snap, n, shape, held[0][1].dtype if held else torch.float32)


def copied(snap: Snapshot) -> Snapshot:
    """``snap`` with every local tensor copied to host memory (same layout): a consistent copy to write later."""

    def host(t: Tensor) -> Tensor:
        return t.clone() if t.device.type == "cpu" else t.to(device="cpu")  # DTensors stay DTensors

    def copy(v: Local) -> Local:
        if isinstance(v, Fragments):
            return Fragments(v.shape, [(start, host(flat)) for start, flat in v.pieces])
        return host(v)

    return Snapshot(
        kind=snap.kind,
        params={n: copy(v) for n, v in snap.params.items()},
        buffers={n: copy(v) for n, v in snap.buffers.items()},
        exp_avg={n: copy(v) for n, v in snap.exp_avg.items()},
        ema={n: host(v) for n, v in snap.ema.items()},
        shapes=dict(snap.shapes),
        dtypes=dict(snap.dtypes),
        optimizer_names=[list(g) for g in snap.optimizer_names],
        unit_of=dict(snap.unit_of),
        state_dtypes=dict(snap.state_dtypes),
    )


def dcp_state(snap: Snapshot, *, optimizer_state: bool = True) -> dict[str, Any]:
    """The flat dict DCP saves from or loads into: ``param/``, ``buffer/``, ``exp_avg/``, ``agreement_ema/``.

    Collective when the snapshot holds fragments (their boxes are gathered once).
    """
    out: dict[str, Any] = {}
    groups = [("param", snap.params), ("buffer", snap.buffers)]
    if optimizer_state:
        groups.append(("exp_avg", snap.exp_avg))
    frags = {f"{prefix}/{n}": v for prefix, d in groups for n, v in d.items() if isinstance(v, Fragments)}
    boxes_by_rank = comm.all_gather({k: _boxes(f) for k, f in frags.items()}) if frags else []
    for prefix, d in groups:
        for name, value in d.items():
            key = f"{prefix}/{name}"
            if isinstance(value, Fragments):
                local = _fragments_entry(value, [b.get(key, []) for b in boxes_by_rank], snap.dtypes[name])
                if local is not None:
                    out[key] = local
            else:
                out[key] = value
    if optimizer_state:
        out.update({f"agreement_ema/{n}": v for n, v in snap.ema.items()})
    return out


def _boxes(frag: Fragments) -> list:
    return [b for start, flat in frag.pieces for b in flat_range_boxes(frag.shape, start, start + flat.numel())]


def _fragments_entry(frag: Fragments, boxes_by_rank: list, dtype: str) -> Optional[Tensor]:
    """A plain tensor when this rank holds all of it, nothing when none, else a ShardedTensor."""
    held = sum(flat.numel() for _, flat in frag.pieces)
    if not frag.pieces or held == 0:
        return None
    if len(frag.pieces) == 1 and held == frag.shape.numel():
        return frag.pieces[0][1].view(frag.shape)
    return sharded_tensor(frag, boxes_by_rank, comm.rank(), getattr(torch, dtype))
