"""The chunked eager path (the CPU default): tensor by tensor, in flat chunks of :data:`CHUNK` elements.

Temporaries are a few chunks, so they stay in a core's cache, and a float32 count over a
chunk is exact. Non-contiguous tensors go whole (up to ``EXACT_FLOAT_COUNT`` elements).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lion_sf_dist.kernel import update
from lion_sf_dist.rounding import Rounding, stochastic_bf16

# Eager temporaries are a few chunks of this many elements (1 MiB in fp32): they stay in cache.
CHUNK = 1 << 18


def _flat_chunks(size: int, *tensors: Tensor) -> list[tuple[int, tuple[Tensor, ...]]]:
    """``(offset, pieces)``: matching flat pieces of at most ``size`` elements (whole tensors if not contiguous)."""
    if not all(t.is_contiguous() for t in tensors):
        if tensors[0].numel() > update.EXACT_FLOAT_COUNT:
            raise ValueError(
                f"LionSF's eager kernel needs contiguous tensors above {update.EXACT_FLOAT_COUNT} elements "
                f"(got one of shape {tuple(tensors[0].shape)}); "
                "use use_triton=True or a contiguous layout"
            )
        return [(0, tensors)]
    flats = [t.view(-1) for t in tensors]
    return [(i, tuple(f[i : i + size] for f in flats)) for i in range(0, flats[0].numel(), size)]


def _draws(
    rounding: Optional[Rounding], seg: int, start: int, shape: torch.Size
) -> Optional[tuple[Optional[update.Draw], Optional[update.Draw]]]:
    """The stochastic-rounding functions for ``p`` and ``m`` of local elements ``start..`` of segment ``seg``."""
    if rounding is None:
        return None
    return _draw_fn(rounding, seg, 0, start, shape), _draw_fn(rounding, seg, 1, start, shape)


def _draw_fn(rounding: Rounding, seg: int, stream: int, start: int, shape: torch.Size) -> update.Draw:
    def draw(value: Tensor) -> Tensor:
        return stochastic_bf16(value, rounding.bits(seg, stream, start, shape, value.device))

    return draw


def count(
    ms: Sequence[Tensor], gs: Sequence[Tensor], beta1s: Sequence[float], scratch: Optional[update.Scratch] = None
) -> Tensor:
    """``[S, 2]``: :func:`~lion_sf_dist.kernel.update.count_agreement` of each ``(m, g)``, summed over its chunks.

    Each chunk leaves two float32 sums (:func:`~lion_sf_dist.kernel.update.agreement_sums`);
    they are stacked once per step and reduced per tensor, a few small ops per tensor
    instead of per chunk. ``scratch``: where the temporaries go (default: fresh tensors).
    """
    agree: list[Tensor] = []
    poison: list[Tensor] = []
    pieces: list[int] = []
    for m, g, beta1 in zip(ms, gs, beta1s):
        chunks = _flat_chunks(CHUNK, m, g)
        for _, (mc, gc) in chunks:
            a, z = update.agreement_sums(mc, gc, beta1, scratch)
            agree.append(a)
            poison.append(z)
        pieces.append(len(chunks))
    a_all = torch.stack(agree).to(torch.int64)
    z_all = torch.stack(poison)
    if any(n != 1 for n in pieces):
        a_all = torch.stack([a.sum() for a in a_all.split(pieces)])
        z_all = torch.stack([z.sum() for z in z_all.split(pieces)])
    return torch.stack((a_all, z_all.isnan().to(torch.int64)), dim=1)


def apply(
    ps: Sequence[Tensor],
    ms: Sequence[Tensor],
    gs: Sequence[Tensor],
    values: update.StepValues,
    only: Optional[Sequence[int]] = None,
    scratch: Optional[update.Scratch] = None,
) -> None:
    """:func:`~lion_sf_dist.kernel.update.apply_update` chunk by chunk on segments ``only`` (default: all).

    ``scratch``: where the temporaries go (default: fresh tensors).
    """
    a_all, d_all, k_all = values.step_size.unbind(), values.decay.unbind(), values.keep.unbind()
    rounding = values.rounding
    for i in range(len(ps)) if only is None else only:
        chunks = _flat_chunks(CHUNK, ps[i], ms[i], gs[i])
        draws = None if rounding is None else [_draws(rounding, i, start, pc.shape) for start, (pc, _, _) in chunks]
        pieces = [(pc, mc, gc) for _, (pc, mc, gc) in chunks]
        beta1, beta2 = values.beta1s[i], values.beta2s[i]
        update.apply_pieces(pieces, a_all[i], d_all[i], k_all[i], beta1, beta2, draws, scratch)
