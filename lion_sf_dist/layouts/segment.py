"""The unit of work the kernel sees: a local piece of one logical parameter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist
from torch import Tensor


@dataclass
class Segment:
    """Local views ``p``, ``g``, ``m`` (same shape) of one logical parameter's elements.

    ``reduce_group`` is the process group over which this piece's counts are summed so
    that every element of the logical parameter is counted once (``None``: this rank holds
    all of them). ``counted`` is false on a rank that holds a replica of elements another
    rank of ``reduce_group`` already counts.
    """

    p: Tensor
    g: Tensor
    m: Tensor
    unit: int
    group: dict[str, Any]
    reduce_group: Optional[dist.ProcessGroup] = None
    counted: bool = True
