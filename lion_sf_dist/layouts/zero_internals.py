"""Every private DeepSpeed attribute lion_sf_dist reads, in one place (DeepSpeed 0.19.8).

DeepSpeed's ZeRO optimizers hand the client optimizer flat fp32 partitions, not
parameters. This module reads, from a ZeRO optimizer, which slice of which logical
(bit16) parameter each flat partition holds, padding excluded, and how to copy an
updated partition back to the bit16 copy DeepSpeed gathers from. Nothing else in the
package touches a private DeepSpeed name; ``tests/test_deepspeed_internals.py`` checks
each name used here, so a DeepSpeed release that renames one fails loudly there.

Recipes (each verified by rebuilding every parameter bit for bit from all ranks' slices):

* Stage 1/2 (``DeepSpeedZeroOptimizer``): for group ``i`` with rank ``r`` in
  ``real_dp_process_group[i]``, ``single_partition_of_fp32_groups[i]`` covers
  ``[r * partition_size[i], (r + 1) * partition_size[i])`` of the group's flat buffer,
  where parameter ``k`` of ``round_robin_bit16_groups[i]`` starts at
  ``round_robin_bit16_offsets[i][k]`` with ``round_robin_bit16_meta[i][k].numel()``
  elements (alignment padding lies between and after them). ``lp._hp_mapping`` is not
  used: it is computed in the original order while the buffer may be round-robin ordered.
* Stage 3 (``DeepSpeedZeroOptimizer_Stage3``): for sub-group ``i`` with rank ``r`` in
  ``sub_group_process_groups[i]``, ``fp32_partitioned_groups_flat[i]`` holds, for each
  ``p`` of ``fp16_groups[i]`` with ``(_, off, pn) = grad_position[get_param_id(p)]``,
  elements ``[r * pn, r * pn + n)`` of the flattened parameter at ``off``, where
  ``n = max(0, min(pn, p.ds_numel - r * pn))``; padding follows each slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

# Attributes a ZeRO optimizer must have for the recipes above (checked by tests and at attach).
STAGE12_ATTRS = (
    "optimizer",
    "real_dp_process_group",
    "partition_size",
    "single_partition_of_fp32_groups",
    "round_robin_bit16_groups",
    "round_robin_bit16_offsets",
    "round_robin_bit16_meta",
    "parallel_partitioned_bit16_groups",
    "cpu_offload",
)
STAGE3_ATTRS = (
    "optimizer",
    "fp32_partitioned_groups_flat",
    "fp16_partitioned_groups_flat",
    "fp16_groups",
    "sub_group_process_groups",
    "grad_position",
    "get_param_id",
    "offload_optimizer",
    "swap_optimizer",
    "partial_offload",
)
# Markers DeepSpeed leaves on the model parameters it flattens (stage 1/2 and its bf16
# optimizer set ``_hp_mapping`` on every parameter, ``None`` where this rank holds none of
# it; stage 3 partitions carry ``ds_id``).
FLATTENED_MARKERS = ("_hp_mapping", "ds_id")
# Read after a checkpoint load to recompute the bit16 weights from the fp32 partitions.
REFRESH_ATTRS = {
    1: ("update_lp_params",),
    3: ("_reassign_or_swap_out_partitioned_parameters", "persistent_parameters", "invalidate_secondary_tensor"),
}


@dataclass(frozen=True)
class Slice:
    """``numel`` elements of logical parameter ``param`` (flattened, logical shape ``shape``),
    from ``param_offset``, lying at ``flat_offset`` of a flat partition. ``numel`` is 0 on a
    rank holding none of it."""

    param: Tensor
    shape: tuple[int, ...]
    param_offset: int
    flat_offset: int
    numel: int


@dataclass
class Partition:
    """One flat fp32 partition the client optimizer steps, and what it holds.

    ``process_group``: the ranks whose partitions together hold these parameters; ``writeback``: copies the
    (updated) flat partition to the bit16 copy DeepSpeed gathers parameters from.
    """

    flat: Tensor
    process_group: Optional[dist.ProcessGroup]
    slices: list[Slice]
    writeback: Callable[[], None]


def partitioned_by_zero3(p: Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter (its tensor is an empty placeholder; DeepSpeed holds the data)."""
    return hasattr(p, "ds_id")


def logical_shape(p: Tensor) -> torch.Size:
    """The shape of ``p`` as the model defines it (ZeRO-3 replaces ``p.shape`` by a placeholder's)."""
    return torch.Size(getattr(p, "ds_shape", p.shape))


def flattened_by_deepspeed(p: Tensor) -> bool:
    """Whether DeepSpeed has replaced ``p`` by flat partitions in its optimizer (ZeRO >= 1, bf16)."""
    return any(hasattr(p, name) for name in FLATTENED_MARKERS)


def zero_stage_of(zero_optimizer: Any) -> int:
    """1 (stages 1 and 2 share one class), 3, or 0 for anything else (the client optimizer itself)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(zero_optimizer, DeepSpeedZeroOptimizer_Stage3):
        return 3
    if isinstance(zero_optimizer, DeepSpeedZeroOptimizer):
        return 1
    return 0


def check_attributes(zero_optimizer: Any) -> None:
    """Raise if ``zero_optimizer`` lacks an attribute the recipes read (a changed DeepSpeed)."""
    stage = zero_stage_of(zero_optimizer)
    recipe: tuple[str, ...] = STAGE3_ATTRS if stage == 3 else STAGE12_ATTRS if stage == 1 else ()
    names = recipe + REFRESH_ATTRS.get(stage, ())
    missing = [n for n in names if not hasattr(zero_optimizer, n)]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"lion_sf_dist: {type(zero_optimizer).__name__} of DeepSpeed {deepspeed.__version__} lacks {missing}; "
            "lion_sf_dist/layouts/zero_internals.py was written for DeepSpeed 0.19.8 and needs updating"
        )


def client_optimizer(zero_optimizer: Any) -> Any:
    """The optimizer a ZeRO optimizer wraps (the one whose ``step`` it calls per partition)."""
    return zero_optimizer.optimizer


def unsupported_reason(zero_optimizer: Any) -> Optional[str]:
    """Why this ZeRO optimizer's configuration cannot be stepped exactly, or ``None``."""
    stage = zero_stage_of(zero_optimizer)
    if stage == 3:
        if zero_optimizer.swap_optimizer:
            return "ZeRO-3 optimizer offload to NVMe (state swapping) is not supported"
        if zero_optimizer.offload_optimizer and zero_optimizer.partial_offload != 1.0:
            return "ZeRO-3 partial optimizer offload (ratio < 1) steps a separate AdamW and is not supported"
    if getattr(zero_optimizer, "zenflow", False):
        return "ZenFlow is not supported"
    if getattr(zero_optimizer, "use_muon", False):
        return "Muon parameter groups are not supported"
    return None


def partitions_of(zero_optimizer: Any) -> list[Partition]:
    """This rank's flat partitions of a ZeRO 1-3 optimizer, after checking that it can be stepped exactly.

    Raises ``RuntimeError`` when DeepSpeed lacks an attribute the recipes read and
    ``NotImplementedError`` for configurations LionSF cannot step exactly.
    """
    check_attributes(zero_optimizer)
    reason = unsupported_reason(zero_optimizer)
    if reason is not None:
        raise NotImplementedError(f"lion_sf_dist.deepspeed.attach: {reason}")
    stage = zero_stage_of(zero_optimizer)
    return stage3_partitions(zero_optimizer) if stage == 3 else stage12_partitions(zero_optimizer)


def refresh_bit16(zero_optimizer: Any) -> None:
    """Recompute the bit16 weights DeepSpeed computes with from its fp32 partitions; collective.

    Stage 1/2: ``update_lp_params``. Stage 3: re-partition each sub-group's bit16 copy from its
    fp32 partition, re-gather the persistent (never partitioned) parameters, and drop the
    secondary (hpZ) copies so they are rebuilt.
    """
    zo = zero_optimizer
    stage = zero_stage_of(zo)
    if stage == 1:
        zo.update_lp_params()
    elif stage == 3:
        for i in range(len(zo.fp32_partitioned_groups_flat)):
            zo._reassign_or_swap_out_partitioned_parameters(i)
        if zo.persistent_parameters:
            zo.persistent_parameters[0].all_gather(zo.persistent_parameters)
        zo.invalidate_secondary_tensor()


def stage12_partitions(zo: Any) -> list[Partition]:
    """This rank's partitions of a stage 1/2 ``DeepSpeedZeroOptimizer``, one per param group."""
    parts = []
    for i, flat in enumerate(zo.single_partition_of_fp32_groups):
        group = zo.real_dp_process_group[i]
        rank = dist.get_rank(group=group)
        size = int(zo.partition_size[i])
        if flat.numel() != size:
            raise RuntimeError(f"lion_sf_dist: ZeRO group {i}: partition has {flat.numel()} elements, expected {size}")
        lo, hi = rank * size, (rank + 1) * size
        slices = []
        for p, start, meta in zip(
            zo.round_robin_bit16_groups[i], zo.round_robin_bit16_offsets[i], zo.round_robin_bit16_meta[i], strict=True
        ):
            a, b = max(int(start), lo), min(int(start) + meta.numel(), hi)
            shape = tuple(meta.shape)
            slices.append(Slice(p, shape, a - int(start), a - lo, b - a) if b > a else Slice(p, shape, 0, 0, 0))
        target = zo.parallel_partitioned_bit16_groups[i][rank]
        parts.append(Partition(flat, group, slices, _copier(target, flat)))
    return parts


def stage3_partitions(zo: Any) -> list[Partition]:
    """This rank's partitions of a ``DeepSpeedZeroOptimizer_Stage3``, one per sub-group."""
    parts = []
    for i, flat in enumerate(zo.fp32_partitioned_groups_flat):
        group = zo.sub_group_process_groups[i]
        rank = dist.get_rank(group=group)
        slices = []
        for p in zo.fp16_groups[i]:
            _, off, pn = zo.grad_position[zo.get_param_id(p)]
            n = max(0, min(pn, p.ds_numel - rank * pn))
            slices.append(Slice(p, tuple(p.ds_shape), rank * pn if n else 0, off, n))
        target = zo.fp16_partitioned_groups_flat[i]
        writeback = _copier(target, flat) if target is not None else (lambda: None)
        parts.append(Partition(flat, group, slices, writeback))
    return parts


def _copier(target: Tensor, source: Tensor) -> Callable[[], None]:
    def copy() -> None:
        target.data.copy_(source.data)

    return copy
