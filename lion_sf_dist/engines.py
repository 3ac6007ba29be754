"""Finding the LionSF inside a DeepSpeed engine, without importing DeepSpeed.

One lookup for everything that is handed an engine (:mod:`lion_sf_dist.deepspeed`,
:mod:`lion_sf_dist.checkpoint`): ZeRO-0 engines step the LionSF itself, ZeRO 1-3 engines
wrap it in their own optimizer.
"""

from __future__ import annotations

from typing import Any

from lion_sf_dist.layouts.zero_internals import client_optimizer, zero_stage_of
from lion_sf_dist.optimizer import LionSF


def is_deepspeed_engine(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeed engine (checked by class name, so DeepSpeed need not be installed)."""
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def lionsf_of(engine: Any) -> LionSF:
    """The LionSF ``engine`` steps; ``TypeError`` naming what it steps instead."""
    outer = engine.optimizer
    inner = client_optimizer(outer) if zero_stage_of(outer) else outer
    if not isinstance(inner, LionSF):
        raise TypeError(
            f"the DeepSpeed engine steps {type(inner).__name__}, not LionSF (build it with "
            "lion_sf_dist.deepspeed.initialize, or pass a LionSF as optimizer=); bf16/fp16 without "
            "ZeRO wraps the optimizer in a way not supported: use ZeRO stage 1, 2 or 3"
        )
    return inner
