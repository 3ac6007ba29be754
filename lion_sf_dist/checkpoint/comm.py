"""The few collectives a checkpoint needs, which fall back to local calls without a process group."""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import torch.distributed as dist

from lion_sf_dist.checkpoint.errors import CheckpointError

T = TypeVar("T")


def distributed() -> bool:
    """Whether a default process group is initialised (a collective save/load)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if distributed() else 1


def on_rank0(fn: Callable[[], T], group: Optional[dist.ProcessGroup] = None) -> T:
    """``fn()`` run on rank 0 only, its result (or failure) shared with every rank of ``group``.

    A failure on rank 0 is re-raised there and raised as a :class:`CheckpointError`
    naming it on the other ranks, so no rank waits for a collective rank 0 never joins.
    """
    if not distributed():
        return fn()
    box: list[Any] = [None, None]
    if rank() == 0:
        try:
            box[0] = fn()
        except Exception as e:  # shared with the other ranks, then re-raised below
            box[1] = e
    dist.broadcast_object_list(box, src=0, group=group)
    if box[1] is not None:
        if rank() == 0:
            raise box[1]
        raise CheckpointError(f"rank 0 failed: {type(box[1]).__name__}: {box[1]}")
    return box[0]


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
