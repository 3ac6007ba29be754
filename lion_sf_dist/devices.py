"""Moving small host-built tables (per-segment hyper-parameters, index lists) to the step's device."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """``host`` on ``device`` without blocking the host: through pinned memory for an accelerator.

    (``meta`` has no memory to copy and pinning would need an accelerator: plain copy there.)
    """
    if device.type == "cpu":
        return host
    if device.type == "meta":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
