"""HF Trainer cases for ``tests/test_transformers.py``, run inside one spawned gloo group.

The data is read in order (``train_sampling_strategy="sequential"``): accelerate hands
rank ``r`` the per-device batches ``r, r + W, ...``, so global step ``k`` is samples
``[k*B*W, (k+1)*B*W)`` (:func:`hf_samples`); the reference is ``tests/integration_model.py``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist

from lion_sf_dist import LionSF
from tests.integration_model import BETAS, DECAY, LR, PER_DEVICE, STEPS, Tiny, dataset, reference
from tests.integration_runs import State, full_state, shared_dir


def hf_samples(step: int, rank: int, world: int) -> list[int]:
    """Dataset indices of ``rank``'s batch at ``step`` under accelerate's sharding of a sequential sampler."""
    start = (step * world + rank) * PER_DEVICE
    return list(range(start, start + PER_DEVICE))


@dataclass
class Case:
    """One Trainer run: ``deepspeed`` (None for DDP) config, LionSF arguments, clipping option, resume."""

    name: str
    deepspeed: Optional[dict[str, Any]] = None
    lion_sf: dict[str, Any] = field(default_factory=lambda: {"weight_decay": DECAY, "betas": BETAS,
                                                             "agreement": "module"})
    disable_clipping: bool = True
    resume: bool = False  # also: save at STEPS // 2, resume from that checkpoint in a new Trainer, train to STEPS
    expect_error: bool = False  # building the Trainer must raise; the result is the message
    trainer_weight_decay: float = 0.0  # TrainingArguments.weight_decay
    use_cpu: bool = True  # TrainingArguments.use_cpu: without it accelerate sees one process on CPU


def ds_config(stage: int, optimizer_entry: bool = False) -> dict[str, Any]:
    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                           "gradient_clipping": "auto", "zero_optimization": {"stage": stage}}
    if optimizer_entry:
        cfg["optimizer"] = {"type": "LionSF", "params": {"weight_decay": DECAY, "betas": list(BETAS),
                                                         "agreement": "module"}}
    return cfg


def _trainer(case: Case, out: str, max_steps: int, save_steps: Optional[int]) -> Any:
    from transformers import TrainingArguments

    from lion_sf_dist.integrations.transformers import LionSFTrainer

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=PER_DEVICE, max_steps=max_steps, learning_rate=LR,
        lr_scheduler_type="constant", train_sampling_strategy="sequential", use_cpu=case.use_cpu,
        deepspeed=case.deepspeed, weight_decay=case.trainer_weight_decay, report_to="none", logging_strategy="no",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    world = dist.get_world_size()
    return LionSFTrainer(model=Tiny(), args=args, train_dataset=dataset(world), lion_sf=case.lion_sf,
                         disable_clipping=case.disable_clipping)


def _lion_sf(trainer: Any) -> LionSF:
    """The LionSF under accelerate's (and DeepSpeed's) optimizer wrappers."""
    opt = trainer.optimizer
    while not isinstance(opt, LionSF):
        opt = opt.optimizer
    return opt


def _state(trainer: Any) -> State:
    """Full parameters and ``exp_avg`` by name, gathered from every rank's ZeRO partitions when sharded."""
    wrapped = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        return full_state(list(trainer.model.named_parameters()), _lion_sf(trainer))
    return full_state(list(wrapped.engine.module.named_parameters()), None)


def _engine_kind(trainer: Any) -> str:
    """``"DistributedDataParallel W=2"`` or ``"deepspeed ZeRO-2 W=2 clip=0.0"``: what actually trained."""
    wrapped = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None)
    world = dist.get_world_size()
    if wrapped is None:
        return f"{type(trainer.model_wrapped).__name__} W={world}"
    engine = wrapped.engine
    return f"deepspeed ZeRO-{engine.zero_optimization_stage()} W={engine.world_size} clip={engine.gradient_clipping()}"


def run_case(case: Case) -> dict[str, Any]:
    """Train ``STEPS`` steps; with ``resume`` also resume from the half-way checkpoint in a new Trainer."""
    with shared_dir("lion_sf_hf_") as out:
        if case.expect_error:
            try:
                _trainer(case, out, STEPS, None)
            except (ValueError, RuntimeError) as e:
                return {"error": str(e)}
            return {"error": None}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = _trainer(case, out, STEPS, STEPS // 2 if case.resume else None)
        trainer.train()
        opt = _lion_sf(trainer)
        result: dict[str, Any] = {
            "final": _state(trainer), "warnings": [str(w.message) for w in caught], "engine": _engine_kind(trainer),
            "max_grad_norm": trainer.args.max_grad_norm, "unit_names": opt.unit_names,
            "group_decay": [g["weight_decay"] for g in opt.param_groups],
        }
        if case.resume:
            resumed = _trainer(case, out, STEPS, STEPS // 2)
            resumed.train(resume_from_checkpoint=os.path.join(out, f"checkpoint-{STEPS // 2}"))
            result["resumed"] = _state(resumed)
        return result


def run_cases(rank: int, world: int, cases: list[Case]) -> dict[str, Any]:
    """Every case on this rank, in order (DDP before DeepSpeed: accelerate keeps one DeepSpeed state per process)."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    results: dict[str, Any] = {case.name: run_case(case) for case in cases}
    if rank == 0:  # here, not in pytest's process: the same single thread as the ranks (matmul sums differ)
        results["reference"] = {clip: reference(world, hf_samples, clip=clip) for clip in (None, 1.0)}
    return results
