"""Summing per-unit counts across ranks: one int64 all_reduce per process group per step."""

from __future__ import annotations

from typing import Optional, Sequence

import torch.distributed as dist
from torch import Tensor


def reduce_counts(slotted: Tensor, groups: Sequence[Optional[dist.ProcessGroup]]) -> Tensor:
    """Sum ``slotted[k]`` (each ``[U, 3]`` int64) over ``groups[k]``, then over ``k``.

    Slot ``k`` holds the counts of the segments whose elements are spread over the ranks
    of ``groups[k]`` (``None``: held whole by this rank). All collectives are issued
    before any is waited on, and nothing here reads a tensor value on the host.
    """
    works = [
        dist.all_reduce(slotted[k], group=group, async_op=True)
        for k, group in enumerate(groups)
        if group is not None and dist.get_world_size(group) > 1
    ]
    for work in works:
        work.wait()
    return slotted.sum(0)
