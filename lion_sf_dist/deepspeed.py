"""DeepSpeed: LionSF from a config entry, exact at every ZeRO stage (docs/CONTRACT.md).

``initialize(...)`` takes the arguments of ``deepspeed.initialize`` and returns its tuple.
Its config may name the optimizer::

    "optimizer": {"type": "LionSF", "params": {"lr": 5e-4, "betas": [0.9, 0.99], "weight_decay": 0.01}}

(every LionSF argument may appear in ``params``, ``agreement`` and the section 8 switches
included), or a ``LionSF`` or a callable building one may be passed as ``optimizer=``.
``attach(engine)`` gives the LionSF inside an engine built elsewhere (HF Accelerate,
HF Trainer, plain ``deepspeed.initialize``) the ZeRO partition layout; ``initialize`` is
``deepspeed.initialize`` followed by ``attach``. A LionSF under a ZeRO engine it was not
attached to raises at its first step, naming both fixes.

Gradient clipping: DeepSpeed 0.19.8 clips gradients to norm 1.0 when the config has no
``gradient_clipping``, which changes Lion's update signs. ``initialize`` treats a missing
value as 0 (no clipping, as the LionSF author trains); an explicit value is honoured.
``attach`` leaves the engine's setting as it was built.

Non-finite gradients: under ZeRO 1-3 DeepSpeed itself skips the whole step when the
gradient norm is not finite (LionSF is not called); under ZeRO-0 LionSF skips the units
holding a non-finite gradient, on every rank alike. Nothing is poisoned either way.

Checkpoints: ``engine.save_checkpoint`` / ``load_checkpoint`` keep the per-partition
``exp_avg`` (same world size and stage; a load before ``attach`` is taken over by it);
``lion_sf_dist.checkpoint`` reshards, reading each rank's slices of each logical parameter
from ``LionSF.fragments()``.

``agreement_ema=True`` keeps its per-unit vector in every partition's state (``"agreement_ema"``).

Not supported: NVMe or partial optimizer offload,
bf16/fp16 without ZeRO (DeepSpeed wraps the optimizer in its own flat-partition optimizer),
ZenFlow and Muon groups; ``attach`` raises for each. ``ds_to_universal`` cannot convert
LionSF checkpoints (it expects Adam's ``exp_avg_sq``).
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable, Optional, Union

import deepspeed
from torch.optim import Optimizer

from lion_sf_dist.engines import lionsf_of
from lion_sf_dist.layouts.zero import ZeroLayout
from lion_sf_dist.optimizer import LionSF

__all__ = ["initialize", "attach", "OPTIMIZER_TYPE"]

OPTIMIZER_TYPE = "LionSF"


def initialize(
    args: Any = None,
    model: Any = None,
    optimizer: Optional[Union[Optimizer, Callable[..., Optimizer]]] = None,
    model_parameters: Any = None,
    *,
    config: Optional[Union[str, dict[str, Any]]] = None,
    config_params: Optional[Union[str, dict[str, Any]]] = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with LionSF built from the config (or given) and attached.

    Returns ``(engine, optimizer, training_dataloader, lr_scheduler)`` as DeepSpeed does.
    The LionSF is built from ``model_parameters`` when given, else from
    ``model.named_parameters()`` (so ``agreement="module"`` has names). The caller's
    config is not modified: a copy without the LionSF entry (and with
    ``gradient_clipping`` 0 when absent, see the module docstring) goes to DeepSpeed.
    """
    config = _load_config(args, config if config is not None else config_params)
    if getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)
        args.deepspeed_config = None
    config.setdefault("gradient_clipping", 0.0)
    entry = config.get("optimizer")
    if isinstance(entry, dict) and str(entry.get("type", "")).lower() == OPTIMIZER_TYPE.lower():
        if optimizer is not None:
            raise ValueError(
                "lion_sf_dist.deepspeed.initialize: the config names an optimizer (LionSF) and "
                "optimizer= was passed too; give one of them"
            )
        del config["optimizer"]
        hyper = dict(entry.get("params", {}))
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
        optimizer = LionSF(_params_for(model, model_parameters), **hyper)
    elif optimizer is not None and not isinstance(optimizer, Optimizer) and callable(optimizer):
        optimizer = optimizer(_params_for(model, model_parameters))
    engine, opt, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, config=config, **kwargs
    )
    if isinstance(optimizer, LionSF):
        attach(engine)
    return engine, opt, loader, scheduler


def attach(engine: Any) -> LionSF:
    """Make the LionSF inside ``engine`` step exactly; returns it. Call before the first step.

    Under ZeRO 1-3 the LionSF is given a :class:`~lion_sf_dist.layouts.zero.ZeroLayout`: it
    learns which slice of which parameter (and agreement unit) each flat partition holds,
    gets its ``exp_avg`` per partition at once (taking over a state loaded into the
    partitions before, or carrying over the one it held for the parameters) and from then
    on counts all partitions of an engine step together, with one int64 all-reduce per
    process group. Under ZeRO-0 (fp32) it needs nothing: the engine hands it whole
    parameters with averaged gradients. Calling it again for the same engine changes nothing.

    Raises ``TypeError`` when the engine's optimizer is not LionSF (or not one of the
    supported wrappers), ``NotImplementedError`` for configurations it cannot step exactly
    (NVMe or partial offload, bf16/fp16 without ZeRO).
    """
    opt = lionsf_of(engine)
    outer = engine.optimizer
    if outer is opt:
        return opt
    if isinstance(opt.layout, ZeroLayout) and opt.layout.zero_optimizer is outer:
        return opt
    opt.use_layout(ZeroLayout(outer))
    return opt


def _params_for(model: Any, model_parameters: Any) -> Any:
    if model_parameters is not None:
        return model_parameters
    if model is None:
        raise ValueError("lion_sf_dist.deepspeed.initialize: building LionSF needs model= or model_parameters=")
    return list(model.named_parameters())


def _load_config(args: Any, config: Optional[Union[str, dict[str, Any]]]) -> dict[str, Any]:
    from_args = getattr(args, "deepspeed_config", None)
    if from_args is not None and config is not None:
        raise ValueError("lion_sf_dist.deepspeed.initialize: a config in args.deepspeed_config and config= both given")
    config = from_args if config is None else config
    if config is None:
        raise ValueError("lion_sf_dist.deepspeed.initialize: no DeepSpeed config (config= or args.deepspeed_config)")
    if isinstance(config, dict):
        return copy.deepcopy(config)
    with open(config) as f:
        return json.load(f)
