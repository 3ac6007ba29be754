"""Summing per-unit counts across ranks: one int64 all_reduce per process group per step."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def reduce_counts(slotted: Tensor, groups: Sequence[Optional[dist.ProcessGroup]]) -> Tensor:
    """Sum ``slotted[k]`` (each ``[U, 3]`` int64) over ``groups[k]``, then over ``k``.

    Slot ``k`` holds the counts of the segments whose elements are spread over the ranks
    of ``groups[k]`` (``None``: held whole by this rank). All collectives are issued
    before any is waited on, and nothing here reads a tensor value on the host. Counts on
    a device the group's backend cannot reduce on (CPU-offloaded optimizer state under an
    NCCL group) travel to the current CUDA device and back (:func:`reduction_device`).
    """
    works, back = [], []
    for k, group in enumerate(groups):
        if group is None or dist.get_world_size(group) <= 1:
            continue
        device = reduction_device(group, slotted.device)
        buf = slotted[k] if device == slotted.device else slotted[k].to(device, non_blocking=True)
        works.append(dist.all_reduce(buf, group=group, async_op=True))
        if buf is not slotted[k]:
            back.append((k, buf))
    for work in works:
        work.wait()
    for k, buf in back:
        slotted[k].copy_(buf)
    return slotted.sum(0)


def backend_device_types(group: dist.ProcessGroup) -> set[str]:
    """The device types ``group``'s backend reduces on, from its config (``"cpu:gloo,cuda:nccl"``, ``"nccl"``)."""
    config = str(dist.get_backend_config(group))
    types = set()
    for part in config.split(","):
        if ":" in part:
            types.add(part.split(":", 1)[0].strip())
        else:  # a bare backend name: what it is registered for
            name = part.strip()
            types.update({"cuda"} if name == "nccl" else {"cpu", "cuda"} if name == "gloo" else {name})
    return types


def reduction_device(group: dist.ProcessGroup, device: torch.device) -> torch.device:
    """Where counts held on ``device`` are all-reduced over ``group``: ``device`` itself when the group's
    backend supports it, else the current CUDA device; an error naming the cause when neither works."""
    types = backend_device_types(group)
    if device.type in types:
        return device
    if "cuda" in types and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    raise RuntimeError(
        f"LionSF: the agreement counts live on {device.type} (where the optimizer steps, e.g. under CPU offload), "
        f"but the process group's backend ({dist.get_backend_config(group)}) has no {device.type} device"
        + (" and this process sees no CUDA device to reduce on" if "cuda" in types else "")
        + f"; use a process group with a backend for {device.type} (e.g. 'cpu:gloo,cuda:nccl')"
    )
