"""HF ``Trainer`` training LionSF, exactly under DDP and DeepSpeed ZeRO 1-3.

One call::

    trainer = LionSFTrainer(model=model, args=args, train_dataset=data,
                            lion_sf={"weight_decay": 0.1, "agreement": "module"})
    trainer.train()

What it does that ``Trainer(optimizers=...)`` / ``optimizer_cls_and_kwargs`` do not:

- builds LionSF from ``(name, parameter)`` pairs, so ``agreement="module"`` works, with the
  Trainer's decay / no-decay split (``get_decay_parameter_names``): the decay group gets
  LionSF's ``weight_decay``, the other 0. The Trainer's ``args.weight_decay`` never
  overwrites LionSF's silently: give it in one place, or the same value in both, else
  ``ValueError``. The same holds for ``lr`` against ``args.learning_rate``.
- under DeepSpeed builds LionSF instead of the AdamW that ``deepspeed_init`` would build
  (Trainer discards ``optimizers=`` there), and attaches it to the engine
  (:func:`lion_sf_dist.deepspeed.attach`) as soon as accelerate has built the engine:
  before the first step, and before the Trainer loads a DeepSpeed checkpoint on resume.
  A config whose optimizer entry is ``{"type": "LionSF", "params": {...}}`` is read into
  LionSF's arguments and removed before DeepSpeed sees it (give its params explicitly:
  the Trainer fills ``"auto"`` there with Adam's values, ``adam_beta1/2`` for ``betas``).
- reports gradient clipping: the Trainer clips to ``max_grad_norm=1.0`` by default (and
  DeepSpeed to 1.0 when its config has no ``gradient_clipping``), which changes Lion's
  update signs. A ``UserWarning`` naming ``max_grad_norm`` says so, or
  ``disable_clipping=True`` sets ``max_grad_norm`` and DeepSpeed's ``gradient_clipping``
  to 0. A DeepSpeed config without ``gradient_clipping`` follows ``max_grad_norm``, as
  ``"auto"`` does.

Resuming from the Trainer's checkpoints (``train(resume_from_checkpoint=...)``) is exact:
under DDP the Trainer saves and loads ``optimizer.pt`` (LionSF's ``state_dict``), under
DeepSpeed the engine's checkpoint holds LionSF's per-partition ``exp_avg``.

For another ``Trainer`` subclass (TRL's, your own), put :class:`LionSFTrainerMixin` first:
``class MyTrainer(LionSFTrainerMixin, SFTTrainer): ...``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
import torch.distributed as dist
from transformers import Trainer

from lion_sf_dist.optimizer import LionSF

__all__ = ["LionSFTrainer", "LionSFTrainerMixin", "CLIPPING_WARNING"]

# The start of the warning issued when gradients will be clipped (tests and filters match it).
CLIPPING_WARNING = "LionSFTrainer: gradients will be clipped"

# The mixin is typed as a Trainer (what it is always mixed into) and is a plain object at run time.
if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class LionSFTrainerMixin(_TrainerBase):
    """Makes a ``transformers.Trainer`` (sub)class train LionSF; see the module docstring.

    Extra keyword arguments of ``__init__``:
        lion_sf: LionSF's keyword arguments (``betas``, ``weight_decay``, ``agreement``,
            ``pow``, ...). ``lr`` defaults to ``args.learning_rate`` and must equal it when given.
        disable_clipping: set ``args.max_grad_norm`` (and DeepSpeed's ``gradient_clipping``)
            to 0 instead of warning that gradients will be clipped.

    ``optimizers=`` and ``optimizer_cls_and_kwargs=`` are refused: the optimizer is LionSF.
    """

    def __init__(
        self, *args: Any, lion_sf: Optional[Mapping[str, Any]] = None, disable_clipping: bool = False, **kwargs: Any
    ) -> None:
        given = kwargs.get("optimizers", (None, None))
        if any(x is not None for x in given) or kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(
                "LionSFTrainer builds LionSF itself: pass its arguments as lion_sf={...}, "
                "not optimizers= or optimizer_cls_and_kwargs="
            )
        super().__init__(*args, **kwargs)
        self._lion_sf_engine: Any = None
        if dist.is_initialized() and self.accelerator.num_processes != dist.get_world_size():
            raise RuntimeError(
                f"LionSFTrainer: accelerate sees {self.accelerator.num_processes} process(es) of the "
                f"{dist.get_world_size()} in the process group, so every rank would train on the same batches "
                "(on CPU accelerate shards data only with TrainingArguments(use_cpu=True), DeepSpeed included)"
            )
        ds_config = self._lion_sf_ds_config()
        hyper = dict(lion_sf or {})
        if ds_config is not None:
            hyper = _merge_ds_optimizer_entry(ds_config, hyper)
        self._lion_sf_hyper = _resolve_hyper(hyper, self.args.learning_rate, self.args.weight_decay)
        if disable_clipping:
            self.args.max_grad_norm = 0.0
        if ds_config is not None:
            ds_config.config.setdefault("gradient_clipping", self.args.max_grad_norm)
            if disable_clipping:
                ds_config.config["gradient_clipping"] = 0.0
        clip = self.args.max_grad_norm if ds_config is None else ds_config.config["gradient_clipping"]
        if clip > 0:
            where = "max_grad_norm" if ds_config is None else "max_grad_norm / DeepSpeed's gradient_clipping"
            warnings.warn(
                f"{CLIPPING_WARNING} to norm {clip} ({where}), which changes Lion's update signs; "
                "LionSF's author trains without clipping: set max_grad_norm=0 or pass "
                "disable_clipping=True to LionSFTrainer",
                UserWarning,
                stacklevel=2,
            )

    def _lion_sf_ds_config(self) -> Any:
        """The DeepSpeed config object ``deepspeed_init`` reads (accelerate's plugin), or None without DeepSpeed."""
        if not self.is_deepspeed_enabled:
            return None
        return self.accelerator.state.deepspeed_plugin.hf_ds_config

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        """LionSF over named parameters in the decay / no-decay groups of ``get_decay_parameter_names``."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            if opt_model is None:
                raise ValueError("LionSFTrainer: no model to build LionSF for")
            decay = set(self.get_decay_parameter_names(opt_model))
            hyper = dict(self._lion_sf_hyper)
            weight_decay = hyper.pop("weight_decay")
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [(n, p) for n, p in named if n in decay], "weight_decay": weight_decay},
                {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            self.optimizer = LionSF([g for g in groups if g["params"]], **hyper)
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """The Trainer's scheduler; first attaches LionSF to a DeepSpeed engine accelerate has just built.

        The Trainer calls this right after ``accelerator.prepare`` built the engine and before it
        loads a DeepSpeed checkpoint on resume: the first overridable method at that point.
        """
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if self.is_deepspeed_enabled and wrapped is not None and wrapped.engine is not self._lion_sf_engine:
            from lion_sf_dist.deepspeed import attach

            attach(wrapped.engine)
            self._lion_sf_engine = wrapped.engine
        return super().create_scheduler(num_training_steps, optimizer)


class LionSFTrainer(LionSFTrainerMixin, Trainer):
    """``transformers.Trainer`` training LionSF; ``lion_sf={...}`` holds its arguments (see the module docstring)."""


def _merge_ds_optimizer_entry(ds_config: Any, hyper: dict[str, Any]) -> dict[str, Any]:
    """LionSF arguments with those of a ``{"type": "LionSF"}`` DeepSpeed entry, which is removed from the config.

    Any other optimizer type is refused: DeepSpeed would build it and LionSF would never step.
    """
    from lion_sf_dist.deepspeed import OPTIMIZER_TYPE  # here: deepspeed is installed whenever a config is

    entry = ds_config.config.get("optimizer")
    if entry is None:
        return hyper
    if str(entry.get("type", "")).lower() != OPTIMIZER_TYPE.lower():
        raise ValueError(
            f"LionSFTrainer: the DeepSpeed config names optimizer {entry.get('type')!r}; "
            'remove it or use {"type": "LionSF"}'
        )
    from_config = dict(entry.get("params", {}))
    if "betas" in from_config:
        from_config["betas"] = tuple(from_config["betas"])
    clash = sorted(k for k in from_config.keys() & hyper.keys() if from_config[k] != hyper[k])
    if clash:
        raise ValueError(f"LionSFTrainer: lion_sf and the DeepSpeed config's LionSF params disagree on {clash}")
    ds_config.del_config_sub_tree("optimizer")
    # TrainingArguments already compared the entry's params with Adam's (adam_beta1/2, weight_decay) and
    # queued mismatches that trainer_config_finalize would raise; LionSF's own values are settled here instead.
    ds_config.mismatches = [m for m in ds_config.mismatches if not m.startswith("- ds optimizer.")]
    return {**from_config, **hyper}


def _resolve_hyper(hyper: dict[str, Any], learning_rate: float, trainer_decay: float) -> dict[str, Any]:
    """LionSF's arguments with ``lr`` and ``weight_decay`` settled against the Trainer's, never silently."""
    lr = hyper.get("lr", learning_rate)
    if lr != learning_rate:
        raise ValueError(
            f"LionSFTrainer: lion_sf lr={lr} but args.learning_rate={learning_rate} (the Trainer's "
            "scheduler starts from its own): set one of them, or both alike"
        )
    decay = hyper.get("weight_decay", trainer_decay)
    if trainer_decay not in (0.0, decay):
        raise ValueError(
            f"LionSFTrainer: lion_sf weight_decay={decay} but args.weight_decay={trainer_decay}: "
            "set one of them, or both alike"
        )
    return {**hyper, "lr": lr, "weight_decay": decay}
