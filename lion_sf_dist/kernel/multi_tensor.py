"""The multi-tensor eager path (the default on GPUs): each stage over all tensors with ``torch._foreach_*`` ops."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lion_sf_dist._torch_private import chunk_cat
from lion_sf_dist.devices import to_device
from lion_sf_dist.kernel import chunked
from lion_sf_dist.kernel.tensors import Views, by_key, pick
from lion_sf_dist.kernel.update import F32, StepValues
from lion_sf_dist.rounding import Rounding, stochastic_bf16


class MultiTensorKernel:
    """Each stage over all tensors of a step with ``torch._foreach_*`` ops.

    Tensors are grouped by ``beta1`` (``add`` with ``alpha`` takes one scalar per call;
    ``beta2`` enters as per-tensor factors) and by the dtypes of ``p``/``exp_avg`` (low-precision ones are promoted to
    float32 by multiplying with a ``(1,)``-shaped float32 tensor, which is exact, and are
    written back once at the end). The dispatched ops per step are a constant per group,
    not per tensor or element; on CUDA the calls whose second list holds per-tensor
    ``(1,)`` scalars take ATen's per-tensor route, the others its fused multi-tensor one.

    Counts: ``sign(u * g)`` clamped at 0 is 0 or 1, plus ``g * 0`` (an ``add`` with
    ``alpha=0``: NaN where ``g`` is not finite); a float64 L1 norm of each tensor is then
    the exact count, or NaN.

    The momentum update needs the gradient with NaN/Inf replaced by 0 in skipped units,
    a select no ``_foreach`` op offers: all gradients are gathered into one float32 buffer
    (one ``_chunk_cat``), where one ``nan_to_num_`` cleans them, and ``m`` gets
    ``m * b2 + g * (1 - b2)`` as an ``addcmul`` with a per-tensor ``1 - b2`` (0 in skipped
    units), which rounds as ``add`` with ``alpha`` does. ``p``/``exp_avg`` are seen through
    flat views kept from step to step (they are the same tensors every step).
    Non-contiguous tensors go through the chunked path. Peak extra memory: about 8 bytes
    per element (the gathered gradients and the update direction), like AdamW's foreach.
    """

    def __init__(self) -> None:
        self.views = Views()
        self._consts: Optional[tuple[tuple, Tensor]] = None
        self._inverse: Optional[tuple[tuple, Tensor]] = None

    def beta2_table(self, beta2s: Sequence[float], device: torch.device) -> Tensor:
        """``[2, S]`` float32 on ``device``: ``beta2`` and ``1 - beta2`` per segment (the latter rounded from
        float64, as ``alpha`` is), rebuilt only when the betas change."""
        key = (tuple(beta2s), device)
        if self._consts is None or self._consts[0] != key:
            host = torch.tensor([list(beta2s), [1.0 - b for b in beta2s]], dtype=torch.float64).to(F32)
            self._consts = (key, to_device(host, device))
        return self._consts[1]

    def inverse(self, order: Sequence[int], device: torch.device) -> Tensor:
        """Indices putting rows gathered group by group in ``order`` back in segment order (kept on the device)."""
        key = (tuple(order), device)
        if self._inverse is None or self._inverse[0] != key:
            inv = [0] * len(order)
            for pos, i in enumerate(order):
                inv[i] = pos
            self._inverse = (key, to_device(torch.tensor(inv, dtype=torch.int64), device))
        return self._inverse[1]

    def count(self, ms: Sequence[Tensor], gs: Sequence[Tensor], beta1s: Sequence[float]) -> Tensor:
        parts, order = [], []
        for (b1, m_low, g_low), idx in by_key(
            [(b1, m.dtype != F32, g.dtype != F32) for m, g, b1 in zip(ms, gs, beta1s)]
        ).items():
            m_, g_ = pick(ms, idx), pick(gs, idx)
            device = m_[0].device
            if m_low:
                c = torch._foreach_mul(m_, [torch.full((1,), b1, dtype=F32, device=device)] * len(idx))
            else:
                c = torch._foreach_mul(m_, b1)
            g32 = torch._foreach_mul(g_, [torch.ones(1, dtype=F32, device=device)] * len(idx)) if g_low else g_
            torch._foreach_add_(c, g32, alpha=1.0 - b1)
            torch._foreach_sign_(c)
            torch._foreach_mul_(c, g32)
            torch._foreach_sign_(c)
            torch._foreach_clamp_min_(c, 0.0)
            torch._foreach_add_(c, g_, alpha=0.0)  # + g * 0: NaN where g is NaN or Inf
            parts.append(torch.stack(torch._foreach_norm(c, 1, dtype=torch.float64)))
            order.extend(idx)
        counts = parts[0] if len(parts) == 1 else torch.cat(parts)[self.inverse(order, parts[0].device)]
        poisoned = counts.isnan()
        return torch.stack((counts.nan_to_num(0.0).to(torch.int64), poisoned.to(torch.int64)), dim=1)

    def apply(
        self,
        ps: Sequence[Tensor],
        ms: Sequence[Tensor],
        gs: Sequence[Tensor],
        values: StepValues,
    ) -> None:
        n = len(ps)
        device = ps[0].device
        dense = [i for i in range(n) if ps[i].is_contiguous() and ms[i].is_contiguous() and gs[i].is_contiguous()]
        if len(dense) < n:
            chunked.apply(ps, ms, gs, values, only=sorted(set(range(n)) - set(dense)))
        step_size, decay, keep, rounding = values.step_size, values.decay, values.keep, values.rounding
        beta1s, beta2s = values.beta1s, values.beta2s
        if not dense:
            return
        pf, mf = self.views.refresh(pick(ps, dense), pick(ms, dense))
        gathered, gf = _gather_f32([gs[i] for i in dense], device)
        steps = step_size.view(-1, 1).unbind(0)
        decays = decay.view(-1, 1).unbind(0)
        # m's factor and the clean gradient's: (b2, 1 - b2) where the unit steps, else (1, 0)
        beta2, one_minus_beta2 = self.beta2_table(beta2s, device).unbind(0)
        b2k = torch.where(keep, beta2, 1.0).view(-1, 1).unbind(0)
        coefs = torch.where(keep, one_minus_beta2, 0.0).view(-1, 1).unbind(0)
        groups = by_key([(beta1s[i], ps[i].dtype, ms[i].dtype) for i in dense])
        # p first, from the old m; then clean the gradients of skipped units; then m
        for (b1, p_dtype, m_dtype), idx in groups.items():
            p_low, m_low = p_dtype != F32, m_dtype != F32
            at = [dense[j] for j in idx]
            m_ = pick(mf, idx)
            if m_low:
                u = torch._foreach_mul(m_, [torch.full((1,), b1, dtype=F32, device=device)] * len(idx))
            else:
                u = torch._foreach_mul(m_, b1)
            torch._foreach_add_(u, pick(gf, idx), alpha=1.0 - b1)
            torch._foreach_sign_(u)
            p_ = pick(pf, idx)
            p32 = torch._foreach_mul(p_, pick(decays, at)) if p_low else p_
            if not p_low:
                torch._foreach_mul_(p_, pick(decays, at))
            torch._foreach_addcmul_(p32, u, pick(steps, at))  # u * step is exact: one rounding, as p + u * step
            del u
            if p_low:
                self._store(p_, p32, rounding, at, 0)
        gathered.nan_to_num_(0.0, 0.0, 0.0)
        for (_, _, m_dtype), idx in groups.items():
            m_low = m_dtype != F32
            at = [dense[j] for j in idx]
            m_ = pick(mf, idx)
            m32 = torch._foreach_mul(m_, pick(b2k, at)) if m_low else m_
            if not m_low:
                torch._foreach_mul_(m_, pick(b2k, at))
            torch._foreach_addcmul_(m32, pick(gf, idx), pick(coefs, at))
            if m_low:
                self._store(m_, m32, rounding, at, 1)

    @staticmethod
    def _store(
        dst: Sequence[Tensor], values: Sequence[Tensor], rounding: Optional[Rounding], at: Sequence[int], stream: int
    ) -> None:
        """Round float32 ``values`` into ``dst``: one ``_foreach_copy_`` to nearest, or per tensor stochastically."""
        if rounding is None or dst[0].dtype != torch.bfloat16:
            torch._foreach_copy_(list(dst), list(values))
            return
        for d, v, seg in zip(dst, values, at):
            for start in range(0, d.numel(), chunked.CHUNK):
                piece = v[start : start + chunked.CHUNK]
                d[start : start + chunked.CHUNK].copy_(
                    stochastic_bf16(piece, rounding.bits(seg, stream, start, piece.shape, piece.device))
                )


def _gather_f32(gs: Sequence[Tensor], device: torch.device) -> tuple[Tensor, list[Tensor]]:
    """One float32 buffer holding every ``g`` (exactly), and a flat view of each ``g``'s part, in order.

    One ``_chunk_cat`` per gradient dtype (it takes one input dtype): a constant number of ops.
    """
    sizes = [g.numel() for g in gs]
    gathered = torch.empty((1, sum(sizes)), dtype=F32, device=device)
    by_dtype = by_key([g.dtype for g in gs])
    if len(by_dtype) == 1:
        chunk_cat(gs, gathered)
        return gathered, list(gathered.view(-1).split_with_sizes(sizes))
    order = [i for idx in by_dtype.values() for i in idx]
    pieces = gathered.view(-1).split_with_sizes([sizes[i] for i in order])
    start = 0
    for idx in by_dtype.values():
        n = sum(sizes[i] for i in idx)
        chunk_cat([gs[i] for i in idx], gathered[:, start : start + n])
        start += n
    flat: list[Tensor] = [gathered] * len(gs)
    for piece, i in zip(pieces, order):
        flat[i] = piece
    return gathered, flat
