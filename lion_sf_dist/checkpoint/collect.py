"""What a model and optimizer hold, per logical parameter name, in the form DCP reads and writes.

Every layout maps to the same logical names and shapes (those of the unwrapped model's
``named_parameters()``), whatever wraps or shards it:

- single process and DDP: full tensors (DCP writes each replicated tensor once);
- FSDP2 / HSDP / tensor parallel: DTensors, written shard by shard and resharded on load;
- ZeRO-style flat partitions: :class:`~lion_sf_dist.checkpoint.fragments.Fragments`,
  turned into boxes of the logical tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lion_sf_dist.checkpoint import comm
from lion_sf_dist.checkpoint.errors import CheckpointError
from lion_sf_dist.checkpoint.fragments import Fragments, flat_range_boxes, sharded_tensor

Local = Union[Tensor, Fragments]
_WRAPPER_TOKENS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


@dataclass
class Snapshot:
    """Local references to a model's and optimizer's tensors, by logical name.

    ``params``, ``buffers`` and ``exp_avg`` hold views of the live tensors (writing into them
    on load restores in place); ``ema`` holds each parameter's 0-d ``agreement_ema``.
    ``shapes``/``dtypes`` describe the logical (unsharded) tensors.
    """

    kind: str
    params: dict[str, Local] = field(default_factory=dict)
    buffers: dict[str, Local] = field(default_factory=dict)
    exp_avg: dict[str, Local] = field(default_factory=dict)
    ema: dict[str, Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    optimizer_names: list[list[str]] = field(default_factory=list)  # per param group


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP, ``torch.compile`` and DeepSpeed wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) or is_engine(model):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def is_engine(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeed engine (checked without importing DeepSpeed)."""
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def optimizer_of(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Optional[torch.optim.Optimizer]:
    """The optimizer whose state is checkpointed: under DeepSpeed, the LionSF inside the engine."""
    if optimizer is None or not is_engine(model):
        return optimizer
    from lion_sf_dist.checkpoint.zero import client_optimizer

    return client_optimizer(model)


def canonical(name: str) -> str:
    """``name`` without the tokens wrappers insert (compile, activation checkpointing, FSDP1)."""
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


def persistent_buffers(module: nn.Module) -> dict[str, Tensor]:
    """The buffers ``module.state_dict()`` would hold, by canonical name (shared ones once)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for mname, m in module.named_modules():
        for bname, b in m._buffers.items():
            if b is None or bname in m._non_persistent_buffers_set or id(b) in seen:
                continue
            seen.add(id(b))
            out[canonical(f"{mname}.{bname}" if mname else bname)] = b
    return out


def describe_tensor(snap: Snapshot, name: str, t: Tensor) -> None:
    """Record ``t``'s logical shape and dtype under ``name``."""
    snap.shapes[name] = tuple(t.shape)
    snap.dtypes[name] = str(t.dtype).removeprefix("torch.")


def _reshard(module: nn.Module) -> None:
    """Put FSDP2 modules back to their sharded parameters.

    After a forward without backward (an evaluation) FSDP2 leaves the root module's
    parameters unsharded, as plain full tensors the optimizer does not hold.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def snapshot(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Snapshot:
    """The tensors of ``model`` (and ``optimizer``'s state when given) by logical name."""
    if is_engine(model):
        from lion_sf_dist.checkpoint.zero import zero_snapshot

        return zero_snapshot(model, optimizer)
    inner = unwrap(model)
    _reshard(inner)
    params = {canonical(n): p for n, p in inner.named_parameters()}
    kind = "dtensor" if any(isinstance(p, DTensor) for p in params.values()) else (
        "ddp" if isinstance(model, torch.nn.parallel.DistributedDataParallel) else "plain")
    snap = Snapshot(kind=kind)
    for name, p in params.items():
        snap.params[name] = p.detach()
        describe_tensor(snap, name, p)
    for name, b in persistent_buffers(inner).items():
        snap.buffers[name] = b.detach()
        describe_tensor(snap, name, b)
    if optimizer is not None:
        by_id = {id(p): n for n, p in params.items()}
        _add_optimizer(snap, optimizer, by_id)
    return snap


def _add_optimizer(snap: Snapshot, optimizer: torch.optim.Optimizer, by_id: dict[int, str]) -> None:
    sync = getattr(optimizer, "_sync_state", None)
    if sync is not None:
        sync()  # state follows parameters swapped into param_groups (SPEC section 5)
    for group in optimizer.param_groups:
        names = []
        for p in group["params"]:
            name = by_id.get(id(p))
            if name is None:
                raise CheckpointError(
                    f"the optimizer holds a tensor of shape {tuple(p.shape)} that is not a parameter of the model "
                    "(build the optimizer from this model's parameters, after wrapping it)")
            names.append(name)
            state = optimizer.state.get(p, {})
            if "exp_avg" in state:
                snap.exp_avg[name] = state["exp_avg"].detach()
            if "agreement_ema" in state:
                snap.ema[name] = state["agreement_ema"].detach().float().clone()
        snap.optimizer_names.append(names)


def copied(snap: Snapshot) -> Snapshot:
    """``snap`` with every local tensor copied to host memory (same layout): a consistent copy to write later."""

    def host(t: Tensor) -> Tensor:
        return t.clone() if t.device.type == "cpu" else t.to(device="cpu")  # DTensors stay DTensors

    def copy(v: Local) -> Local:
        if isinstance(v, Fragments):
            return Fragments(v.shape, [(start, host(flat)) for start, flat in v.pieces])
        return host(v)

    return Snapshot(kind=snap.kind, params={n: copy(v) for n, v in snap.params.items()},
                    buffers={n: copy(v) for n, v in snap.buffers.items()},
                    exp_avg={n: copy(v) for n, v in snap.exp_avg.items()},
                    ema={n: host(v) for n, v in snap.ema.items()}, shapes=dict(snap.shapes),
                    dtypes=dict(snap.dtypes), optimizer_names=[list(g) for g in snap.optimizer_names])


def dcp_state(snap: Snapshot, *, optimizer_state: bool = True) -> dict[str, Any]:
    """The flat dict DCP saves from or loads into: ``param/``, ``buffer/``, ``exp_avg/``, ``agreement_ema/``.

    Collective when the snapshot holds fragments (their boxes are gathered once).
    """
    out: dict[str, Any] = {}
    groups = [("param", snap.params), ("buffer", snap.buffers)]
    if optimizer_state:
        groups.append(("exp_avg", snap.exp_avg))
    frags = {f"{prefix}/{n}": v for prefix, d in groups for n, v in d.items() if isinstance(v, Fragments)}
    if frags:
        boxes_by_rank = comm.all_gather({k: _boxes(f) for k, f in frags.items()})
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
