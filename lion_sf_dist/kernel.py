"""The LionSF update rule: the only place its arithmetic is written.

Three pure stages, all on local tensors (no process groups, no DTensor, no DeepSpeed):

* :func:`count_agreement` -- per tensor (or chunk), ``A``: elements whose Lion update
  agrees in sign with the gradient, and whether any gradient element is NaN or Inf.
* :func:`scales_from_counts` -- from the (globally reduced) per-unit counts ``[A, N, P]``,
  the float32 agreement, the scale ``s_U`` and whether the unit steps at all.
* :func:`apply_update` -- per tensor, weight decay, the scaled signed step and the
  momentum update, in place, leaving a skipped unit bit-for-bit unchanged.

Whatever the dtype of ``p``, ``g`` and ``exp_avg`` (float32, bfloat16, float16), the
arithmetic runs in float32 and each result is rounded once when stored (see
docs/CONTRACT.md): to nearest, or, for bfloat16 destinations when a :class:`Rounding` is
given, stochastically with bits that depend only on the element's place in the logical
(unsharded) parameter (:mod:`lion_sf_dist.rounding`). For float32 tensors the stored
values are those of the float32 expressions themselves.

:class:`Kernel` runs the stages over all tensors of a step on one of three paths, with
the same maths:

* chunked (eager, tensor by tensor in cache-sized chunks: temporaries stay small; the CPU default);
* multi-tensor (eager ``torch._foreach_*`` ops: a constant number of dispatched ops per
  step whatever the sizes and number of tensors; the GPU default);
* compiled (``torch.compile``: one fused loop per tensor, Triton on GPU, C++ on CPU).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch import Tensor

from lion_sf_dist._torch_private import chunk_cat, no_duck_shapes, recompile_limit_hit
from lion_sf_dist.devices import to_device
from lion_sf_dist.rounding import IndexMap, Rounding, random16, stochastic_bf16

# Eager temporaries are a few chunks of this many elements (1 MiB in fp32): they stay in cache.
CHUNK = 1 << 18
# Eager counts are float32 sums of zeros and ones: exact up to this many elements.
EXACT_FLOAT_COUNT = 1 << 24
F32 = torch.float32


def _f32(t: Tensor) -> Tensor:
    """``t`` itself when float32 (no copy), else an exact float32 copy."""
    return t if t.dtype == F32 else t.float()


def _interp(m32: Tensor, g32: Tensor, beta: float | tuple[Tensor, Tensor]) -> Tensor:
    """``m * b + g * (1 - b)`` as a new float32 tensor.

    Eager ``beta`` is a float and this is ``m.mul(b).add_(g, alpha=1 - b)`` (the rounding
    docs/CONTRACT.md pins); compiled it is ``(b, 1 - b)`` as 0-d tensors (both rounded from
    float64 on the host, as ``alpha`` is), so a change of betas needs no recompilation.
    """
    if isinstance(beta, tuple):
        b, one_minus_b = beta
        return m32 * b + g32 * one_minus_b
    return m32.mul(beta).add_(g32, alpha=1.0 - beta)


def _momentum(m32: Tensor, g32: Tensor, keep: Tensor, beta: float | tuple[Tensor, Tensor]) -> Tensor:
    """``m * b + g * (1 - b)`` in place on float32 ``m32`` where ``keep``; ``m32`` unchanged otherwise."""
    if isinstance(beta, tuple):
        b, one_minus_b = beta
        return m32.mul_(torch.where(keep, b, 1.0)).add_(torch.where(keep, g32, 0.0) * one_minus_b)
    return m32.mul_(torch.where(keep, beta, 1.0)).add_(_zeroed_unless(keep, g32), alpha=1.0 - beta)


def count_agreement(m: Tensor, g: Tensor, beta1: float | tuple[Tensor, Tensor]) -> Tensor:
    """``[A, P]`` (int64) for one tensor (eager: of at most ``2**24`` elements).

    ``A = #(sign(m * b1 + g * (1 - b1)) * g > 0)``, exactly, in float32 whatever the
    dtypes; ``P > 0`` exactly when ``g`` holds a NaN or an Inf (``g * 0`` is 0 for every
    finite value, NaN otherwise).
    """
    g32 = _f32(g)
    u = _interp(_f32(m), g32, beta1).sign_()
    if torch.compiler.is_compiling():  # fused integer reductions
        return torch.stack(((u.mul_(g32) > 0).sum(), (g.mul(0.0) != 0).sum()))
    # Eager CPU comparisons and isfinite cost several times more than arithmetic; a float32
    # sum of zeros and ones is exact up to 2**24 elements, hence the caller's chunks.
    agree = u.mul_(g32).sign_().clamp_(min=0.0).sum(dtype=torch.float32)
    poisoned = g.mul(0.0).sum(dtype=torch.float32).isnan()
    return torch.stack((agree.to(torch.int64), poisoned.to(torch.int64)))


def apply_update(
    p: Tensor,
    m: Tensor,
    g: Tensor,
    step_size: Tensor,
    decay: Tensor,
    keep: Tensor,
    beta1: float | tuple[Tensor, Tensor],
    beta2: float | tuple[Tensor, Tensor],
    draws: Optional[tuple[Optional[Callable[[Tensor], Tensor]], Optional[Callable[[Tensor], Tensor]]]] = None,
) -> None:
    """One LionSF step of one tensor, in place, computed in float32.

    ``step_size = -lr * s_U`` and ``decay = 1 - lr * wd_eff`` are 0-d float32 tensors and
    ``keep`` a 0-d bool. A skipped unit (``keep`` false) gets ``step_size = 0`` and
    ``decay = 1`` from the caller; here its gradient becomes zeros and its momentum decay
    1, so ``p`` and ``m`` keep their values even when ``g`` holds NaN or Inf (``sign``
    maps NaN to 0). ``draws`` (for ``p`` and ``m``): turn a float32 result into the
    stochastically rounded float32 value to store, or ``None`` to round to nearest.
    """
    g32 = _f32(g)
    m32 = _f32(m)
    u = _interp(m32, g32, beta1).sign_()
    p32 = _f32(p).mul_(decay).add_(u.mul_(step_size))
    _momentum(m32, g32, keep, beta2)
    draw_p, draw_m = draws if draws is not None else (None, None)
    _store(p, p32, draw_p)
    _store(m, m32, draw_m)


def _store(dst: Tensor, value: Tensor, draw: Optional[Callable[[Tensor], Tensor]]) -> None:
    """Write the float32 ``value`` into ``dst``: nothing to do when it is ``dst``, else one rounding."""
    if value is dst:
        return
    dst.copy_(draw(value) if draw is not None and dst.dtype == torch.bfloat16 else value)


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


def _flat_chunks(size: int, *tensors: Tensor) -> list[tuple[int, tuple[Tensor, ...]]]:
    """``(offset, pieces)``: matching flat pieces of at most ``size`` elements (whole tensors if not contiguous)."""
    if not all(t.is_contiguous() for t in tensors):
        if tensors[0].numel() > EXACT_FLOAT_COUNT:
            raise ValueError(
                f"LionSF's eager kernel needs contiguous tensors above {EXACT_FLOAT_COUNT} elements "
                f"(got one of shape {tuple(tensors[0].shape)}); "
                "use use_triton=True or a contiguous layout"
            )
        return [(0, tensors)]
    flats = [t.view(-1) for t in tensors]
    return [(i, tuple(f[i : i + size] for f in flats)) for i in range(0, flats[0].numel(), size)]


Draw = Callable[[Tensor], Tensor]


def _draws(
    rounding: Optional[Rounding], seg: int, start: int, shape: torch.Size
) -> Optional[tuple[Optional[Draw], Optional[Draw]]]:
    """The stochastic-rounding functions for ``p`` and ``m`` of local elements ``start..`` of segment ``seg``."""
    if rounding is None:
        return None
    return _draw_fn(rounding, seg, 0, start, shape), _draw_fn(rounding, seg, 1, start, shape)


def _draw_fn(rounding: Rounding, seg: int, stream: int, start: int, shape: torch.Size) -> Callable[[Tensor], Tensor]:
    def draw(value: Tensor) -> Tensor:
        return stochastic_bf16(value, rounding.bits(seg, stream, start, shape, value.device))

    return draw


def _chunked_count(ms: Sequence[Tensor], gs: Sequence[Tensor], beta1s: Sequence[float]) -> Tensor:
    rows = []
    for m, g, beta1 in zip(ms, gs, beta1s):
        parts = [count_agreement(mc, gc, beta1) for _, (mc, gc) in _flat_chunks(CHUNK, m, g)]
        rows.append(parts[0] if len(parts) == 1 else torch.stack(parts).sum(0))
    return torch.stack(rows)


def _chunked_apply(
    ps: Sequence[Tensor],
    ms: Sequence[Tensor],
    gs: Sequence[Tensor],
    step_size: Tensor,
    decay: Tensor,
    keep: Tensor,
    beta1s: Sequence[float],
    beta2s: Sequence[float],
    rounding: Optional[Rounding],
    only: Optional[Sequence[int]] = None,
) -> None:
    """:func:`apply_update` chunk by chunk on segments ``only`` (default: all)."""
    a_all, d_all, k_all = step_size.unbind(), decay.unbind(), keep.unbind()
    for i in range(len(ps)) if only is None else only:
        for start, (pc, mc, gc) in _flat_chunks(CHUNK, ps[i], ms[i], gs[i]):
            args = (pc, mc, gc, a_all[i], d_all[i], k_all[i], beta1s[i], beta2s[i])
            if rounding is None:
                apply_update(*args)  # positional only: tests swap in variants with the plain signature
            else:
                apply_update(*args, draws=_draws(rounding, i, start, pc.shape))


# -- the multi-tensor path ----------------------------------------------------------------


def _groups(keys: Sequence[Hashable]) -> dict[Any, list[int]]:
    """Positions sharing a key, in order of first appearance."""
    out: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


def _pick(xs: Sequence, idx: Sequence[int]) -> list:
    return [xs[i] for i in idx]


class _Views:
    """Flat, detached views of tensors that persist from step to step (parameters, ``exp_avg``).

    Keyed by where the elements live, not by the tensor object: ``DTensor.to_local()``
    returns a new alias each step. A remembered view keeps its storage alive, so no other
    tensor can later appear at the same address. Non-contiguous tensors are only detached.
    """

    def __init__(self) -> None:
        self._views: dict[tuple, tuple[Tensor, Tensor]] = {}

    def flat(self, t: Tensor) -> Tensor:
        key = _where_in_memory(t)
        hit = self._views.get(key)
        if hit is not None:
            return hit[1]
        view = _flat(t).detach()
        self._views[key] = (t, view)
        return view

    def persistent(self, ts: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`flat` of each of ``ts``."""
        return [self.flat(t) for t in ts]

    def forget_unused(self, live: Sequence[Tensor]) -> None:
        keys = set(map(_where_in_memory, live))
        if any(k not in keys for k in self._views):
            self._views = {k: v for k, v in self._views.items() if k in keys}


def _detached_flat(ts: Sequence[Tensor]) -> list[Tensor]:
    """Flat (when contiguous) detached views of tensors that change every step (gradients).

    Compiled calls take tensors flat and detached (same storage, no ``_base``): dynamo
    guards on a view's base, which would make views of differently shaped parameters, and
    the dummies, graphs of their own.
    """
    return [_flat(t).detach() for t in ts]


def _where_in_memory(t: Tensor) -> tuple:
    """Identifies the elements ``t`` views: address, layout, dtype (meta tensors have no address: their identity)."""
    address = id(t) if t.device.type == "meta" else t.data_ptr()
    return (t.device, t.dtype, address, tuple(t.shape), t.stride())


class _ForeachKernel:
    """Each stage over all tensors of a step with ``torch._foreach_*`` ops.

    Tensors are grouped by ``(beta1, beta2)`` (``add`` with ``alpha`` takes one scalar per
    call) and by the dtypes of ``p``/``exp_avg`` (low-precision ones are promoted to
    float32 by multiplying with a ``(1,)``-shaped float32 tensor, which is exact, and are
    written back once at the end). The dispatched ops per step are a constant per group,
    not per tensor or element; on CUDA the calls whose second list holds per-tensor
    ``(1,)`` scalars take ATen's per-tensor route, the others its fused multi-tensor one.

    Counts: ``sign(u * g)`` clamped at 0 is 0 or 1, plus ``g * 0`` (NaN where ``g`` is not
    finite); a float64 L1 norm of each tensor is then the exact count, or NaN.

    The momentum update needs the gradient with NaN/Inf replaced by 0 in skipped units,
    a select no ``_foreach`` op offers: all gradients are gathered into one float32 buffer
    (one ``_chunk_cat``), where one ``nan_to_num_`` cleans them, and ``p``/``exp_avg`` are
    seen through flat views kept from step to step (they are the same tensors every step).
    Non-contiguous tensors go through the chunked path. Peak extra memory: about 8 bytes
    per element (the gathered gradients and the update direction), like AdamW's foreach.
    """

    def __init__(self) -> None:
        self.views = _Views()
        self._consts: Optional[tuple[tuple, Tensor]] = None
        self._inverse: Optional[tuple[tuple, Tensor]] = None

    def beta2_vector(self, beta2s: Sequence[float], device: torch.device) -> Tensor:
        """``beta2`` per segment on ``device``, rebuilt only when the betas change."""
        key = (tuple(beta2s), device)
        if self._consts is None or self._consts[0] != key:
            self._consts = (key, to_device(torch.tensor(beta2s, dtype=F32), device))
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
        for (b1, m_low, g_low), idx in _groups(
            [(b1, m.dtype != F32, g.dtype != F32) for m, g, b1 in zip(ms, gs, beta1s)]
        ).items():
            m_, g_ = _pick(ms, idx), _pick(gs, idx)
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
            torch._foreach_add_(c, torch._foreach_mul(g_, 0.0))
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
        step_size: Tensor,
        decay: Tensor,
        keep: Tensor,
        beta1s: Sequence[float],
        beta2s: Sequence[float],
        rounding: Optional[Rounding],
    ) -> None:
        n = len(ps)
        device = ps[0].device
        dense = [i for i in range(n) if ps[i].is_contiguous() and ms[i].is_contiguous() and gs[i].is_contiguous()]
        if len(dense) < n:
            _chunked_apply(
                ps, ms, gs, step_size, decay, keep, beta1s, beta2s, rounding, only=sorted(set(range(n)) - set(dense))
            )
        if not dense:
            return
        self.views.forget_unused([*ps, *ms])
        pf = [self.views.flat(ps[i]) for i in dense]
        mf = [self.views.flat(ms[i]) for i in dense]
        gathered, gf = _gather_f32([gs[i] for i in dense], device)
        steps = step_size.view(-1, 1).unbind(0)
        decays = decay.view(-1, 1).unbind(0)
        keeps = keep.to(F32).view(-1, 1).unbind(0)
        b2k = torch.where(keep, self.beta2_vector(beta2s, device), 1.0).view(-1, 1).unbind(0)
        groups = _groups([(beta1s[i], beta2s[i], ps[i].dtype, ms[i].dtype) for i in dense])
        # p first, from the old m; then clean the gradients of skipped units; then m
        for (b1, _, p_dtype, m_dtype), idx in groups.items():
            p_low, m_low = p_dtype != F32, m_dtype != F32
            at = [dense[j] for j in idx]
            m_ = _pick(mf, idx)
            if m_low:
                u = torch._foreach_mul(m_, [torch.full((1,), b1, dtype=F32, device=device)] * len(idx))
            else:
                u = torch._foreach_mul(m_, b1)
            torch._foreach_add_(u, _pick(gf, idx), alpha=1.0 - b1)
            torch._foreach_sign_(u)
            torch._foreach_mul_(u, _pick(steps, at))
            p_ = _pick(pf, idx)
            p32 = torch._foreach_mul(p_, _pick(decays, at)) if p_low else p_
            if not p_low:
                torch._foreach_mul_(p_, _pick(decays, at))
            torch._foreach_add_(p32, u)
            del u
            if p_low:
                self._store(p_, p32, rounding, at, 0)
        torch._foreach_mul_(list(gf), _pick(keeps, dense))
        gathered.nan_to_num_(0.0, 0.0, 0.0)
        for (_, b2, _, m_dtype), idx in groups.items():
            m_low = m_dtype != F32
            at = [dense[j] for j in idx]
            m_ = _pick(mf, idx)
            m32 = torch._foreach_mul(m_, _pick(b2k, at)) if m_low else m_
            if not m_low:
                torch._foreach_mul_(m_, _pick(b2k, at))
            torch._foreach_add_(m32, _pick(gf, idx), alpha=1.0 - b2)
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
            for start in range(0, d.numel(), CHUNK):
                piece = v[start : start + CHUNK]
                d[start : start + CHUNK].copy_(
                    stochastic_bf16(piece, rounding.bits(seg, stream, start, piece.shape, piece.device))
                )


def _gather_f32(gs: Sequence[Tensor], device: torch.device) -> tuple[Tensor, list[Tensor]]:
    """One float32 buffer holding every ``g`` (exactly), and a flat view of each ``g``'s part, in order.

    One ``_chunk_cat`` per gradient dtype (it takes one input dtype): a constant number of ops.
    """
    sizes = [g.numel() for g in gs]
    gathered = torch.empty((1, sum(sizes)), dtype=F32, device=device)
    by_dtype = _groups([g.dtype for g in gs])
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


# -- the compiled path ---------------------------------------------------------------------

# Tensors per compiled call, by device type. Sizes are dynamic and tensors flat, so one
# graph serves every batch of one dtype pattern: compile time is that of one batch, whatever
# the model, and a model whose set of tensors changes (frozen layers, MoE) keeps its graphs.
# On CPU one tensor per call: the 144-tensor bench model compiles cold in 12-15 s and steps
# at 1.8x AdamW(fused); graphs of 4 or 8 tensors generated loops several times slower here
# (5x AdamW fused) and compiled for 50-80 s. On GPUs a call's guards (~80 us) cost host
# time the kernels do not hide, so calls carry 8 tensors (not measured on a GPU yet).
COMPILE_BATCH = {"cpu": 1}
DEFAULT_COMPILE_BATCH = 8


def compile_batch(device: torch.device) -> int:
    """Tensors per compiled call on ``device``."""
    return COMPILE_BATCH.get(device.type, DEFAULT_COMPILE_BATCH)


# Distinct compiled graphs per function and process (dtype patterns, with/without rounding).
# Dynamo keeps at most ``recompile_limit`` (8 in torch 2.13) and with ``fullgraph=True``
# raises past it; staying below leaves room for graphs dynamo splits on guards we do not predict.
MAX_COMPILED_VARIANTS = 4
_variants: dict[str, set] = {"count": set(), "apply": set()}


def _flat(t: Tensor) -> Tensor:
    """A 1-D view when ``t`` is contiguous (every tensor then shares one generated loop), else ``t``."""
    return t.view(-1) if t.is_contiguous() else t


def _compiled_count(ms: list[Tensor], gs: list[Tensor], coefs: Tensor, take: Tensor) -> Tensor:
    """``[K, 2]`` counts of every ``(m, g)``; ``coefs[take[i]] = (b1, 1 - b1, b2, 1 - b2)`` in float32.

    (The per-segment tables come whole with the batch's rows ``take``: indexing inside the
    graph costs nothing, outside it an op per call.)
    """
    coefs = coefs[take]
    return torch.stack(
        [count_agreement(_flat(m), _flat(g), (coefs[i, 0], coefs[i, 1])) for i, (m, g) in enumerate(zip(ms, gs))]
    )


def _compiled_apply(
    ps: list[Tensor],
    ms: list[Tensor],
    gs: list[Tensor],
    step_size: Tensor,
    decay: Tensor,
    keep: Tensor,
    coefs: Tensor,
    keys: Optional[Tensor],
    where: Optional[Tensor],
    take: Tensor,
) -> None:
    """:func:`apply_update` of every tensor; with ``keys`` (``[K, 2]``) stochastic rounding. All tables
    come whole, with the batch's rows ``take``.

    ``where[i] = (base, outer stride, inner stride, inner size)``: local flat position ``j``
    is logical element ``base + (j // inner size) * outer stride + (j % inner size) * inner stride``
    (an :class:`IndexMap` of at most two merged dims, as tensors so that no offset is compiled in).
    """
    step_size, decay, keep, coefs = step_size[take], decay[take], keep[take], coefs[take]
    keys = None if keys is None else keys[take]
    where = None if where is None else where[take]
    for i, (p, m, g) in enumerate(zip(ps, ms, gs)):
        pf, mf, gf = _flat(p), _flat(m), _flat(g)
        draws = None
        if keys is not None and where is not None:
            j = torch.arange(p.numel(), device=p.device)
            base, outer, inner, size = where[i].unbind()
            positions = (base + (j // size) * outer + (j % size) * inner).view(pf.shape)
            draws = (_bits_draw(keys[i, 0], positions), _bits_draw(keys[i, 1], positions))
        apply_update(
            pf,
            mf,
            gf,
            step_size[i],
            decay[i],
            keep[i],
            (coefs[i, 0], coefs[i, 1]),
            (coefs[i, 2], coefs[i, 3]),
            draws=draws,
        )


def _bits_draw(key: Tensor, positions: Tensor) -> Callable[[Tensor], Tensor]:
    def draw(value: Tensor) -> Tensor:
        return stochastic_bf16(value, random16(key, positions))

    return draw


def _compile(fn: Callable, device: torch.device) -> Callable:
    """``torch.compile`` of a batch function, with options that fit ``device``.

    ``cpp.dynamic_threads`` (CPU only: inductor's C++ backend) keeps every CPU loop
    parallel; inductor otherwise left small ones on one thread.
    """
    options: dict[str, str | int | bool | Callable[..., Any]] = {}
    if device.type == "cpu":
        options["cpp.dynamic_threads"] = True
    return torch.compile(fn, dynamic=True, fullgraph=True, options=options)


def _index_rows(index: Sequence[IndexMap]) -> Optional[list[tuple[int, int, int, int]]]:
    """``where`` rows for :func:`_compiled_apply`, or ``None`` when a map has more than two merged dims."""
    rows = []
    for imap in index:
        if len(imap.sizes) == 1:
            rows.append((imap.base, 0, imap.strides[0], max(imap.sizes[0], 1)))
        elif len(imap.sizes) == 2:
            rows.append((imap.base, imap.strides[0], imap.strides[1], imap.sizes[1]))
        else:
            return None
    return rows


class _Batches:
    """How one step's tensors are cut into compiled calls: tensors sharing dtypes, layout and size class
    (0, 1, more elements: dynamo specialises sizes 0 and 1) in batches of :func:`compile_batch`, the last
    one padded with small dummy tensors (step 0, kept unchanged). Index tensors live on the device."""

    def __init__(self, lists: Sequence[Sequence[Tensor]], device: torch.device) -> None:
        n = len(lists[0])
        size = compile_batch(device)
        kinds = [tuple(_batch_kind(t) for t in ts) for ts in zip(*lists)]
        self.batches: list[tuple[tuple, list[int]]] = []
        for kind, idx in _groups(kinds).items():
            for start in range(0, len(idx), size):
                part = idx[start : start + size]
                self.batches.append((kind, part + [n] * (size - len(part))))
        flat = [i for _, part in self.batches for i in part]
        inverse = [0] * n
        for pos, i in enumerate(flat):
            if i < n:
                inverse[i] = pos
        self.take = [to_device(torch.tensor(part, dtype=torch.int64), device) for _, part in self.batches]
        self.inverse = to_device(torch.tensor(inverse, dtype=torch.int64), device)
        # distinct dummies per slot: dynamo guards on aliasing, repeated tensors would be a graph of their own
        self.dummies = {
            kind: [
                [torch.zeros((numel,) if dense else (numel,) * dim, dtype=dtype, device=device) for _ in range(size)]
                for dtype, dense, numel, dim in kind
            ]
            for kind, _ in self.batches
        }

    def lists(self, b: int, *tensor_lists: Sequence[Tensor]) -> list[list[Tensor]]:
        """The ``b``-th batch of each (already flat and detached) list, padded with the batch's dummies."""
        kind, part = self.batches[b]
        dummies = self.dummies[kind]
        return [
            [ts[i] if i < len(ts) else dummies[k][slot] for slot, i in enumerate(part)]
            for k, ts in enumerate(tensor_lists)
        ]


def _batch_kind(t: Tensor) -> tuple:
    """What a compiled graph is specialised on: dtype, size class (dynamo specialises sizes 0 and 1) and, for
    tensors that cannot be passed flat (non-contiguous), their rank."""
    dense = t.is_contiguous()
    return (t.dtype, dense, min(t.numel(), 2), 1 if dense else t.dim())


def _padded(values: Tensor, fill: float | bool) -> Tensor:
    """``values`` with one more row (``fill``) for the dummies to index."""
    return torch.cat((values, torch.full((1, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)))


class Kernel:
    """Runs :func:`count_agreement` and :func:`apply_update` over lists of tensors.

    ``compiled``: batches of tensors through ``torch.compile``-d calls (no temporaries at
    all); a new dtype pattern past :data:`MAX_COMPILED_VARIANTS` per process runs on the
    eager path instead, with one warning. ``foreach``: ``True`` the eager multi-tensor path
    (:class:`_ForeachKernel`), ``False`` the eager chunked path (cache-sized chunks, tensor
    by tensor), ``None`` multi-tensor on every non-CPU device and chunked on CPU. The
    compiled path's eager fallback is that eager path.
    """

    def __init__(self, compiled: bool, foreach: Optional[bool] = False) -> None:
        self.compiled = compiled
        self.foreach = foreach
        self._foreach_kernel = _ForeachKernel()
        self._compiled: dict[tuple[str, str], Callable] = {}
        self._coefs: Optional[tuple[tuple, Tensor]] = None
        self._batches: Optional[tuple[tuple, _Batches]] = None
        self._where: Optional[tuple[tuple, Optional[Tensor]]] = None
        self._views = _Views()
        self._warned = False

    def _multi_tensor(self, device: torch.device) -> Optional[_ForeachKernel]:
        """The multi-tensor kernel when it is the eager path for ``device`` (``foreach=None``: on every non-CPU one)."""
        use = self.foreach if self.foreach is not None else device.type != "cpu"
        return self._foreach_kernel if use else None

    def count(self, ms: Sequence[Tensor], gs: Sequence[Tensor], beta1s: Sequence[float]) -> Tensor:
        """``[S, 2]`` int64: :func:`count_agreement` of each ``(m, g)``; ``A`` is 0 where ``P > 0``.

        (A tensor with a non-finite gradient skips its unit; the paths' raw counts differ
        there, so its ``A`` is set to 0 on all of them and ``last_agreement`` does not
        depend on the path.)
        """
        rows = self._count_compiled(ms, gs, beta1s) if self.compiled else None
        if rows is None:
            multi = self._multi_tensor(ms[0].device)
            rows = multi.count(ms, gs, beta1s) if multi is not None else _chunked_count(ms, gs, beta1s)
        return torch.stack((rows[:, 0] * (rows[:, 1] == 0), rows[:, 1]), dim=1)

    def apply(
        self,
        ps: Sequence[Tensor],
        ms: Sequence[Tensor],
        gs: Sequence[Tensor],
        step_size: Tensor,
        decay: Tensor,
        keep: Tensor,
        beta1s: Sequence[float],
        beta2s: Sequence[float],
        rounding: Optional[Rounding] = None,
    ) -> None:
        """:func:`apply_update` on each ``(p, m, g)`` with the ``i``-th entry of ``step_size``, ``decay``, ``keep``.

        ``rounding``: stochastic rounding of bfloat16 ``p`` and ``exp_avg`` (else to nearest).
        """
        if self.compiled and self._apply_compiled(ps, ms, gs, step_size, decay, keep, beta1s, beta2s, rounding):
            return
        multi = self._multi_tensor(ps[0].device)
        if multi is not None:
            multi.apply(ps, ms, gs, step_size, decay, keep, beta1s, beta2s, rounding)
            return
        _chunked_apply(ps, ms, gs, step_size, decay, keep, beta1s, beta2s, rounding)

    # -- compiled ---------------------------------------------------------------------

    def _count_compiled(self, ms: Sequence[Tensor], gs: Sequence[Tensor], beta1s: Sequence[float]) -> Optional[Tensor]:
        device = ms[0].device
        plan = self._plan((ms, gs), device)
        coefs = self._coef_tensor(beta1s, beta1s, device, padded=True)
        ms, gs = self._views.persistent(ms), _detached_flat(gs)
        parts = []
        with no_duck_shapes():  # once per step: the config patch costs as much as a compiled call's guards
            for b, take in enumerate(plan.take):
                fn = self._compiled_fn("count", _compiled_count, plan.batches[b][0], False, device)
                if fn is None:
                    return None
                done, rows = fn(*plan.lists(b, ms, gs), coefs, take)
                if not done:
                    return None
                parts.append(rows)
        return torch.cat(parts)[plan.inverse]

    def _apply_compiled(
        self,
        ps: Sequence[Tensor],
        ms: Sequence[Tensor],
        gs: Sequence[Tensor],
        step_size: Tensor,
        decay: Tensor,
        keep: Tensor,
        beta1s: Sequence[float],
        beta2s: Sequence[float],
        rounding: Optional[Rounding],
    ) -> bool:
        """Run the compiled apply; ``False`` (nothing done) when a batch cannot be compiled."""
        device = ps[0].device
        plan = self._plan((ps, ms, gs), device)
        where = self._where_tensor(rounding, device) if rounding is not None else None
        if rounding is not None and where is None:
            return False  # a shard layout of more than two merged dims: the eager paths handle any
        fns = []
        for kind, _ in plan.batches:
            fn = self._compiled_fn("apply", _compiled_apply, kind, rounding is not None, device)
            if fn is None:
                return False
            fns.append(fn)
        coefs = self._coef_tensor(beta1s, beta2s, device, padded=True)
        step_size, decay, keep = _padded(step_size, 0.0), _padded(decay, 1.0), _padded(keep, False)
        keys = _padded(rounding.keys(), 0) if rounding is not None else None
        self._views.forget_unused([*ps, *ms])
        lists = self._views.persistent(ps), self._views.persistent(ms), _detached_flat(gs)
        with no_duck_shapes():
            for b, (fn, take) in enumerate(zip(fns, plan.take)):
                done, _ = fn(*plan.lists(b, *lists), step_size, decay, keep, coefs, keys, where, take)
                if not done:  # only the first batch can fail (a new graph): nothing was written yet
                    if b:
                        raise RuntimeError("LionSF's compiled kernel failed after part of the step was applied")
                    return False
        return True

    def _plan(self, lists: tuple[Sequence[Tensor], ...], device: torch.device) -> _Batches:
        key = (device, tuple(_batch_kind(t) for ts in lists for t in ts))
        if self._batches is None or self._batches[0] != key:
            self._batches = (key, _Batches(lists, device))
        return self._batches[1]

    def _where_tensor(self, rounding: Rounding, device: torch.device) -> Optional[Tensor]:
        key = (rounding.index, device)
        if self._where is None or self._where[0] != key:
            rows = _index_rows(rounding.index)
            where = None if rows is None else _padded(to_device(torch.tensor(rows, dtype=torch.int64), device), 1)
            self._where = (key, where)
        return self._where[1]

    def _coef_tensor(
        self, beta1s: Sequence[float], beta2s: Sequence[float], device: torch.device, padded: bool = False
    ) -> Tensor:
        """``[S, 4]`` float32 ``(b1, 1 - b1, b2, 1 - b2)`` on ``device`` (``padded``: and a zero row for dummies),
        rebuilt only when the betas change."""
        key = (tuple(beta1s), tuple(beta2s), device, padded)
        if self._coefs is None or self._coefs[0] != key:
            rows = [(b1, 1.0 - b1, b2, 1.0 - b2) for b1, b2 in zip(beta1s, beta2s)] + ([(0.0,) * 4] if padded else [])
            host = torch.tensor(rows, dtype=torch.float64).to(F32)
            self._coefs = (key, to_device(host, device))
        return self._coefs[1]

    def _compiled_fn(
        self, kind: str, fn: Callable, layout: tuple, rounding: bool, device: torch.device
    ) -> Optional[Callable]:
        """The compiled ``fn``, or ``None`` (eager) for a new variant once the variant budget is spent."""
        variant = (device.type, layout, rounding)
        seen = _variants[kind]
        if variant not in seen:
            if len(seen) >= MAX_COMPILED_VARIANTS:
                self._warn_fallback()
                return None
            seen.add(variant)
        key = (kind, device.type)
        if key not in self._compiled:
            self._compiled[key] = _guarded(_compile(fn, device), self)
        return self._compiled[key]

    def _warn_fallback(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"LionSF(use_triton=True): more than {MAX_COMPILED_VARIANTS} kinds of tensor batches (dtypes, layouts, "
                "rounding) were compiled in this process; new kinds now run on the eager path, with the same maths, "
                "instead of compiling again",
                RuntimeWarning,
                stacklevel=4,
            )


def _guarded(compiled: Callable, kernel: Kernel) -> Callable[..., tuple[bool, object]]:
    """``(True, compiled(*args))``, or ``(False, None)`` when dynamo's recompile limit was hit through graphs we
    did not predict (the caller then runs the eager path; nothing ran). Callers run it without duck shaping
    (sizes get their own symbols), so batches whose tensors happen to share a size share the graph."""

    def run(*args: object) -> tuple[bool, object]:
        try:
            return True, compiled(*args)
        except recompile_limit_hit():
            kernel._warn_fallback()
            return False, None

    return run
