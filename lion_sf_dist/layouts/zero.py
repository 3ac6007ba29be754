"""The layout of DeepSpeed ZeRO 1-3 flat partitions, and the per-engine-step schedule.

Under ZeRO stages 1-3 DeepSpeed calls the client optimizer's ``step()`` once per flat fp32
partition (per param group in stages 1/2, per sub-group in stage 3), each time with only
that partition in ``param_groups``, and it creates each partition's gradient just before
that call (unscaled and clipped). A unit may span partitions, so no partition can be
stepped before every partition's gradient has been counted. :class:`ZeroLayout` therefore
collects the calls of one engine step and hands the optimizer every partition's segments
at the last one; :meth:`ZeroLayout.finish` then copies the partitions stepped at earlier
calls to DeepSpeed's bit16 copy (DeepSpeed copied them after their own call, when they
still held the old values). With one partition (one param group, the usual case) nothing
is deferred. Which slice of which parameter a partition holds comes from
:mod:`lion_sf_dist.layouts.zero_internals`, the one module that reads DeepSpeed's private names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from lion_sf_dist.layouts.base import Fragment, ParamGroups, Segment, State
from lion_sf_dist.layouts.zero_internals import Partition, partitions_of, refresh_bit16
from lion_sf_dist.rounding import IndexMap
from lion_sf_dist.units import Units


@dataclass
class _Call:
    """What one of DeepSpeed's per-partition ``step()`` calls handed over."""

    param_group: dict[str, Any]
    grad: Tensor


class ZeroLayout:
    """LionSF's view of a ZeRO optimizer (``zero_optimizer``) that replaced its parameters by flat partitions.

    ``exp_avg`` is kept per partition (one flat tensor, so DeepSpeed's own checkpoints and
    state views work), created when the optimizer adopts this layout: taken over from a
    state loaded into the partitions before that, else cut from the ``exp_avg`` the
    optimizer held for the original parameters, else zeros.
    """

    def __init__(self, zero_optimizer: Any) -> None:
        self.zero_optimizer = zero_optimizer
        self.partitions: list[Partition] = partitions_of(zero_optimizer)
        self._index = {id(part.flat): k for k, part in enumerate(self.partitions)}
        self._pending: dict[int, _Call] = {}
        self._units: Optional[list[list[int]]] = None
        self._deferred: list[Partition] = []
        self._position: dict[int, int] = {}
        self.state_dtype: Optional[torch.dtype] = None

    def init_state(
        self, param_groups: ParamGroups, state: State, original: Sequence[Sequence[Optional[Tensor]]], units: Units
    ) -> None:
        if self._units is not None:
            return
        unit_of = {id(p): u for ps, ids in zip(original, units.ids) for p, u in zip(ps, ids) if p is not None}
        unknown = [f.shape for part in self.partitions for f in part.slices if id(f.param) not in unit_of]
        if unknown:
            raise RuntimeError(
                f"lion_sf_dist: DeepSpeed partitions hold parameters (shapes {unknown}) "
                "that the LionSF was not constructed with"
            )
        self._position = {id(p): i for i, p in enumerate(p for ps in original for p in ps) if p is not None}
        dtype = self.state_dtype or None
        new_state: State = {}
        for part in self.partitions:
            loaded = state.get(part.flat, {}).get("exp_avg")
            if loaded is not None and loaded.shape == part.flat.shape:
                new_state[part.flat] = {**state[part.flat], "exp_avg": loaded.to(dtype or loaded.dtype)}
                continue
            exp_avg = torch.zeros_like(part.flat, dtype=dtype)
            for f in part.slices:
                old = state.get(f.param, {}).get("exp_avg")
                if old is not None and f.numel:
                    exp_avg[f.flat_offset : f.flat_offset + f.numel].copy_(
                        old.reshape(-1)[f.param_offset : f.param_offset + f.numel]
                    )
            new_state[part.flat] = {"exp_avg": exp_avg}
        state.clear()
        state.update(new_state)
        self._units = [[unit_of[id(f.param)] for f in part.slices] for part in self.partitions]

    def forget(self) -> None:
        """Nothing to re-check after a load: state stays keyed by the partitions."""

    def segments(
        self, param_groups: ParamGroups, state: State, units: Units, *, indexed: bool = True
    ) -> Optional[list[Segment]]:
        """Record this per-partition call; at the last of an engine step, every partition's segments
        (indexed whatever ``indexed`` says: a fragment's offset costs nothing)."""
        held = [(group, p) for group in param_groups for p in group["params"]]
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
        if len(self._pending) < len(self.partitions):
            return None
        calls, self._pending = self._pending, {}
        current = {id(flat) for _, flat in held}
        self._deferred = [part for part in self.partitions if id(part.flat) not in current]
        assert self._units is not None, "init_state runs before segments"
        segments = []
        for k, part in enumerate(self.partitions):
            call, m = calls[k], state[part.flat]["exp_avg"]
            for f, unit in zip(part.slices, self._units[k]):
                lo, hi = f.flat_offset, f.flat_offset + f.numel
                segments.append(
                    Segment(
                        part.flat.data[lo:hi],
                        call.grad[lo:hi],
                        m[lo:hi],
                        unit,
                        call.param_group,
                        part.process_group,
                        param_id=self._position.get(id(f.param), -1),
                        index=IndexMap.slice(f.param_offset, f.numel),
                    )
                )
        return segments

    def finish(self) -> None:
        """Copy the partitions stepped at earlier calls of this engine step to DeepSpeed's bit16 copy."""
        deferred, self._deferred = self._deferred, []
        for part in deferred:
            part.writeback()

    def fragments(
        self, param_groups: ParamGroups, state: State, original: Sequence[Sequence[Optional[Tensor]]], units: Units
    ) -> list[Fragment]:
        """This rank's slices of every parameter (padding excluded; none for a parameter it holds no element of)."""
        assert self._units is not None, "init_state runs before fragments"
        out = []
        for part, ids in zip(self.partitions, self._units):
            m = state[part.flat]["exp_avg"]
            for f, unit in zip(part.slices, ids):
                if f.numel:
                    lo, hi = f.flat_offset, f.flat_offset + f.numel
                    out.append(
                        Fragment(
                            f.param,
                            unit,
                            torch.Size(f.shape),
                            part.flat.data[lo:hi],
                            m[lo:hi],
                            whole=False,
                            offset=f.param_offset,
                        )
                    )
        return out

    def refresh(self) -> None:
        """Recompute the bit16 weights DeepSpeed computes with from the fp32 partitions; collective."""
        refresh_bit16(self.zero_optimizer)
