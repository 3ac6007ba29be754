"""DTensor parameters (FSDP2, HSDP, tensor parallel): local shards and the group to reduce over."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, TypeVar

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement

# One process group per set of global ranks: two meshes (or mesh dims) over the same
# ranks share one reduction instead of issuing one collective each.
_by_ranks: dict[tuple[int, ...], dist.ProcessGroup] = {}
_canonical_of: dict[int, tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}
_mesh_group_of: dict[int, tuple[DeviceMesh, dist.ProcessGroup]] = {}
_world_seen: list[Optional[dist.ProcessGroup]] = [None]


def _forget_dead_groups() -> None:
    """Drop cached groups when the default process group was destroyed and made anew."""
    if _world_seen[0] is not dist.group.WORLD:
        _by_ranks.clear()
        _canonical_of.clear()
        _mesh_group_of.clear()
        _world_seen[0] = dist.group.WORLD


def _ranks_group(ranks: tuple[int, ...], found: Optional[dist.ProcessGroup]) -> dist.ProcessGroup:
    """The process group used for ``ranks``: ``WORLD`` for all ranks, else the first one seen (or a new one)."""
    if len(ranks) == dist.get_world_size():
        world = dist.group.WORLD
        assert world is not None, "a process group exists: a DTensor was laid out over it"
        return world
    _forget_dead_groups()
    if ranks not in _by_ranks:
        # Only the member ranks create the group (use_local_synchronization): a sub-mesh's
        # sibling meshes on other ranks build their own groups in the same step.
        _by_ranks[ranks] = found if found is not None else dist.new_group(list(ranks), use_local_synchronization=True)
    return _by_ranks[ranks]


_Key = TypeVar("_Key")


def _memo(
    table: dict[int, tuple[_Key, dist.ProcessGroup]], key: _Key, compute: Callable[[], dist.ProcessGroup]
) -> dist.ProcessGroup:
    """``compute()`` once per live ``key`` object (by identity; ``step()`` asks every step)."""
    _forget_dead_groups()
    hit = table.get(id(key))
    if hit is None or hit[0] is not key:
        hit = (key, compute())
        table[id(key)] = hit
    return hit[1]


def _canonical(group: dist.ProcessGroup) -> dist.ProcessGroup:
    return _memo(_canonical_of, group, lambda: _ranks_group(tuple(sorted(dist.get_process_group_ranks(group))), group))


def _whole_mesh_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    return _memo(_mesh_group_of, mesh, lambda: _ranks_group(tuple(sorted(mesh.mesh.flatten().tolist())), None))


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
    # Anything neither replicated nor partial splits elements: Shard and also _StridedShard
    # (FSDP over TP), for which is_shard() is false.
    shard_dims = [d for d, pl in enumerate(placements) if not pl.is_replicate()]
    if not shard_dims:
        return None, True
    if len(shard_dims) == 1:
        # Each replica row reduces among its own shards and gets the full count.
        return _canonical(mesh.get_group(shard_dims[0])), True
    coord = mesh.get_coordinate()
    assert coord is not None, "this rank holds a shard of the DTensor, so it is in its mesh"
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
