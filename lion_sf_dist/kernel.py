"""The LionSF update rule: the only place its arithmetic is written.

Three pure stages, all on local tensors (no process groups, no DTensor, no DeepSpeed):

* :func:`count_agreement` -- per tensor, the int64 counts ``[A, F]``: elements whose
  Lion update agrees in sign with the gradient, and non-finite gradient elements.
* :func:`unit_scales` -- from the (globally reduced) per-unit counts ``[A, N, F]``,
  the float32 agreement, the scale ``s_U`` and whether the unit steps at all.
* :func:`apply_update` -- per tensor, weight decay, the scaled signed step and the
  momentum update, in place, leaving a skipped unit bit-for-bit unchanged.

``count_agreement`` and ``apply_update`` run either eagerly (in cache-sized chunks, so
temporaries stay bounded) or through ``torch.compile`` (one fused loop per tensor,
Triton on GPU, vectorised C++ on CPU): :class:`Kernel` picks one.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Eager temporaries are at most a few chunks of this many elements (4 MiB in fp32).
CHUNK = 1 << 20


def count_agreement(m: Tensor, g: Tensor, beta1: float) -> Tensor:
    """``[A, F]`` (int64) for one tensor: ``A = #(sign(m*b1 + g*(1-b1)) * g > 0)``, ``F = #(!isfinite(g))``."""
    u = m.mul(beta1).add_(g, alpha=1.0 - beta1).sign_()
    agree = (u.mul_(g) > 0).sum()
    nonfinite = torch.logical_not(torch.isfinite(g)).sum()
    return torch.stack((agree, nonfinite))


def apply_update(
    p: Tensor, m: Tensor, g: Tensor, step_size: Tensor, decay: Tensor, keep: Tensor, beta1: float, beta2: float
) -> None:
    """One LionSF step of one tensor, in place.

    ``step_size = -lr * s_U`` and ``decay = 1 - lr * wd_eff`` are 0-d float32 tensors and
    ``keep`` a 0-d bool: where it is false, ``p`` and ``m`` keep their values exactly.
    """
    u = m.mul(beta1).add_(g, alpha=1.0 - beta1).sign_()
    p_new = p.mul(decay).add_(u.mul_(step_size))
    m_new = m.mul(beta2).add_(g, alpha=1.0 - beta2)
    p.copy_(torch.where(keep, p_new, p))
    m.copy_(torch.where(keep, m_new, m))


def unit_scales(
    totals: Tensor,
    pow: float,
    negative: str,
    ema: Tensor | None = None,
    ema_betas: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-unit ``(agreement, scale, keep)`` from reduced counts ``totals[U, 3] = [A, N, F]``.

    ``agreement = 2 * A / N - 1`` in float32; ``scale = |agreement| ** pow`` (``negative="abs"``)
    or ``max(agreement, 0) ** pow`` (``"clamp"``). A unit steps (``keep``) when it has elements
    and no non-finite gradient; otherwise its scale is 0. With ``ema`` (SPEC section 8) the
    scale uses ``b1 * ema + (1 - b1) * agreement`` and ``ema`` is advanced in place for the
    units that step.
    """
    agree, n, nonfinite = totals.unbind(1)
    keep = (n > 0) & (nonfinite == 0)
    frac = agree.to(torch.float32) / n.clamp(min=1).to(torch.float32)
    agreement = frac * 2.0 - 1.0
    signal = agreement
    if ema is not None:
        b1, b2 = ema_betas
        signal = ema * b1 + agreement * (1.0 - b1)
        ema.copy_(torch.where(keep, ema * b2 + agreement * (1.0 - b2), ema))
    base = signal.abs() if negative == "abs" else signal.clamp(min=0.0)
    scale = torch.where(keep, base.pow(pow), torch.zeros_like(base))
    return agreement, scale, keep


def _chunks(t: Tensor) -> list[Tensor]:
    flat = t.view(-1)
    return [flat[i : i + CHUNK] for i in range(0, flat.numel(), CHUNK)]


class Kernel:
    """Runs :func:`count_agreement` and :func:`apply_update` eagerly or compiled."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        if compiled:
            self._count = torch.compile(count_agreement, dynamic=True, fullgraph=True)
            self._apply = torch.compile(apply_update, dynamic=True, fullgraph=True)

    def count(self, m: Tensor, g: Tensor, beta1: float) -> Tensor:
        if self.compiled:
            return self._count(m.view(-1), g.view(-1), beta1)
        if m.numel() <= CHUNK or not (m.is_contiguous() and g.is_contiguous()):
            return count_agreement(m, g, beta1)
        parts = [count_agreement(mc, gc, beta1) for mc, gc in zip(_chunks(m), _chunks(g))]
        return torch.stack(parts).sum(0)

    def apply(
        self, p: Tensor, m: Tensor, g: Tensor, step_size: Tensor, decay: Tensor, keep: Tensor, beta1: float, beta2: float
    ) -> None:
        if self.compiled:
            self._apply(p.view(-1), m.view(-1), g.view(-1), step_size, decay, keep, beta1, beta2)
            return
        if p.numel() <= CHUNK or not (p.is_contiguous() and m.is_contiguous() and g.is_contiguous()):
            apply_update(p, m, g, step_size, decay, keep, beta1, beta2)
            return
        for pc, mc, gc in zip(_chunks(p), _chunks(m), _chunks(g)):
            apply_update(pc, mc, gc, step_size, decay, keep, beta1, beta2)
