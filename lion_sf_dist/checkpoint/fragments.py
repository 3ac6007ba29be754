"""Contiguous ranges of a flattened tensor as rectangular boxes, and as DCP ShardedTensors.

ZeRO-style layouts hold each parameter as 1-D fragments: elements ``[start, end)`` of the
row-major flattened tensor. DCP stores rectangular chunks of the logical (N-D) tensor, so a
fragment is cut into at most ``2 * ndim - 1`` boxes, each a contiguous slice of the fragment.
The checkpoint then holds the same logical tensor whatever the layout that wrote it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from lion_sf_dist import _torch_private

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


@dataclass
class Fragments:
    """This rank's pieces of one logical tensor: ``(start, flat)`` with ``flat`` a 1-D view of
    elements ``[start, start + flat.numel())`` of the row-major flattened tensor of ``shape``."""

    shape: torch.Size
    pieces: list[tuple[int, Tensor]] = field(default_factory=list)


def flat_range_boxes(shape: Sequence[int], start: int, end: int) -> list[Box]:
    """Boxes covering elements ``[start, end)`` of a row-major tensor of ``shape``, in flat order."""
    shape = tuple(shape)
    if not 0 <= start <= end <= math.prod(shape):
        raise ValueError(f"range [{start}, {end}) outside a tensor of shape {shape}")
    if start == end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,))] if shape else [((), ())]
    row = math.prod(shape[1:])
    r0, c0 = divmod(start, row)
    r1, c1 = divmod(end, row)
    inner = shape[1:]
    if r0 == r1:
        return [((r0, *o), (1, *s)) for o, s in flat_range_boxes(inner, c0, c1)]
    boxes: list[Box] = []
    if c0:
        boxes += [((r0, *o), (1, *s)) for o, s in flat_range_boxes(inner, c0, row)]
        r0 += 1
    if r1 > r0:
        boxes.append(((r0,) + (0,) * len(inner), (r1 - r0, *inner)))
    if c1:
        boxes += [((r1, *o), (1, *s)) for o, s in flat_range_boxes(inner, 0, c1)]
    return boxes


def fragment_boxes(frag: Fragments) -> list[tuple[Box, Tensor]]:
    """Every box of ``frag``'s pieces with its data: a view of the piece shaped like the box."""
    out = []
    for start, flat in frag.pieces:
        pos = 0
        for offsets, sizes in flat_range_boxes(frag.shape, start, start + flat.numel()):
            n = math.prod(sizes)
            out.append(((offsets, sizes), flat[pos : pos + n].view(sizes)))
            pos += n
    return out


def sharded_tensor(frag: Fragments, boxes_by_rank: Sequence[Sequence[Box]], rank: int, dtype: torch.dtype) -> Tensor:
    """A DCP-writable (and -loadable) ShardedTensor whose local shards are views of ``frag``.

    ``boxes_by_rank[r]`` lists rank ``r``'s boxes of this tensor (every rank's, gathered),
    which ShardedTensor needs as global metadata.
    """
    local = [(offsets, sizes, data) for (offsets, sizes), data in fragment_boxes(frag)]
    everyone = [(r, offsets, sizes) for r, boxes in enumerate(boxes_by_rank) for offsets, sizes in boxes]
    return _torch_private.sharded_tensor(local, everyone, frag.shape, rank, dtype)
