"""torchtitan (0.3.x): LionSF for its model parts, through its own ``OptimizersContainer``.

torchtitan 0.3 builds the optimizer from the trainer config's ``optimizer`` entry
(``config.optimizer.build(model_parts=...)``, after parallelising the model), one optimizer
per model part and optimizer name, from ``ParamGroupConfig`` s matched by regex on parameter
names. :class:`LionSFOptimizersContainer` is that container with ``"LionSF"`` added to the
names it can build; :func:`lion_sf_optimizer` is the config for the common case::

    from lion_sf_dist.integrations.torchtitan import lion_sf_optimizer

    trainer_config = Trainer.Config(..., optimizer=lion_sf_optimizer(lr=3e-4, weight_decay=0.1),
                                    lr_scheduler=LRSchedulersContainer.Config(warmup_steps=0, decay_ratio=0.0))

Each LionSF gets torchtitan's groups with their parameter names (``param_names``, the
canonical FQNs torchtitan also keys its checkpoints by), so ``agreement="module"`` works,
and its state is checkpointed by torchtitan's ``CheckpointManager`` through the container's
flat, FQN-keyed state dict (``exp_avg`` a DTensor like its parameter under FSDP2 / TP).

Not applied to LionSF: the container's ``implementation`` (``fused`` / ``foreach``, Adam's
kernels; LionSF's fused kernel is ``use_triton=True``), refused when it asks for bf16 Adam
states. torchtitan's default LR scheduler warms up for 200 steps and decays linearly;
LionSF's author trains at a constant rate (``warmup_steps=0, decay_ratio=0.0`` above).
With several model parts (pipeline parallelism) there is one LionSF per part, and the
container joins them in one :class:`~lion_sf_dist.Coordinator`, so ``"group"``,
``"global"`` and a module split across parts are counted as one LionSF over all parts
would. Stages on other ranks join when the coordinator knows the pipeline group: pass
``optimizer_factory_kwargs_by_name={"LionSF": {"coordinator": Coordinator(pp_group)}}``
(torchtitan's ``parallel_dims.get_mesh("pp").get_group()``), built after the process group.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.optim import Optimizer
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from lion_sf_dist.coordinator import Coordinator
from lion_sf_dist.optimizer import LionSF

__all__ = ["LionSFOptimizersContainer", "lion_sf_optimizer", "build_lion_sf", "OPTIMIZER_NAME"]

OPTIMIZER_NAME = "LionSF"
_GROUP_KEYS = ("lr", "betas", "weight_decay")  # LionSF's per-group hyper-parameters; the rest are per instance
_IMPLEMENTATION_KEYS = ("fused", "foreach")  # added to every group by the container for Adam's kernels


def build_lion_sf(param_groups: list[dict[str, Any]], **instance_kwargs: Any) -> LionSF:
    """One LionSF from torchtitan's groups (``params``, ``param_names``, implementation flags, optimizer kwargs).

    LionSF's instance-wide arguments (``agreement``, ``pow``, ``use_triton``, ...) may come from
    ``optimizer_factory_kwargs_by_name["LionSF"]`` (``instance_kwargs``) or from the groups'
    ``optimizer_kwargs``; groups giving different values for one of them are refused.
    """
    groups: list[dict[str, Any]] = []
    from_groups: dict[str, Any] = {}
    for group in param_groups:
        kept = {}
        for key, value in group.items():
            if key in _IMPLEMENTATION_KEYS:
                continue
            if key in ("params", "param_names") or key in _GROUP_KEYS:
                kept[key] = value
            elif from_groups.setdefault(key, value) != value:
                raise ValueError(
                    f"LionSF groups of one model part disagree on {key!r} ({from_groups[key]!r} vs "
                    f"{value!r}): it applies to the whole optimizer"
                )
            elif key in instance_kwargs and instance_kwargs[key] != value:
                raise ValueError(
                    f"LionSF {key!r} given as {value!r} in optimizer_kwargs and "
                    f"{instance_kwargs[key]!r} in optimizer_factory_kwargs_by_name"
                )
        groups.append(kept)
    lr = groups[0].get("lr")
    if lr is None:
        raise ValueError("LionSF param groups need an lr (ParamGroupConfig.optimizer_kwargs['lr'])")
    return LionSF(groups, lr=lr, **{**instance_kwargs, **from_groups})


class LionSFOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` that builds ``optimizer_name="LionSF"`` groups as LionSF."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        """``OptimizersContainer.Config``; ``build()`` makes a :class:`LionSFOptimizersContainer`."""

    def __init__(self, config: Config, *, model_parts: list[torch.nn.Module]) -> None:
        if config.implementation == "fused_opt_states_bf16" and any(
            g.optimizer_name == OPTIMIZER_NAME for g in config.param_groups
        ):
            raise ValueError(
                "LionSFOptimizersContainer: implementation='fused_opt_states_bf16' makes Adam's states "
                "bf16; LionSF keeps exp_avg in the parameter's dtype"
            )
        config = copy.copy(config)  # the caller's config is not modified
        kwargs = dict(config.optimizer_factory_kwargs_by_name or {})
        kwargs[OPTIMIZER_NAME] = {"coordinator": Coordinator(), **kwargs.get(OPTIMIZER_NAME, {})}
        config.optimizer_factory_kwargs_by_name = kwargs
        super().__init__(config, model_parts=model_parts)

    # torchtitan's documented extension point ("inherit from this class"): the one private name used here.
    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., Optimizer]:
        if name == OPTIMIZER_NAME:
            return build_lion_sf
        return OptimizersContainer._resolve_optimizer_factory(name)


def lion_sf_optimizer(
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.99),
    *,
    no_decay: str = r"(bias|norm)",
    agreement: str = "module",
    **lion_sf_kwargs: Any,
) -> LionSFOptimizersContainer.Config:
    """Config building LionSF over every trainable parameter, without weight decay where ``no_decay`` matches.

    ``no_decay`` is a regex searched in parameter names (biases and norms by default).
    ``lion_sf_kwargs`` are LionSF's other arguments (``pow``, ``use_triton``, ``negative``, ...).
    """
    group = {"lr": lr, "betas": tuple(betas)}
    return LionSFOptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=no_decay, optimizer_name=OPTIMIZER_NAME, optimizer_kwargs={**group, "weight_decay": 0.0}
            ),
            ParamGroupConfig(
                pattern=r".*", optimizer_name=OPTIMIZER_NAME, optimizer_kwargs={**group, "weight_decay": weight_decay}
            ),
        ],
        optimizer_factory_kwargs_by_name={OPTIMIZER_NAME: {"agreement": agreement, **lion_sf_kwargs}},
    )
