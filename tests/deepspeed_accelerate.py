"""HF Accelerate's DeepSpeed plugin (ZeRO-2) with LionSF, inside a gloo rank (see ``tests/deepspeed_worker.py``).

Accelerate builds the engine with plain ``deepspeed.initialize`` from the LionSF instance
it is given, so the user attaches it: ``lion_sf_dist.deepspeed.attach(model)`` on the
engine ``prepare`` returns. The engine steps inside ``accelerator.backward()``.
"""

from __future__ import annotations

from typing import Any

from tests.deepspeed_cases import HYPER, STEPS, Case, batch, loss_of, make_model, param_groups

_MADE: dict[str, Any] = {}


def accelerate_case(case: Case, world: int) -> dict[str, Any]:
    """``STEPS`` steps through Accelerate; ``attach`` unless ``case.route == "accelerate_plain"``."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from lion_sf_dist import LionSF
    from lion_sf_dist import deepspeed as lds

    cfg = case.config(world)
    cfg.setdefault("gradient_clipping", 0.0)
    if cfg != _MADE.get("config", cfg):
        raise ValueError("one Accelerator per process: the accelerate cases must share their config")
    if "accelerator" not in _MADE:  # Accelerate allows one DeepSpeed plugin per process
        _MADE["config"] = cfg
        _MADE["accelerator"] = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
    accelerator = _MADE["accelerator"]
    model = make_model()
    opt = LionSF(param_groups(model, case.two_groups), lr=HYPER[0]["lr"], agreement=case.agreement)
    engine, wrapped = accelerator.prepare(model, opt)
    if case.route == "accelerate":
        lds.attach(engine)
    error = None
    for step in range(STEPS):
        x, y = batch(step)
        try:
            accelerator.backward(loss_of(engine, x, y))
        except RuntimeError as e:
            if case.route == "accelerate":
                raise
            error = str(e)
            break
        wrapped.step()
        wrapped.zero_grad()
    return {"engine": engine, "opt": opt, "error": error, "distributed_type": str(accelerator.distributed_type)}
