"""LionSF's options: their types, their allowed values and the checks that refuse bad ones.

Every hyper-parameter passes through here, at construction and in ``add_param_group``,
so a bad value raises before anything is added or stepped (docs/CONTRACT.md section 8).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal, Union

from torch import Tensor

Agreement = Literal["tensor", "module", "group", "global"]
Negative = Literal["abs", "clamp"]
AGREEMENTS: tuple[Agreement, ...] = ("tensor", "module", "group", "global")
NEGATIVES: tuple[Negative, ...] = ("abs", "clamp")

# What ``torch.optim.Optimizer`` accepts as ``params``: tensors, ``(name, tensor)`` pairs
# (``model.named_parameters()``) or param-group dicts.
ParamsT = Union[Iterable[Tensor], Iterable[tuple[str, Tensor]], Iterable[dict[str, Any]]]


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_optimizer_values(pow: float) -> None:
    """Raise ``ValueError`` for an invalid per-optimizer value."""
    if not (isinstance(pow, (int, float)) and math.isfinite(pow) and pow >= 0.0):
        raise ValueError(f"pow must be >= 0 and finite, got {pow!r}")


def check_group_values(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` for an invalid per-group value (``lr``, ``betas``, ``weight_decay``)."""
    lr, betas, wd = group["lr"], group["betas"], group["weight_decay"]
    if isinstance(lr, Tensor):
        raise ValueError("lr must be a Python number (a tensor lr is not supported), got a tensor")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0.0):
        raise ValueError(f"lr must be > 0 and finite, got {lr!r}")
    if not (
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and all(isinstance(b, (int, float)) and 0.0 <= b <= 1.0 for b in betas)
    ):
        raise ValueError(f"betas must be two numbers in [0, 1], got {betas!r}")
    if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0.0):
        raise ValueError(f"weight_decay must be >= 0 and finite, got {wd!r}")
