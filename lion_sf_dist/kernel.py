"""The LionSF update rule: the only place its arithmetic is written.

Three pure stages, all on local tensors (no process groups, no DTensor, no DeepSpeed):

* :func:`count_agreement` -- per tensor (or chunk), ``A``: elements whose Lion update
  agrees in sign with the gradient, and whether any gradient element is NaN or Inf.
* :func:`scales_from_counts` -- from the (globally reduced) per-unit counts ``[A, N, P]``,
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

from lion_sf_dist._torch_private import floats_as_constants

# Eager temporaries are a few chunks of this many elements (1 MiB in fp32): they stay in cache.
CHUNK = 1 << 18
# Eager counts are float32 sums of zeros and ones: exact up to this many elements.
EXACT_FLOAT_COUNT = 1 << 24


def count_agreement(m: Tensor, g: Tensor, beta1: float) -> Tensor:
    """``[A, P]`` (int64) for one tensor (eager: of at most ``2**24`` elements).

    ``A = #(sign(m * b1 + g * (1 - b1)) * g > 0)``, exactly; ``P > 0`` exactly when ``g``
    holds a NaN or an Inf (``g * 0`` is 0 for every finite value, NaN otherwise).
    """
    u = m.mul(beta1).add_(g, alpha=1.0 - beta1).sign_()
    if torch.compiler.is_compiling():  # fused integer reductions
        return torch.stack(((u.mul_(g) > 0).sum(), (g.mul(0.0) != 0).sum()))
    # Eager CPU comparisons and isfinite cost several times more than arithmetic; a float32
    # sum of zeros and ones is exact up to 2**24 elements, hence the caller's chunks.
    agree = u.mul_(g).sign_().clamp_(min=0.0).sum(dtype=torch.float32)
    poisoned = g.mul(0.0).sum(dtype=torch.float32).isnan()
    return torch.stack((agree.to(torch.int64), poisoned.to(torch.int64)))


def apply_update(
    p: Tensor, m: Tensor, g: Tensor, step_size: Tensor, decay: Tensor, keep: Tensor, beta1: float, beta2: float
) -> None:
    """One LionSF step of one tensor, in place.

    ``step_size = -lr * s_U`` and ``decay = 1 - lr * wd_eff`` are 0-d float32 tensors and
    ``keep`` a 0-d bool. A skipped unit (``keep`` false) gets ``step_size = 0`` and
    ``decay = 1`` from the caller; here its gradient becomes zeros and its momentum decay
    1, so ``p`` and ``m`` keep their values even when ``g`` holds NaN or Inf (``sign``
    maps NaN to 0).
    """
    u = m.mul(beta1).add_(g, alpha=1.0 - beta1).sign_()
    p.mul_(decay).add_(u.mul_(step_size))
    m.mul_(torch.where(keep, beta2, 1.0)).add_(_zeroed_unless(keep, g), alpha=1.0 - beta2)


def _zeroed_unless(keep: Tensor, g: Tensor) -> Tensor:
    """``g`` where ``keep`` else zeros, NaN and Inf included.

    Compiled, a select is a free blend; eager, a multiply and ``nan_to_num`` cost a third
    of ``torch.where`` with a 0-d condition on CPU.
    """
    if torch.compiler.is_compiling():
        return torch.where(keep, g, 0.0)
    return g.mul(keep).nan_to_num_(0.0, 0.0, 0.0)


def scales_from_counts(
    totals: Tensor,
    pow: float,
    negative: str,
    ema: Tensor | None = None,
    ema_betas: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-unit ``(agreement, scale, keep)`` from reduced counts ``totals[U, 3] = [A, N, P]``.

    ``P`` counts pieces with a non-finite gradient.

    ``agreement = 2 * A / N - 1`` in float32; ``scale = |agreement| ** pow`` (``negative="abs"``)
    or ``max(agreement, 0) ** pow`` (``"clamp"``). A unit steps (``keep``) when it has elements
    and no non-finite gradient; otherwise its scale is 0. With ``ema`` (the agreement average) the
    scale uses ``b1 * ema + (1 - b1) * agreement`` and ``ema`` is advanced in place for the
    units that step.
    """
    agree, n, poisoned = totals.unbind(1)
    keep = (n > 0) & (poisoned == 0)
    frac = agree.to(torch.float32) / n.clamp(min=1).to(torch.float32)
    agreement = frac * 2.0 - 1.0
    signal = agreement
    if ema is not None:
        assert ema_betas is not None, "an agreement average comes with its betas"
        b1, b2 = ema_betas
        signal = ema * b1 + agreement * (1.0 - b1)
        ema.copy_(torch.where(keep, ema * b2 + agreement * (1.0 - b2), ema))
    base = signal.abs() if negative == "abs" else signal.clamp(min=0.0)
    scale = torch.where(keep, base.pow(pow), torch.zeros_like(base))
    return agreement, scale, keep


def _flat_chunks(size: int, *tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """Matching flat pieces of at most ``size`` elements (whole tensors if one is not contiguous)."""
    if not all(t.is_contiguous() for t in tensors):
        if tensors[0].numel() > EXACT_FLOAT_COUNT:
            raise ValueError(f"LionSF's eager kernel needs contiguous tensors above {EXACT_FLOAT_COUNT} elements "
                             f"(got one of shape {tuple(tensors[0].shape)}); "
                             "use use_triton=True or a contiguous layout")
        return [tensors]
    flats = [t.view(-1) for t in tensors]
    return [tuple(f[i : i + size] for f in flats) for i in range(0, flats[0].numel(), size)]


def _count_many(ms: list[Tensor], gs: list[Tensor], beta1s: tuple[float, ...]) -> Tensor:
    return torch.stack([count_agreement(m, g, b1) for m, g, b1 in zip(ms, gs, beta1s)])


def _apply_many(ps: list[Tensor], ms: list[Tensor], gs: list[Tensor], step_size: Tensor, decay: Tensor, keep: Tensor,
                beta1s: tuple[float, ...], beta2s: tuple[float, ...]) -> None:
    for i, (p, m, g) in enumerate(zip(ps, ms, gs)):
        apply_update(p, m, g, step_size[i], decay[i], keep[i], beta1s[i], beta2s[i])


def _compile(fn):
    """``torch.compile`` of a multi-tensor function: one call per step, one fused loop per tensor.

    One call for all tensors because a compiled call costs about 0.3 ms of guards and
    dispatch (a 144-tensor model spent more there than in the arithmetic). Shapes are
    static: a model's tensors do not change between steps, and a new set compiles anew.
    The betas are compiled in as constants (torch 2.13 otherwise traced Python floats
    symbolically and reused a graph with a stale ``alpha``); ``cpp.dynamic_threads``
    keeps every CPU loop parallel (inductor otherwise left small ones on one thread).
    """
    compiled = torch.compile(fn, dynamic=False, fullgraph=True, options={"cpp.dynamic_threads": True})

    def run(*args):
        with floats_as_constants():
            return compiled(*args)

    return run


class Kernel:
    """Runs :func:`count_agreement` and :func:`apply_update` over lists of tensors.

    Eager: tensor by tensor in cache-sized chunks, so temporaries stay small. Compiled:
    all tensors in one ``torch.compile``-d call, with no temporaries at all.
    """

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self._count = _compile(_count_many) if compiled else None
        self._apply = _compile(_apply_many) if compiled else None

    def count(self, ms: list[Tensor], gs: list[Tensor], beta1s: tuple[float, ...]) -> Tensor:
        """``[S, 2]`` int64: :func:`count_agreement` of each ``(m, g)``."""
        if self._count is not None:
            return self._count(ms, gs, beta1s)
        rows = []
        for m, g, beta1 in zip(ms, gs, beta1s):
            parts = [count_agreement(mc, gc, beta1) for mc, gc in _flat_chunks(CHUNK, m, g)]
            rows.append(parts[0] if len(parts) == 1 else torch.stack(parts).sum(0))
        return torch.stack(rows)

    def apply(self, ps: list[Tensor], ms: list[Tensor], gs: list[Tensor], step_size: Tensor, decay: Tensor,
              keep: Tensor, beta1s: tuple[float, ...], beta2s: tuple[float, ...]) -> None:
        """:func:`apply_update` on each ``(p, m, g)`` with the ``i``-th entry of ``step_size``, ``decay``, ``keep``."""
        if self._apply is not None:
            self._apply(ps, ms, gs, step_size, decay, keep, beta1s, beta2s)
            return
        for p, m, g, a, d, k, b1, b2 in zip(ps, ms, gs, step_size.unbind(), decay.unbind(), keep.unbind(),
                                            beta1s, beta2s):
            for pc, mc, gc in _flat_chunks(CHUNK, p, m, g):
                apply_update(pc, mc, gc, a, d, k, b1, b2)
