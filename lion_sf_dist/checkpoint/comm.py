"""The few collectives a checkpoint needs, which fall back to local calls without a process group.

Failures are shared: a step that fails on one rank raises on every rank of the group, with
the same error class and message for this package's errors, so no rank waits in a
collective that another rank has left (which would hang until the process-group timeout).
"""

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


def _shareable(e: Exception) -> Any:
    """What travels to the other ranks for ``e``: our own errors as they are (same class
    everywhere), any other as its text (it may not unpickle elsewhere)."""
    return e if type(e).__module__ == CheckpointError.__module__ else f"{type(e).__name__}: {e}"


def _raise_shared(shared: Any, source: int) -> None:
    """Raise, on a rank that did not fail itself, the failure ``shared`` by rank ``source``."""
    if isinstance(shared, CheckpointError):
        raise shared
    raise CheckpointError(f"rank {source} failed: {shared}")


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
            box[1] = _shareable(e)
    dist.broadcast_object_list(box, src=0, group=group)
    if failure is not None:
        raise failure
    if box[1] is not None:
        _raise_shared(box[1], 0)
    return box[0]


def agree(fn: Callable[[], T], group: Optional[dist.ProcessGroup] = None) -> T:
    """``fn()`` run on every rank of ``group``, raising on all of them if it failed on any.

    One small collective (every rank's outcome, gathered) after ``fn``: a rank whose ``fn``
    failed re-raises its own error; the others raise the lowest failing rank's (same class
    and message for this package's errors, else a :class:`CheckpointError` naming it). So
    no rank goes on into a step (a collective, a commit, a change to the running model)
    that another rank cannot take, and none waits for the process-group timeout.
    ``fn`` must not itself start a collective some rank could skip by failing earlier.
    """
    if not distributed():
        return fn()
    result: Optional[T] = None
    failure: Optional[Exception] = None
    try:
        result = fn()
    except Exception as e:  # shared with the other ranks, then re-raised below
        failure = e
    outcomes: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(outcomes, None if failure is None else _shareable(failure), group=group)
    if failure is not None:
        raise failure
    for source, shared in enumerate(outcomes):
        if shared is not None:
            _raise_shared(shared, source)
    return result  # type: ignore[return-value]


def all_gather(obj: T, group: Optional[dist.ProcessGroup] = None) -> list[T]:
    """Every rank's ``obj``, in rank order."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
