"""The LionSF update rule: the only place its arithmetic is written.

Three pure stages on local tensors (no process groups, no DTensor, no DeepSpeed):

* :func:`count_agreement` -- per tensor (or chunk), ``A``: elements whose Lion update
  agrees in sign with the gradient, and whether any gradient element is NaN or Inf.
* :func:`scales_from_counts` -- from the (globally reduced) per-unit counts ``[A, N, P]``,
  the float32 agreement, the scale ``s_U`` and whether the unit steps at all.
* :func:`apply_update` -- per tensor, weight decay, the scaled signed step and the
  momentum update, in place, leaving a skipped unit bit-for-bit unchanged.

Whatever the dtype of ``p``, ``g`` and ``exp_avg`` (float32, bfloat16, float16), the
arithmetic runs in float32 and each result is rounded once when stored (see
docs/CONTRACT.md section 11): to nearest, or through a ``draw`` that rounds stochastically
(:mod:`lion_sf_dist.rounding`). For float32 tensors the stored values are those of the
float32 expressions themselves. The chunked and compiled paths call these functions; the
multi-tensor path (:mod:`lion_sf_dist.kernel.multi_tensor`) writes the same expressions
with ``torch._foreach_*`` ops, and the tests hold it bitwise to these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from lion_sf_dist.rounding import Rounding

# Eager counts are float32 sums of zeros and ones: exact up to this many elements.
EXACT_FLOAT_COUNT = 1 << 24
# Compiled counts are int32 sums: exact below this many elements.
EXACT_INT32_COUNT = (1 << 31) - 1
F32 = torch.float32
Draw = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class StepValues:
    """One step's per-segment values: entry ``i`` of each belongs to the ``i``-th ``(p, m, g)``.

    ``step_size = -lr * s_U`` and ``decay = 1 - lr * wd_eff`` (float32) and ``keep`` (bool)
    live on the tensors' device; the betas are host floats; ``rounding`` rounds bfloat16
    destinations stochastically (``None``: to nearest).
    """

    step_size: Tensor
    decay: Tensor
    keep: Tensor
    beta1s: Sequence[float]
    beta2s: Sequence[float]
    rounding: Optional[Rounding] = None


class Scratch:
    """Float32 buffers the eager stages reuse from piece to piece, one per role.

    Eager temporaries are a few chunks each; allocated fresh for every chunk, they are
    mapped and unmapped by the C allocator whenever its thresholds say so, and a step of
    the bench model then took up to 300,000 page faults (twice the time of one without).
    Buffers of at most ``limit`` elements are kept; a larger request gets a fresh tensor.
    Not thread-safe: one step uses it at a time.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._by_role: dict[tuple[int, torch.device], Tensor] = {}
        self._views: dict[tuple[int, torch.Size, torch.device], Tensor] = {}
        self._bit_views: dict[tuple[int, torch.Size, torch.device], Tensor] = {}

    def take(self, role: int, like: Tensor) -> Tensor:
        """An uninitialised float32 tensor of ``like``'s shape and device, owned by ``role`` until its next take."""
        key = (role, like.shape, like.device)
        view = self._views.get(key)
        if view is not None:
            return view
        n = like.numel()
        if n > self._limit:
            return torch.empty(like.shape, dtype=F32, device=like.device)
        buffer = self._by_role.get((role, like.device))
        if buffer is None:
            buffer = self._by_role[role, like.device] = torch.empty(self._limit, dtype=F32, device=like.device)
        # A view per shape, made once: making one costs as much as a small piece's arithmetic.
        view = self._views[key] = buffer if like.shape == buffer.shape else buffer[:n].view(like.shape)
        return view

    def take_bits(self, role: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`take`'s tensor and the same memory read as int32 (that view made once per shape)."""
        floats = self.take(role, like)
        key = (role, like.shape, like.device)
        if self._views.get(key) is not floats:  # a fresh tensor (over the limit): a fresh view
            return floats, floats.view(torch.int32)
        bits = self._bit_views.get(key)
        if bits is None:
            bits = self._bit_views[key] = floats.view(torch.int32)
        return floats, bits


# Roles in a Scratch; the count and apply stages run one after the other and share them.
_G, _M, _C, _P = range(4)


def _f32(t: Tensor, scratch: Optional[Scratch] = None, role: int = _G) -> Tensor:
    """``t`` itself when float32 (no copy), else an exact float32 copy (into ``scratch``'s ``role`` if given)."""
    if t.dtype == F32:
        return t
    return t.float() if scratch is None else scratch.take(role, t).copy_(t)


def _new(like: Tensor, scratch: Optional[Scratch], role: int) -> Optional[Tensor]:
    """``scratch``'s buffer ``role`` shaped like ``like``, or ``None`` (the op allocates) without one."""
    return None if scratch is None else scratch.take(role, like)


def _interp(m32: Tensor, g32: Tensor, beta: float | tuple[Tensor, Tensor], out: Optional[Tensor] = None) -> Tensor:
    """``m * b + g * (1 - b)`` as a new float32 tensor (``out`` if given).

    Eager ``beta`` is a float and this is ``m.mul(b).add_(g, alpha=1 - b)`` (the rounding
    docs/CONTRACT.md pins); compiled it is ``(b, 1 - b)`` as 0-d tensors (both rounded from
    float64 on the host, as ``alpha`` is), so a change of betas needs no recompilation.
    """
    if isinstance(beta, tuple):
        b, one_minus_b = beta
        return m32 * b + g32 * one_minus_b
    return torch.mul(m32, beta, out=out).add_(g32, alpha=1.0 - beta)


def _momentum(
    m32: Tensor,
    g32: Tensor,
    keep: Tensor,
    beta: float | tuple[Tensor, Tensor],
    factors: tuple[Tensor, Tensor, Tensor],
    out: Optional[tuple[Tensor, Tensor]],
) -> Tensor:
    """``m * b + g * (1 - b)`` in place on float32 ``m32`` where ``keep``; ``m32`` unchanged otherwise.

    ``factors``: :func:`_momentum_factors` (once per tensor): a skipped unit's ``m`` gets
    ``m * 1 + 0``, once its gradient's NaN and Inf are zeroed. Eager (``beta`` a float), the
    gradient's bits are ANDed with ``keep``'s mask (into ``out``, a float32 tensor and its
    int32 view, if given): a kept unit's gradient is unchanged and a skipped one's becomes
    +0.0, exactly, in a vectorised integer op (``nan_to_num``, not vectorised on CPU, took
    twice as long; a multiply by ``keep`` would leave NaN as NaN, and a ``torch.where``
    costs more); ``addcmul_`` then rounds as ``add_(g, alpha=1 - b)`` does: one
    multiply-add. Compiled (``beta`` as tensors), a select is a free blend (inductor's CPU
    loops with ``nan_to_num`` took 1.5x as long a step).
    """
    factor, coef, bits = factors
    if isinstance(beta, tuple):
        return m32.mul_(factor).add_(torch.where(keep, g32, 0.0) * coef)
    if out is None:
        clean = torch.bitwise_and(g32.view(torch.int32), bits).view(F32)
    else:
        clean = out[0]
        torch.bitwise_and(g32.view(torch.int32), bits, out=out[1])
    return m32.mul_(factor).addcmul_(clean, coef)


def _momentum_factors(keep: Tensor, beta: float | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """What ``m`` and the cleaned ``g`` are multiplied by, ``(b, 1 - b)`` where ``keep``, else ``(1, 0)``, and
    the int32 mask that cleans ``g`` (all bits where ``keep``, none elsewhere)."""
    b, one_minus_b = beta if isinstance(beta, tuple) else (beta, 1.0 - beta)
    return torch.where(keep, b, 1.0), torch.where(keep, one_minus_b, 0.0), keep.to(torch.int32).neg()


def count_agreement(m: Tensor, g: Tensor, beta1: float | tuple[Tensor, Tensor], rows: bool = False) -> Tensor:
    """``[A, P]`` (int64) for one tensor (eager: of at most ``2**24`` elements).

    ``A = #(sign(m * b1 + g * (1 - b1)) * g > 0)``, exactly, in float32 whatever the
    dtypes; ``P > 0`` exactly when ``g`` holds a NaN or an Inf (``g * 0`` is 0 for every
    finite value, NaN otherwise), and then ``A`` is 0 on the eager path. ``rows``: ``m``
    and ``g`` are 2-D, one tensor per row, and the result is ``[R, 2]`` (eager only).
    """
    g32 = _f32(g)
    c = _interp(_f32(m), g32, beta1)
    if torch.compiler.is_compiling():
        # sign(c) * g > 0 as comparisons, summed in int32 (the compiled path keeps tensors below
        # EXACT_INT32_COUNT): a generated CPU loop runs this 1.7x as fast as the sign form in
        # int64 on data in cache, 1.1x on a step's tensors streamed from memory.
        agree = ((c > 0) & (g > 0)) | ((c < 0) & (g < 0))
        return torch.stack((agree.sum(dtype=torch.int32), (g.mul(0.0) != 0).sum(dtype=torch.int32))).to(torch.int64)
    total = _agreement_sum(c, g32, [-1] if rows else None)
    poison = total.isnan()
    return torch.stack((torch.where(poison, 0.0, total).to(torch.int64), poison.to(torch.int64)), dim=-1)


def agreement_sum(
    m: Tensor,
    g: Tensor,
    beta1: float,
    scratch: Optional[Scratch] = None,
    rows: bool = False,
    signs: Optional[Tensor] = None,
) -> Tensor:
    """Eager, one tensor of at most ``2**24`` elements: a float32 sum, :func:`count_agreement`'s ``A``
    exactly, or NaN exactly when ``g`` holds a NaN or an Inf.

    Sums of several such pieces keep that meaning (``A`` summed in int64 once NaN is ruled
    out), so a caller can reduce a tensor's chunks with a few ops per tensor.
    ``scratch``: where the temporaries go (default: fresh tensors). ``rows``: ``m`` and
    ``g`` are stacks of tensors, and the result has one sum per row. ``signs``: a tensor of
    ``m``'s shape that receives the update's sign, ``sign(m * b1 + g * (1 - b1))``, for
    :func:`apply_pieces` to read back instead of computing it again.
    """
    g32 = _f32(g, scratch, _G)
    c = _interp(_f32(m, scratch, _M), g32, beta1, _new(g32, scratch, _C))
    return _agreement_sum(c, g32, list(range(1, c.dim())) if rows else None, signs)


def _agreement_sum(c: Tensor, g32: Tensor, dims: Optional[list[int]], signs: Optional[Tensor] = None) -> Tensor:
    """:func:`agreement_sum` from ``c`` (overwritten) over ``dims`` (``None``: all), its signs into ``signs``."""
    # sign(c) * g is exact, and a comparison written into float32 (not bool, several times
    # slower on CPU) leaves 0 or 1; a float32 sum of those is exact up to 2**24 elements, hence
    # the callers' chunks. Adding g * 0 (alpha=0) keeps each 0 or 1 and makes it NaN where g
    # is NaN or Inf.
    u = c.sign_()
    if signs is not None:
        signs.copy_(u)
    agree = torch.gt(u.mul_(g32), 0.0, out=c)
    return agree.add_(g32, alpha=0.0).sum(dims, dtype=torch.float32)


def apply_update(
    p: Tensor,
    m: Tensor,
    g: Tensor,
    step_size: Tensor,
    decay: Tensor,
    keep: Tensor,
    beta1: float | tuple[Tensor, Tensor],
    beta2: float | tuple[Tensor, Tensor],
    draws: Optional[tuple[Optional[Draw], Optional[Draw]]] = None,
    scratch: Optional[Scratch] = None,
) -> None:
    """One LionSF step of one tensor, in place, computed in float32 (:func:`apply_pieces` of one piece).

    ``step_size = -lr * s_U`` and ``decay = 1 - lr * wd_eff`` are 0-d float32 tensors and
    ``keep`` a 0-d bool. A skipped unit (``keep`` false) gets ``step_size = 0`` and
    ``decay = 1`` from the caller; here its gradient becomes zeros and its momentum decay
    1, so ``p`` and ``m`` keep their values even when ``g`` holds NaN or Inf (``sign``
    maps NaN to 0). ``draws`` (for ``p`` and ``m``): turn a float32 result into the
    stochastically rounded float32 value to store, or ``None`` to round to nearest.
    ``scratch``: where the temporaries go (default: fresh tensors).
    """
    apply_pieces([(p, m, g)], step_size, decay, keep, beta1, beta2, None if draws is None else [draws], scratch)


def apply_pieces(
    pieces: Sequence[tuple[Tensor, Tensor, Tensor]],
    step_size: Tensor,
    decay: Tensor,
    keep: Tensor,
    beta1: float | tuple[Tensor, Tensor],
    beta2: float | tuple[Tensor, Tensor],
    draws: Optional[Sequence[Optional[tuple[Optional[Draw], Optional[Draw]]]]] = None,
    scratch: Optional[Scratch] = None,
    signs: Optional[Sequence[Tensor]] = None,
) -> None:
    """:func:`apply_update` of one tensor given as matching pieces ``(p, m, g)`` (flat chunks of it, or
    the whole tensors), stepped one after the other, with ``draws[i]`` for piece ``i``.

    The eager chunked path steps a tensor chunk by chunk: what does not depend on the piece
    is done once here, and the loop body is the update itself. ``signs``: piece ``i``'s
    update signs as :func:`agreement_sum` wrote them from these very ``m`` and ``g`` (read
    back instead of computed: -1, 0 and 1 are exact in any dtype).
    """
    factors = _momentum_factors(keep, beta2)
    for i, (p, m, g) in enumerate(pieces):
        g32 = _f32(g, scratch, _G)
        m32 = _f32(m, scratch, _M)
        if signs is None:
            u = _interp(m32, g32, beta1, _new(g32, scratch, _C)).sign_()
        else:
            u = signs[i].float() if scratch is None else scratch.take(_C, g32).copy_(signs[i])
        # u * step_size is exact (u is -1, 0 or 1), so addcmul rounds once, as p * decay + u * step_size.
        p32 = _f32(p, scratch, _P).mul_(decay).addcmul_(u, step_size)
        out = None if scratch is None else scratch.take_bits(_C, g32)  # u is spent: its buffer is free
        _momentum(m32, g32, keep, beta2, factors, out)
        piece_draws = draws[i] if draws is not None else None
        draw_p, draw_m = piece_draws if piece_draws is not None else (None, None)
        _store(p, p32, draw_p)
        _store(m, m32, draw_m)


def _store(dst: Tensor, value: Tensor, draw: Optional[Draw]) -> None:
    """Write the float32 ``value`` into ``dst``: nothing to do when it is ``dst``, else one rounding."""
    if value is dst:
        return
    dst.copy_(draw(value) if draw is not None and dst.dtype == torch.bfloat16 else value)


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
    and no non-finite gradient; otherwise its scale is 0. With ``ema`` (see docs/CONTRACT.md)
    the scale uses ``b1 * ema + (1 - b1) * agreement`` and ``ema`` is advanced in place for
    the units that step.
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
