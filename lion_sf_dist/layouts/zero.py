"""LionSF over DeepSpeed ZeRO flat partitions: segments, the per-engine-step schedule, fragments.

Under ZeRO stages 1-3 DeepSpeed calls the client optimizer's ``step()`` once per flat fp32
partition (per param group in stages 1/2, per sub-group in stage 3), each time with only
that partition in ``param_groups``, and it creates each partition's gradient just before
that call (unscaled and clipped). A unit may span partitions, so no partition can be
stepped before every partition's gradient has been counted. :class:`ZeroLayout` therefore
collects the calls of one engine step; the last one counts every partition (one int64
all-reduce per process group), applies every partition's update with the resulting
per-unit scales, and copies the partitions stepped earlier to DeepSpeed's bit16 copy (the
copy DeepSpeed made after their own call still held the old values). With one partition
(one param group, the usual case) nothing is deferred.

:func:`zero_fragments` exposes each rank's slices of each logical parameter, for checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lion_sf_dist.layouts.segment import Segment
from lion_sf_dist.layouts.zero_internals import Partition, client_optimizer, zero_stage_of


@dataclass
class _Call:
    """What one of DeepSpeed's per-partition ``step()`` calls handed over."""

    group: dict[str, Any]
    grad: Tensor


class ZeroLayout:
    """Steps a :class:`~lion_sf_dist.LionSF` whose ``param_groups`` DeepSpeed replaced by flat partitions.

    ``partitions``: this rank's partitions (see :mod:`lion_sf_dist.layouts.zero_internals`);
    ``unit_of``: ``id(parameter) -> unit`` for the logical (bit16) parameters. Each
    partition's ``exp_avg`` is created at construction (DeepSpeed links views of it to the
    parameters after the first step), carrying over any ``exp_avg`` the optimizer already
    held for the original parameters.
    """

    def __init__(self, optimizer: Any, partitions: list[Partition], unit_of: dict[int, int],
                 unit_group: list[dict[str, Any]]) -> None:
        self.optimizer = optimizer
        self.partitions = partitions
        self._index = {id(part.flat): k for k, part in enumerate(partitions)}
        self._pending: dict[int, _Call] = {}
        self._units = [[unit_of[id(f.param)] for f in part.fragments] for part in partitions]
        self._unit_group = unit_group
        self._ema: Optional[Tensor] = None
        old_state = optimizer.state
        ema = _carried_ema(old_state, unit_of, len(unit_group)) if optimizer.agreement_ema else None
        new_state: dict[Any, dict[str, Any]] = {}
        for part in partitions:
            exp_avg = torch.zeros_like(part.flat)
            for f in part.fragments:
                old = old_state.get(f.param, {}).get("exp_avg")
                if old is not None and f.numel:
                    src = old.reshape(-1)[f.param_offset : f.param_offset + f.numel]
                    exp_avg[f.flat_offset : f.flat_offset + f.numel].copy_(src)
            new_state[part.flat] = {"exp_avg": exp_avg}
            if ema is not None:
                new_state[part.flat]["agreement_ema"] = ema.to(part.flat.device)
        optimizer.state.clear()
        optimizer.state.update(new_state)

    def ema_state(self, device: torch.device) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The per-unit agreement average (SPEC section 8), and each unit's ``(beta1, beta2)``.

        One float32 vector over all units, identical on every rank, referenced from every
        partition's state as ``"agreement_ema"`` (so DeepSpeed checkpoints carry it); after a
        load gave the partitions separate copies, the first partition's is adopted again.
        """
        states = [self.optimizer.state[part.flat] for part in self.partitions]
        if self._ema is None or any(st.get("agreement_ema") is not self._ema for st in states):
            loaded = states[0].get("agreement_ema") if states else None
            n = len(self._unit_group)
            fresh = loaded is not None and tuple(loaded.shape) == (n,)
            self._ema = loaded.float().to(device).clone() if fresh else torch.zeros(n, device=device)
            for st in states:
                st["agreement_ema"] = self._ema
        betas = torch.tensor([g["betas"] for g in self._unit_group], dtype=torch.float32, device=device)
        return self._ema, (betas[:, 0], betas[:, 1])

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One of DeepSpeed's per-partition calls; the last of an engine step steps all partitions."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held = [(group, p) for group in self.optimizer.param_groups for p in group["params"]]
        for group, flat in held:
            k = self._index.get(id(flat))
            if k is None or self.partitions[k].flat is not flat:
                raise RuntimeError(
                    "lion_sf_dist: LionSF was stepped with a tensor that is none of the DeepSpeed partitions "
                    "it was attached to (the engine was rebuilt? attach the new engine)"
                )
            if k in self._pending:
                self._pending.clear()  # a new engine step after an interrupted one
            if flat.grad is None:
                raise RuntimeError(f"lion_sf_dist: DeepSpeed partition {k} has no gradient at its step")
            self._pending[k] = _Call(group, flat.grad)
        if len(self._pending) == len(self.partitions):
            current = {id(flat) for _, flat in held}
            self._step_all()
            for k, part in enumerate(self.partitions):
                if id(part.flat) not in current:
                    part.writeback()
        return loss

    def _step_all(self) -> None:
        calls, self._pending = self._pending, {}
        segments = []
        for k, part in enumerate(self.partitions):
            call = calls[k]
            m = self.optimizer.state[part.flat]["exp_avg"]
            for f, unit in zip(part.fragments, self._units[k]):
                lo, hi = f.flat_offset, f.flat_offset + f.numel
                segments.append(Segment(part.flat.data[lo:hi], call.grad[lo:hi], m[lo:hi], unit, call.group,
                                        part.process_group))
        scale, keep = self.optimizer.unit_scales(segments)
        self.optimizer.apply(segments, scale, keep)


def _carried_ema(state: Any, unit_of: dict[int, int], n_units: int) -> Tensor:
    """The agreement averages LionSF already held per parameter (0-d views), as one vector."""
    ema = torch.zeros(n_units)
    for p, st in list(state.items()):
        if isinstance(p, Tensor) and id(p) in unit_of and "agreement_ema" in st:
            ema[unit_of[id(p)]] = st["agreement_ema"].float().cpu()
    return ema


@dataclass(frozen=True)
class ZeroFragment:
    """A rank's slice of one logical parameter under DeepSpeed.

    Elements ``[offset, offset + param.numel())`` of the flattened parameter ``name``
    (logical shape ``shape``). ``param`` and ``exp_avg`` are 1-D views of the fp32
    master copy and the optimizer state: writing them changes what DeepSpeed steps
    (call ``engine.optimizer.update_lp_params()`` or take a step to refresh bit16 weights).
    ``replicated``: every rank holds these same elements (ZeRO-0), so one rank's suffice.
    """

    name: str
    shape: torch.Size
    offset: int
    param: Tensor
    exp_avg: Tensor
    replicated: bool = False


def zero_fragments(engine: Any) -> list[ZeroFragment]:
    """This rank's ``(name, offset in the flattened parameter, param slice, exp_avg slice)`` fragments.

    For an engine whose LionSF was attached (:func:`lion_sf_dist.deepspeed.attach`). Under
    ZeRO 1-3 the fragments of all ranks tile every trainable parameter exactly once
    (padding excluded; a rank may hold no element of a parameter, it then has no fragment
    of it). Under ZeRO-0 every rank returns every parameter whole, ``replicated=True``.
    """
    names = {id(p): n for n, p in engine.module.named_parameters()}
    layout = _layout_of(engine)
    opt = layout.optimizer if isinstance(layout, ZeroLayout) else layout
    if not isinstance(layout, ZeroLayout):
        out = []
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in names:
                    out.append(ZeroFragment(names[id(p)], p.shape, 0, p.data.view(-1),
                                            opt.state[p]["exp_avg"].view(-1), replicated=True))
        return out
    out = []
    for part in layout.partitions:
        m = opt.state[part.flat]["exp_avg"]
        for f in part.fragments:
            if f.numel:
                lo, hi = f.flat_offset, f.flat_offset + f.numel
                out.append(ZeroFragment(names[id(f.param)], torch.Size(f.shape), f.param_offset,
                                        part.flat.data[lo:hi], m[lo:hi]))
    return out


def _layout_of(engine: Any) -> Any:
    """The attached :class:`ZeroLayout`, or the plain LionSF of a ZeRO-0 engine."""
    from lion_sf_dist.optimizer import LionSF

    opt = engine.optimizer
    if isinstance(opt, LionSF):
        return opt
    inner = client_optimizer(opt) if zero_stage_of(opt) else None
    if isinstance(inner, LionSF) and isinstance(inner._layout, ZeroLayout):
        return inner._layout
    raise ValueError("zero_fragments: the engine's optimizer is not a LionSF attached with lion_sf_dist.deepspeed.attach")
