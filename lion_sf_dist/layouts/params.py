"""The optimizer's own parameters as segments: plain tensors (single process, DDP) and DTensors.

Plain tensors are whole parameters (under DDP every rank holds the same full replica, so
no reduction is needed). DTensors (FSDP2, HSDP, tensor parallel) contribute their local
shard; the group to sum counts over comes from the mesh and placements.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor
from torch.distributed.tensor import DTensor

from lion_sf_dist.layouts.dtensor import check_grad_layout, reduction_for
from lion_sf_dist.layouts.segment import Segment
from lion_sf_dist.units import Units

_FSDP1_HELP = (
    "LionSF got a parameter flattened by FSDP1 (FullyShardedDataParallel): each rank holds an "
    "unmarked 1-D slice of it, so the agreement would be counted per shard and differ across ranks. "
    "Use FSDP2 instead (torch.distributed.fsdp.fully_shard, or HF Accelerate with fsdp_version=2): "
    "its DTensor parameters are supported exactly."
)


def check_params(params: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` for parameters no layout can count exactly (FSDP1's flattened shards)."""
    for p in params:
        if getattr(p, "_fsdp_flattened", False):
            raise ValueError(f"{_FSDP1_HELP} (parameter of local shape {tuple(p.shape)})")


def param_segments(param_groups: Sequence[dict[str, Any]], state: dict[Tensor, dict[str, Any]], units: Units) -> list[Segment]:
    """One segment per parameter that has a gradient and local elements.

    A parameter without gradient takes no part in the step; a DTensor whose local shard
    is empty contributes nothing to count but its rank still joins the reduction.
    """
    segments = []
    for group, unit_ids in zip(param_groups, units.ids):
        for p, unit in zip(group["params"], unit_ids):
            if getattr(p, "_fsdp_flattened", False):  # wrapped by FSDP1 after the optimizer was built
                raise ValueError(_FSDP1_HELP)
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise ValueError("LionSF does not support sparse gradients (got one for a parameter of shape "
                                 f"{tuple(p.shape)}); use a dense embedding or another optimizer for it")
            m = state[p]["exp_avg"]
            if isinstance(p, DTensor):
                check_grad_layout(p, g)
                reduce_group, counted = reduction_for(p.device_mesh, p.placements)
                segments.append(Segment(p.to_local(), g.to_local(), m.to_local(), unit, group, reduce_group, counted))
            else:
                segments.append(Segment(p, g, m, unit, group))
    return segments
