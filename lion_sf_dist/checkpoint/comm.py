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

    A failure on rank 0 is re-raised there; the other ranks raise the same checkpoint error
    (same class and message), or a :class:`CheckpointError` naming any other failure, so
    every rank fails alike and none waits for a collective rank 0 never joins.
    """
    if not distributed():
        return fn()
    box: list[Any] = [None, None]
    failure: Optional[Exception] = None
    if rank() == 0:
        try:
            box[0] = fn()
        except Exception as e:  # shared with the other ranks, then re-raised below
            failure = e
            # our own errors travel as they are (same class everywhere); others as text
            box[1] = e if type(e).__module__ == CheckpointError.__module__ else f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(box, src=0, group=group)
    if failure is not None:
        raise failure
    if isinstance(box[1], CheckpointError):
        raise box[1]
    if box[1] is not None:
        raise CheckpointError(f"rank 0 failed: {box[1]}")
    return box[0]


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
