"""Several LionSF instances, one set of agreement units: their counts reduced together.

torchtitan builds one optimizer per model part, and pipeline stages live on different
ranks; counted per optimizer, ``agreement="global"`` (or ``"group"``, or a module split
across parts) would mean one unit per part and per stage. A :class:`Coordinator` joins the
optimizers built with ``coordinator=``: each member's ``step()`` only records its pieces,
and the step of the last member of this process counts every member at once, sums the
counts over each process group once (and once over ``process_group``, the ranks holding
the other stages), and applies every member's update with the scales of the joint units.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from lion_sf_dist.reduce import reduce_counts


class Member(Protocol):
    """What the coordinator needs of a LionSF (it never reaches further into one)."""

    @property
    def agreement(self) -> str: ...

    @property
    def unit_names(self) -> tuple[str, ...]: ...

    def local_counts(self, segments: list[Any]) -> tuple[Tensor, list[Optional[dist.ProcessGroup]]]: ...

    def finish_step(self, segments: list[Any], totals: Tensor) -> None: ...


class Coordinator:
    """Counts the agreement units of its member optimizers together, so they equal one LionSF over all parameters.

    Units are matched by name (``LionSF.unit_names``): ``"global"`` spans every member,
    ``"module"`` a module whatever part holds it, ``"group"`` the param groups of the same
    index, ``"tensor"`` stays per parameter. Every member must take exactly one ``step()``
    per training step, in any order (torchtitan's ``OptimizersContainer`` does); the last
    one of this process does the work. With ``process_group`` (the pipeline group: one rank
    per stage) the members of every rank of that group are joined too; each rank must then
    step its members at the same training step.
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        self.process_group = process_group
        self._members: list[weakref.ref] = []
        self._pending: dict[int, list[Any]] = {}
        self._table: Optional[tuple[tuple, list[Tensor], int]] = None

    def join(self, member: Member) -> None:
        """Add ``member`` (done by ``LionSF(..., coordinator=self)``); members share one ``agreement``."""
        live = self._live()
        if live and live[0].agreement != member.agreement:
            raise ValueError(
                f"a Coordinator's optimizers share one agreement; got {member.agreement!r} beside {live[0].agreement!r}"
            )
        self._members.append(weakref.ref(member))
        self._table = None

    def _live(self) -> list[Member]:
        return [m for m in (ref() for ref in self._members) if m is not None]

    def submit(self, member: Member, segments: list[Any]) -> None:
        """Record ``member``'s pieces of this step; once every member has, step them all (collective)."""
        if id(member) in self._pending:
            raise RuntimeError(
                "a LionSF of this Coordinator stepped twice before every member stepped once; "
                "step each member exactly once per training step"
            )
        self._pending[id(member)] = segments
        members = self._live()
        if len(self._pending) < len(members):
            return
        pending, self._pending = self._pending, {}
        parts = [(m, pending[id(m)]) for m in members]
        maps, count = self._unit_maps(members)
        counted = [(m.local_counts(segs), umap) for (m, segs), umap in zip(parts, maps) if segs]
        device = counted[0][0][0].device if counted else torch.device("cpu")
        groups: dict[int, Optional[dist.ProcessGroup]] = {id(None): None}
        for (_, pgs), _ in counted:
            for pg in pgs:
                groups.setdefault(id(pg), pg)
        slot = {key: i for i, key in enumerate(groups)}
        combined = torch.zeros(len(groups), count, 3, dtype=torch.int64, device=device)
        for (slotted, pgs), umap in counted:
            for k, pg in enumerate(pgs):
                combined[slot[id(pg)]].index_add_(0, umap.to(device), slotted[k])
        totals = reduce_counts(combined, list(groups.values()))
        if self.process_group is not None and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(totals, group=self.process_group)
        for (m, segs), umap in zip(parts, maps):
            m.finish_step(segs, totals.index_select(0, umap.to(device)))

    def _unit_maps(self, members: list[Member]) -> tuple[list[Tensor], int]:
        """Each member's unit -> joint unit index, and the number of joint units (agreed over ``process_group``)."""
        key = tuple(m.unit_names for m in members)
        if self._table is None or self._table[0] != key:
            names = list(dict.fromkeys(n for m in members for n in m.unit_names))
            if self.process_group is not None:
                everyone: list[Any] = [None] * dist.get_world_size(self.process_group)
                dist.all_gather_object(everyone, names, group=self.process_group)
                names = sorted({n for ns in everyone for n in ns})
            index = {n: i for i, n in enumerate(names)}
            maps = [torch.tensor([index[n] for n in m.unit_names], dtype=torch.int64) for m in members]
            self._table = (key, maps, len(names))
        return self._table[1], self._table[2]
