"""The chunked eager path (the CPU default): tensor by tensor, in flat chunks of :data:`CHUNK` elements.

Temporaries are a few chunks, so they stay in a core's cache, and a float32 count over a
chunk is exact. Non-contiguous tensors go whole (up to ``EXACT_FLOAT_COUNT`` elements).
Small tensors of one shape, dtypes and betas (biases, norms) are stacked as rows and
stepped as one piece (:data:`~lion_sf_dist.kernel.tensors.STACK_NUMEL`), with the same
arithmetic per element.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lion_sf_dist import _torch_private
from lion_sf_dist.kernel import update
from lion_sf_dist.kernel.tensors import STACK_MIN, STACK_NUMEL, by_key, pick
from lion_sf_dist.rounding import Rounding, stochastic_bf16

# Eager temporaries are a few chunks of this many elements (1 MiB in fp32): they stay in cache.
CHUNK = 1 << 18


def _flat_chunks(size: int, *tensors: Tensor) -> list[tuple[int, tuple[Tensor, ...]]]:
    """``(offset, pieces)``: matching flat pieces of at most ``size`` elements.

    Tensors of at most ``size`` elements, and non-contiguous ones, are one piece as they are
    (the stages are elementwise).
    """
    if tensors[0].numel() <= size:
        return [(0, tensors)]
    if not all(t.is_contiguous() for t in tensors):
        if tensors[0].numel() > update.EXACT_FLOAT_COUNT:
            raise ValueError(
                f"LionSF's eager kernel needs contiguous tensors above {update.EXACT_FLOAT_COUNT} elements "
                f"(got one of shape {tuple(tensors[0].shape)}); "
                "use use_triton=True or a contiguous layout"
            )
        return [(0, tensors)]
    splits = [t.view(-1).split(size) for t in tensors]
    return [(i * size, pieces) for i, pieces in enumerate(zip(*splits))]


def _stacks(
    lists: Sequence[Sequence[Tensor]], betas: Sequence[tuple[float, ...]], among: Sequence[int]
) -> list[list[int]]:
    """Groups of positions ``among`` whose tensors are stepped stacked as rows: at most :data:`STACK_NUMEL`
    elements each, :data:`STACK_MIN` or more of one shape, device, dtypes and betas, and at most
    :data:`CHUNK` elements a stack (its temporaries are scratch buffers)."""
    kinds: list[Optional[tuple]] = []
    for i in among:
        ts = [tensors[i] for tensors in lists]
        small = ts[0].numel() <= STACK_NUMEL
        kinds.append((ts[0].shape, ts[0].device, betas[i], *(t.dtype for t in ts)) if small else None)
    out: list[list[int]] = []
    for kind, idx in by_key(kinds).items():
        if kind is not None and len(idx) >= STACK_MIN:
            rows = max(CHUNK // max(kind[0].numel(), 1), 1)
            out.extend(pick(among, idx[start : start + rows]) for start in range(0, len(idx), rows))
    return [idx for idx in out if len(idx) >= STACK_MIN]


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


class Signs:
    """The update's sign of each element, ``sign(m * b1 + g * (1 - b1))``, kept from the count stage for the
    apply stage of the same step (int8: one byte per element, in a buffer kept from step to step).

    Both stages need it; reading it back spares the apply stage three of its eight
    operations per chunk. A record holds the ``m`` and ``g`` it was computed from and their
    version counters: it serves only those tensors, unchanged since, with the same ``beta1``;
    anything else is computed afresh. Taking the records ends them. Not thread-safe.
    """

    def __init__(self) -> None:
        self._by_device: dict[torch.device, Tensor] = {}
        self._records: dict[tuple[int, int], tuple[Tensor, Tensor, int, int, float, Tensor]] = {}

    def record(
        self, ms: Sequence[Tensor], gs: Sequence[Tensor], beta1s: Sequence[float], among: Sequence[int]
    ) -> dict[int, Tensor]:
        """Flat int8 slots for the signs of tensors ``among``, by position, recorded; earlier records end."""
        self._records.clear()
        needed: dict[torch.device, int] = {}
        for i in among:
            needed[ms[i].device] = needed.get(ms[i].device, 0) + ms[i].numel()
        for device, n in needed.items():
            if device not in self._by_device or self._by_device[device].numel() < n:
                self._by_device.pop(device, None)  # freed before its successor is allocated
                self._by_device[device] = torch.empty(n, dtype=torch.int8, device=device)
        used = dict.fromkeys(needed, 0)
        slots: dict[int, Tensor] = {}
        for i in among:
            m, g, n = ms[i], gs[i], ms[i].numel()
            start = used[m.device]
            slots[i] = self._by_device[m.device][start : start + n]
            used[m.device] = start + n
            self._records[id(m), id(g)] = (
                m,
                g,
                _torch_private.version(m),
                _torch_private.version(g),
                beta1s[i],
                slots[i],
            )
        return slots

    def take(
        self, ms: Sequence[Tensor], gs: Sequence[Tensor], beta1s: Sequence[float], among: Sequence[int]
    ) -> dict[int, Tensor]:
        """The recorded slots still valid for tensors ``among``, by position; every record then ends."""
        valid: dict[int, Tensor] = {}
        for i in among:
            entry = self._records.get((id(ms[i]), id(gs[i])))
            if entry is None:
                continue
            m, g, m_version, g_version, beta1, slot = entry
            unchanged = _torch_private.version(m) == m_version and _torch_private.version(g) == g_version
            if unchanged and beta1 == beta1s[i]:  # the record holds m and g alive: same ids, same tensors
                valid[i] = slot
        self._records.clear()
        return valid


def _slot_pieces(slot: Tensor, chunks: Sequence[tuple[int, tuple[Tensor, ...]]]) -> Sequence[Tensor]:
    """``slot`` (a tensor's flat signs, in the order of its elements) cut as :func:`_flat_chunks` cut the tensor."""
    if len(chunks) == 1:
        return [slot.view(chunks[0][1][0].shape)]
    return slot.split(CHUNK)


def count(
    ms: Sequence[Tensor],
    gs: Sequence[Tensor],
    beta1s: Sequence[float],
    scratch: Optional[update.Scratch] = None,
    signs: Optional[Signs] = None,
) -> Tensor:
    """``[S, 2]``: :func:`~lion_sf_dist.kernel.update.count_agreement` of each ``(m, g)``, summed over its chunks
    (``A`` is 0 where ``P > 0``).

    Each chunk (or stacked row) leaves one float32 sum
    (:func:`~lion_sf_dist.kernel.update.agreement_sum`, NaN for a non-finite gradient); they
    are stacked once per step and reduced per tensor, a few small ops per tensor instead of
    per chunk. ``scratch``: where the temporaries go (default: fresh tensors). ``signs``:
    where the update's signs of the tensors not stacked are recorded for :func:`apply`.
    """
    stacked: dict[int, Tensor] = {}
    for idx in _stacks((ms, gs), [(b,) for b in beta1s], range(len(ms))):
        m, g = torch.stack(pick(ms, idx)), torch.stack(pick(gs, idx))
        stacked.update(zip(idx, update.agreement_sum(m, g, beta1s[idx[0]], scratch, rows=True).unbind()))
    alone = [i for i in range(len(ms)) if i not in stacked]
    slots = signs.record(ms, gs, beta1s, alone) if signs is not None else {}
    sums: list[Tensor] = []
    pieces: list[int] = []
    for i, (m, g, beta1) in enumerate(zip(ms, gs, beta1s)):
        if i in stacked:
            sums.append(stacked[i])
            pieces.append(1)
            continue
        chunks = _flat_chunks(CHUNK, m, g)
        out = _slot_pieces(slots[i], chunks) if i in slots else [None] * len(chunks)
        sums.extend(update.agreement_sum(mc, gc, beta1, scratch, signs=o) for (_, (mc, gc)), o in zip(chunks, out))
        pieces.append(len(chunks))
    totals = torch.stack(sums)
    poison = totals.isnan()
    agree = torch.where(poison, 0.0, totals).to(torch.int64)
    if any(n != 1 for n in pieces):
        poison = torch.stack([z.any() for z in poison.split(pieces)])
        agree = torch.stack([a.sum() for a in agree.split(pieces)]) * ~poison
    return torch.stack((agree, poison.to(torch.int64)), dim=1)


def apply(
    ps: Sequence[Tensor],
    ms: Sequence[Tensor],
    gs: Sequence[Tensor],
    values: update.StepValues,
    only: Optional[Sequence[int]] = None,
    scratch: Optional[update.Scratch] = None,
    signs: Optional[Signs] = None,
) -> None:
    """:func:`~lion_sf_dist.kernel.update.apply_update` chunk by chunk (or stacked) on segments ``only``
    (default: all).

    ``scratch``: where the temporaries go (default: fresh tensors). ``signs``: the update's
    signs :func:`count` recorded, read back where still valid. With stochastic rounding
    nothing is stacked: a piece's random bits follow its elements' positions.
    """
    a_all, d_all, k_all = values.step_size.unbind(), values.decay.unbind(), values.keep.unbind()
    rounding = values.rounding
    todo = range(len(ps)) if only is None else only
    slots = signs.take(ms, gs, values.beta1s, todo) if signs is not None else {}
    stacks = [] if rounding is not None else _stacks((ps, ms, gs), list(zip(values.beta1s, values.beta2s)), todo)
    for idx in stacks:
        rows = [torch.stack(pick(col, idx)) for col in (a_all, d_all, k_all)]
        betas = values.beta1s[idx[0]], values.beta2s[idx[0]]
        apply_stacked((pick(ps, idx), pick(ms, idx), pick(gs, idx)), rows, betas, scratch)
    stacked = {i for idx in stacks for i in idx}
    for i in todo:
        if i in stacked:
            continue
        chunks = _flat_chunks(CHUNK, ps[i], ms[i], gs[i])
        draws = None if rounding is None else [_draws(rounding, i, start, pc.shape) for start, (pc, _, _) in chunks]
        pieces = [(pc, mc, gc) for _, (pc, mc, gc) in chunks]
        beta1, beta2 = values.beta1s[i], values.beta2s[i]
        read = _slot_pieces(slots[i], chunks) if i in slots else None
        update.apply_pieces(pieces, a_all[i], d_all[i], k_all[i], beta1, beta2, draws, scratch, read)


def apply_stacked(
    tensors: tuple[Sequence[Tensor], Sequence[Tensor], Sequence[Tensor]],
    rows: Sequence[Tensor],
    betas: tuple[float | tuple[Tensor, Tensor], float | tuple[Tensor, Tensor]],
    scratch: Optional[update.Scratch] = None,
) -> None:
    """:func:`~lion_sf_dist.kernel.update.apply_update` of tensors ``(ps, ms, gs)`` of one shape and dtypes,
    stacked as rows, then written back.

    ``rows``: ``step_size``, ``decay`` and ``keep``, each ``[K]``, one value per tensor;
    ``betas``: ``(beta1, beta2)`` as :func:`~lion_sf_dist.kernel.update.apply_update` takes them
    (the compiled path's as ``[K, 1]`` tensors).
    """
    ps, ms, gs = tensors
    p, m, g = (torch.stack(list(ts)) for ts in tensors)
    shape = (len(ps),) + (1,) * (p.dim() - 1)  # one value per row, broadcast over its elements
    step_size, decay, keep = (r.view(shape) for r in rows)
    update.apply_pieces([(p, m, g)], step_size, decay, keep, *betas, None, scratch)
    torch._foreach_copy_(list(ps), list(p.unbind()))
    torch._foreach_copy_(list(ms), list(m.unbind()))
