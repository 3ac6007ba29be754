"""The LionSF update rule: the only place its arithmetic is written.

Three pure stages, all on local tensors (no process groups, no DTensor, no DeepSpeed):

* :func:`count_agreement` -- per tensor, the int64 counts ``[A, finite]``: elements whose
  Lion update agrees in sign with the gradient, and finite gradient elements.
* :func:`unit_scales` -- from the (globally reduced) per-unit counts ``[A, N, finite]``,
  the float32 agreement, the scale ``s_U`` and whether the unit steps at all.
* :func:`apply_update` -- per tensor, weight decay, the scaled signed step and the
  momentum update, in place, leaving a skipped unit bit-for-bit unchanged.

``count_agreement`` and ``apply_update`` run either eagerly (in cache-sized chunks, so
temporaries stay bounded) or through ``torch.compile`` (one fused loop per tensor,
Triton on GPU, vectorised C++ on CPU): :class:`Kernel` picks one.
"""

from __future__ import annotations

import torch
import torch._dynamo.config
from torch import Tensor

# Eager temporaries are a few chunks of this many elements (1 MiB in fp32): they stay in cache.
CHUNK = 1 << 18


def count_agreement(m: Tensor, g: Tensor, beta1: float) -> Tensor:
    """``[A, finite]`` (int64) for one tensor.

    ``A = #(sign(m * b1 + g * (1 - b1)) * g > 0)`` and ``finite = #isfinite(g)``; the
    caller turns ``N - finite`` into the count of non-finite gradient elements.
    """
    u = m.mul(beta1).add_(g, alpha=1.0 - beta1).sign_()
    return torch.stack(((u.mul_(g) > 0).sum(), torch.isfinite(g).sum()))


def apply_update(
    p: Tensor, m: Tensor, g: Tensor, step_size: Tensor, decay: Tensor, keep: Tensor, beta1: float, beta2: float
) -> None:
    """One LionSF step of one tensor, in place.

    ``step_size = -lr * s_U`` and ``decay = 1 - lr * wd_eff`` are 0-d float32 tensors and
    ``keep`` a 0-d bool. A skipped unit (``keep`` false) gets ``step_size = 0`` and
    ``decay = 1`` from the caller; its gradient is replaced by zeros here and its momentum
    decay by 1, so ``p`` and ``m`` keep their values even when ``g`` holds NaN or Inf
    (``sign`` maps NaN to 0).
    """
    u = m.mul(beta1).add_(g, alpha=1.0 - beta1).sign_()
    p.mul_(decay).add_(u.mul_(step_size))
    g_used = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
    m.mul_(torch.where(keep, beta2, 1.0)).add_(g_used, alpha=1.0 - beta2)


def unit_scales(
    totals: Tensor,
    pow: float,
    negative: str,
    ema: Tensor | None = None,
    ema_betas: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-unit ``(agreement, scale, keep)`` from reduced counts ``totals[U, 3] = [A, N, finite]``.

    ``agreement = 2 * A / N - 1`` in float32; ``scale = |agreement| ** pow`` (``negative="abs"``)
    or ``max(agreement, 0) ** pow`` (``"clamp"``). A unit steps (``keep``) when it has elements
    and no non-finite gradient; otherwise its scale is 0. With ``ema`` (SPEC section 8) the
    scale uses ``b1 * ema + (1 - b1) * agreement`` and ``ema`` is advanced in place for the
    units that step.
    """
    agree, n, finite = totals.unbind(1)
    keep = (n > 0) & (finite == n)
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


def _compile(fn):
    """``torch.compile`` with one fused loop per tensor whatever its length.

    The betas are compiled in as constants: with ``dynamic=True`` torch 2.13 otherwise
    traces Python floats symbolically and reuses a graph with a stale ``alpha`` (seen
    here: counts computed with the previous call's ``beta1``).
    """
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)

    def run(*args):
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args)

    return run


class Kernel:
    """Runs :func:`count_agreement` and :func:`apply_update` eagerly or compiled."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        if compiled:
            self._count = _compile(count_agreement)
            self._apply = _compile(apply_update)

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
