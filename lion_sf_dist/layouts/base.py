"""The layout interface: how the tensors LionSF holds map to pieces of logical parameters.

LionSF never looks at how parameters are spread over ranks; it asks its layout, chosen
once (:class:`~lion_sf_dist.layouts.params.ParamLayout` for plain and DTensor parameters,
:class:`~lion_sf_dist.layouts.zero.ZeroLayout` for DeepSpeed ZeRO's flat partitions, handed
over by :func:`lion_sf_dist.deepspeed.attach`). Control runs one way: the optimizer calls
the layout, the layout never calls the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lion_sf_dist.rounding import IndexMap
from lion_sf_dist.units import Units

ParamGroups = Sequence[dict[str, Any]]
State = dict[Any, dict[str, Any]]


@dataclass
class Segment:
    """Local views ``p``, ``g``, ``m`` (same shape) of some elements of one logical parameter: what the kernel steps.

    ``process_group`` is the group over which this piece's counts are summed so that every
    element of the logical parameter is counted once (``None``: this rank holds all of
    them). ``counted`` is false on a rank holding a replica of elements another rank of
    ``process_group`` already counts. For stochastic rounding, ``param_id`` names the
    logical parameter alike on every rank (its position among the optimizer's parameters)
    and ``index`` says where the local elements sit in it (``None``: a layout that cannot say).
    """

    p: Tensor
    g: Tensor
    m: Tensor
    unit: int
    param_group: dict[str, Any]
    process_group: Optional[dist.ProcessGroup] = None
    counted: bool = True
    param_id: int = -1
    index: Optional[IndexMap] = None


@dataclass(frozen=True)
class Fragment:
    """What this rank holds of one logical parameter, for checkpoints.

    ``param`` is the model's parameter object (its identity names it). ``whole``: ``data``
    and ``exp_avg`` are the parameter as the model holds it (a full tensor, or a DTensor
    that knows its own sharding); otherwise they are 1-D views of elements
    ``[offset, offset + data.numel())`` of the row-major flattened logical tensor of
    ``shape``. Writing into ``data``/``exp_avg`` changes what the optimizer steps.
    """

    param: Tensor
    unit: int
    shape: torch.Size
    data: Tensor
    exp_avg: Tensor
    whole: bool
    offset: int = 0


class Layout(Protocol):
    """One way of holding parameters. The optimizer calls, in this order per step:
    :meth:`init_state` (cheap when nothing changed), :meth:`segments`, then, when
    segments came back and were stepped, :meth:`finish`. ``state_dtype`` (set by the
    optimizer): the dtype of the ``exp_avg`` it creates (``None``: the parameter's)."""

    state_dtype: Optional[torch.dtype]

    def init_state(
        self, param_groups: ParamGroups, state: State, original: Sequence[Sequence[Optional[Tensor]]], units: Units
    ) -> None:
        """Give every tensor the optimizer steps its ``exp_avg`` (eager state), in place in ``state``.

        ``original``: the tensors each param group held when added (units refer to these
        positions). Called at construction, after a load and before each step.
        """
        ...

    def forget(self) -> None:
        """The optimizer's state was replaced (a load): check it again at the next :meth:`init_state`."""
        ...

    def segments(
        self, param_groups: ParamGroups, state: State, units: Units, *, indexed: bool = True
    ) -> Optional[list[Segment]]:
        """The pieces to step now, or ``None`` while a step is still being collected (ZeRO).

        ``indexed``: each segment's ``index`` is needed (stochastic rounding); where finding
        it costs work (a DTensor placement other than ``Shard``/``Replicate`` is probed),
        a layout may leave it ``None`` otherwise.
        """
        ...

    def finish(self) -> None:
        """After a step of the segments: propagate the updated values where the engine reads them."""
        ...

    def fragments(
        self, param_groups: ParamGroups, state: State, original: Sequence[Sequence[Optional[Tensor]]], units: Units
    ) -> list[Fragment]:
        """This rank's piece of every parameter the optimizer holds (checkpoints read and write these)."""
        ...

    def refresh(self) -> None:
        """After :meth:`fragments`' tensors were written (a checkpoint load): make the engine see them."""
        ...
