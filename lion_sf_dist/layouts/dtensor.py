"""DTensor parameters (FSDP2, HSDP, tensor parallel): local shards and the group to reduce over."""

from __future__ import annotations

from typing import Optional, Sequence

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement

_mesh_groups: dict[tuple[int, ...], dist.ProcessGroup] = {}


def _whole_mesh_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    ranks = tuple(sorted(mesh.mesh.flatten().tolist()))
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    if ranks not in _mesh_groups:
        # new_group is collective over the world: every rank reaches this at the same
        # parameter of the same first step, since they all hold the same parameters.
        _mesh_groups[ranks] = dist.new_group(list(ranks))
    return _mesh_groups[ranks]


def reduction_for(mesh: DeviceMesh, placements: Sequence[Placement]) -> tuple[Optional[dist.ProcessGroup], bool]:
    """``(group, counted)`` for a DTensor laid out as ``placements`` over ``mesh``.

    Summing the local counts over ``group``, with ranks where ``counted`` is false adding
    nothing, counts every element of the logical tensor exactly once.
    """
    if any(pl.is_partial() for pl in placements):
        raise ValueError(
            f"a DTensor gradient with a Partial placement ({tuple(placements)}) holds unreduced sums; "
            "LionSF needs the reduced gradient: redistribute it to the parameter's placements first"
        )
    shard_dims = [d for d, pl in enumerate(placements) if pl.is_shard()]
    if not shard_dims:
        return None, True
    if len(shard_dims) == 1:
        # Each replica row reduces among its own shards and gets the full count.
        return mesh.get_group(shard_dims[0]), True
    coord = mesh.get_coordinate()
    counted = all(coord[d] == 0 for d, pl in enumerate(placements) if pl.is_replicate())
    return _whole_mesh_group(mesh), counted


def check_grad_layout(p: DTensor, g: DTensor) -> None:
    """Raise unless ``g`` is laid out exactly like ``p``."""
    if not isinstance(g, DTensor) or g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        got = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else type(g).__name__
        if isinstance(g, DTensor):
            reduction_for(g.device_mesh, g.placements)
        raise ValueError(
            f"gradient layout {got} differs from its parameter's ({p.device_mesh}, {tuple(p.placements)}); "
            "LionSF updates each local shard with its own gradient shard"
        )
