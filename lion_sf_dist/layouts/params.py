"""The layout of parameters the optimizer holds itself: plain tensors (single process, DDP) and DTensors.

Plain tensors are whole parameters (under DDP every rank holds the same full replica with
the averaged gradient, so no reduction is needed). DTensors (FSDP2, HSDP, tensor parallel)
contribute their local shard; the process group to sum counts over comes from the mesh and
placements (:mod:`lion_sf_dist.layouts.dtensor`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from lion_sf_dist._torch_private import is_fsdp1_flat_param, local_shape_and_offset
from lion_sf_dist.layouts.base import Fragment, ParamGroups, Segment, State
from lion_sf_dist.layouts.dtensor import check_grad_layout, reduction_for
from lion_sf_dist.layouts.zero_internals import flattened_by_deepspeed
from lion_sf_dist.rounding import IndexMap
from lion_sf_dist.units import Units

_FSDP1_HELP = (
    "LionSF got a parameter flattened by FSDP1 (FullyShardedDataParallel): each rank holds an "
    "unmarked 1-D slice of it, so the agreement would be counted per shard and differ across ranks. "
    "Use FSDP2 instead (torch.distributed.fsdp.fully_shard, or HF Accelerate with fsdp_version=2): "
    "its DTensor parameters are supported exactly."
)
_UNATTACHED_HELP = (
    "LionSF is being stepped (or its state saved) by a DeepSpeed ZeRO engine it was not attached to: it would see flat "
    "per-rank partitions instead of parameters and count the sign agreement per partition, which "
    "differs across ranks. Build the engine with lion_sf_dist.deepspeed.initialize(...) instead of "
    "deepspeed.initialize(...), or call lion_sf_dist.deepspeed.attach(engine) on an engine built "
    "elsewhere (HF Accelerate, HF Trainer) before its first step."
)


def check_params(params: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` for parameters LionSF cannot step exactly."""
    for p in params:
        if is_fsdp1_flat_param(p):
            raise ValueError(f"{_FSDP1_HELP} (parameter of local shape {tuple(p.shape)})")
        if not p.is_floating_point():
            raise TypeError(
                f"LionSF steps floating-point parameters only; got one of dtype {p.dtype} and shape "
                f"{tuple(p.shape)} (integer and complex parameters have no sign update)"
            )


class ParamLayout:
    """Parameters held as they are: each is one segment (its local shard for a DTensor).

    State follows the parameters: a tensor that replaced another at the same position of
    ``param_groups`` (HF Accelerate's FSDP2 ``prepare`` swaps sharded DTensors in after the
    optimizer was built) inherits its ``exp_avg`` when the logical shape matches; the state
    of tensors no longer held is dropped.
    """

    def __init__(self) -> None:
        self._seen: list[Tensor] = []
        self.state_dtype: Optional[torch.dtype] = None
        self._indexes: dict[tuple, Optional[IndexMap]] = {}  # by (shape, mesh, placements): the probe runs once

    def init_state(
        self, param_groups: ParamGroups, state: State, original: Sequence[Sequence[Optional[Tensor]]], units: Units
    ) -> None:
        current = [p for group in param_groups for p in group["params"]]
        if len(current) == len(self._seen) and all(a is b for a, b in zip(current, self._seen)):
            return
        held = set(map(id, current))
        if any(p is not None and id(p) not in held and flattened_by_deepspeed(p) for ps in original for p in ps):
            raise RuntimeError(_UNATTACHED_HELP)
        check_params(current)
        for i, p in enumerate(current):
            if "exp_avg" in state.get(p, {}):
                continue
            old = self._seen[i] if i < len(self._seen) else None
            old_exp_avg = state.get(old, {}).get("exp_avg") if old is not None else None
            state[p] = {"exp_avg": _follow(old_exp_avg, p, self.state_dtype or p.dtype)}
        for stale in [k for k in state if isinstance(k, Tensor) and id(k) not in held]:
            del state[stale]
        self._seen = current

    def forget(self) -> None:
        """Check the held tensors against the state again at the next :meth:`init_state` (after a load)."""
        self._seen = []

    def _index(self, p: DTensor) -> Optional[IndexMap]:
        key = (p.shape, p.device_mesh, p.placements)
        if key not in self._indexes:
            self._indexes[key] = shard_index(p)
        return self._indexes[key]

    def segments(self, param_groups: ParamGroups, state: State, units: Units, *, indexed: bool = True) -> list[Segment]:
        """One segment per parameter that has a gradient (DTensors' ``index`` only when ``indexed``).

        A parameter without gradient takes no part in the step; a DTensor whose local shard
        is empty contributes nothing to count but its rank still joins the reduction.
        """
        segments = []
        position = -1
        for group, unit_ids in zip(param_groups, units.ids):
            for p, unit in zip(group["params"], unit_ids):
                position += 1
                if is_fsdp1_flat_param(p):  # wrapped by FSDP1 after the optimizer was built
                    raise ValueError(_FSDP1_HELP)
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError(
                        "LionSF does not support sparse gradients (got one for a parameter of shape "
                        f"{tuple(p.shape)}); use a dense embedding or another optimizer for it"
                    )
                if g.shape != p.shape:
                    raise ValueError(
                        f"a gradient of shape {tuple(g.shape)} was set on a parameter of shape "
                        f"{tuple(p.shape)}; LionSF steps each element with its own gradient"
                    )
                m = state[p]["exp_avg"]
                if isinstance(p, DTensor):
                    check_grad_layout(p, g)
                    process_group, counted = reduction_for(p.device_mesh, p.placements)
                    segments.append(
                        Segment(
                            p.to_local(),
                            g.to_local(),
                            m.to_local(),
                            unit,
                            group,
                            process_group,
                            counted,
                            position,
                            self._index(p) if indexed else None,
                        )
                    )
                else:
                    segments.append(
                        Segment(p, g, m, unit, group, param_id=position, index=IndexMap.slice(0, p.numel()))
                    )
        return segments

    def finish(self) -> None:
        """Nothing to propagate: the optimizer stepped the parameters themselves."""

    def fragments(
        self, param_groups: ParamGroups, state: State, original: Sequence[Sequence[Optional[Tensor]]], units: Units
    ) -> list[Fragment]:
        return [
            Fragment(p, unit, p.shape, p.detach(), state[p]["exp_avg"], whole=True)
            for group, ids in zip(param_groups, units.ids)
            for p, unit in zip(group["params"], ids)
        ]

    def refresh(self) -> None:
        """Nothing to refresh: the model computes with the tensors that were written."""


def _follow(old: Optional[Tensor], p: Tensor, dtype: torch.dtype) -> Tensor:
    """``exp_avg`` of ``dtype`` for ``p``: ``old`` laid out like ``p`` when of ``p``'s logical shape, else zeros."""
    if old is None or old.shape != p.shape:
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    full = old.full_tensor() if isinstance(old, DTensor) else old
    if isinstance(p, DTensor):
        return distribute_tensor(full.to(dtype), p.device_mesh, p.placements, src_data_rank=None)
    return full.to(dtype=dtype, device=p.device).clone()


def shard_index(p: DTensor) -> Optional[IndexMap]:
    """Where ``p``'s local shard sits in the logical parameter, or ``None`` when it is not one block.

    ``Shard``/``Replicate`` placements give one block by construction. Other placements
    (the ``_StridedShard`` of FSDP2 over tensor parallelism) go through the same offset
    computation, which is then checked against DTensor's own split of a coordinate probe
    (:func:`_is_block`): a placement whose local elements are not one block is refused.
    """
    local_shape, offsets = local_shape_and_offset(p)
    if all(type(pl) in (Shard, Replicate) for pl in p.placements) or _is_block(p, local_shape, offsets):
        return IndexMap.shard(p.shape, local_shape, offsets)
    return None


def _is_block(p: DTensor, local_shape: tuple[int, ...], offsets: tuple[int, ...]) -> bool:
    """Whether DTensor puts ``p``'s local element ``(i_0, ..., i_k)`` at logical ``(offsets[d] + i_d)_d``.

    For each dim, a tensor holding its coordinate along that dim (an expanded view: no
    logical-size memory) is split as ``p`` is, without communication, and compared with the
    coordinates the block would have.
    """
    local = p.to_local()
    if tuple(local.shape) != tuple(local_shape):
        return False
    for d, size in enumerate(p.shape):
        along = [1] * p.dim()
        along[d] = size
        probe = torch.arange(size, device=local.device).view(along).expand(p.shape)
        got = distribute_tensor(probe, p.device_mesh, p.placements, src_data_rank=None).to_local()
        along[d] = local_shape[d]
        want = torch.arange(offsets[d], offsets[d] + local_shape[d], device=local.device).view(along)
        if not torch.equal(got, want.expand(local_shape)):
            return False
    return True
