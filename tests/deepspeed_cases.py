"""Shared pieces of the DeepSpeed tests: the tiny model, the batch, the cases and the reference run.

Sizes are chosen so nothing divides evenly: 62 elements in 6 tensors (35, 5, 15, 3, 3, 1),
and the last bias has 1 element, fewer than the world size at W = 2, 3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from lion_sf_dist import LionSF

STEPS = 3
LR = 1e-2
HYPER = [dict(lr=LR, betas=(0.9, 0.99), weight_decay=0.1), dict(lr=2 * LR, betas=(0.8, 0.95), weight_decay=0.0)]
# Tolerance for engine-reduced gradients (see tests/test_deepspeed.py for the justification).
RTOL, ATOL = 1e-5, 1e-6
LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def launch_config(stage: int) -> Path:
    """The shipped ``launch/ds_zero{stage}.json``."""
    return LAUNCH / f"ds_zero{stage}.json"


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: the same on every rank, different across steps (so agreement varies)."""
    g = torch.Generator().manual_seed(1 + step)
    return torch.randn(4, 7, generator=g), torch.randn(4, 1, generator=g)


def loss_of(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # A sum, not a mean, so the gradient norm exceeds 1 and default clipping would matter.
    return ((model(x) - y) ** 2).sum() * 4.0


def poison(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with one element set to +inf (in place, returned)."""
    grad.view(-1)[3] = float("inf")
    return grad


def param_groups(model: torch.nn.Module, two: bool) -> list[dict[str, Any]]:
    named = list(model.named_parameters())
    if not two:
        return [dict(params=named, **HYPER[0])]
    return [dict(params=[(n, p) for n, p in named if n.endswith("weight")], **HYPER[0]),
            dict(params=[(n, p) for n, p in named if n.endswith("bias")], **HYPER[1])]


@dataclass
class Case:
    """One engine: ZeRO ``stage``, how LionSF reaches it (``route``), and its layout options."""

    name: str
    stage: int
    # "instance", "config", "callable" (lion_sf_dist.deepspeed.initialize), "accelerate" (Accelerate + attach),
    # "plain" / "accelerate_plain" (deepspeed.initialize / Accelerate without attach: must raise),
    # "prestepped" (LionSF steps once alone, then goes to lion_sf_dist.deepspeed.initialize with its state),
    # "unsupported" (attach must refuse), "resume" (DeepSpeed checkpoint round trip)
    route: str = "instance"
    agreement: str = "module"
    two_groups: bool = True
    round_robin: bool = False
    offload: bool = False
    clip: Optional[float] = None  # None: absent from the config
    sub_group_size: Optional[int] = None
    local_counts: bool = False  # control: each rank counts only its own partition
    gas: int = 1  # gradient_accumulation_steps
    bf16: bool = False
    replay: bool = False  # log the full tensors LionSF saw at each step, for a bitwise replay
    ema: bool = False  # agreement_ema
    poison: Optional[int] = None  # the step at which one gradient element of "0.weight" is +inf
    sr: bool = False  # bf16 exp_avg, stored with stochastic rounding

    def options(self) -> dict[str, Any]:
        """LionSF's keyword arguments beyond lr for this case (but the route's groups)."""
        rounding = dict(state_dtype=torch.bfloat16, stochastic_rounding=True) if self.sr else {}
        return dict(agreement=self.agreement, agreement_ema=self.ema, **rounding)

    @property
    def first_step(self) -> int:
        """The first step the engine takes ("prestepped": LionSF took step 0 alone, before the engine)."""
        return 1 if self.route == "prestepped" else 0

    @property
    def lionsf_steps(self) -> int:
        """Engine steps LionSF takes: ZeRO 1-3 skip a step with a non-finite gradient norm themselves."""
        return STEPS - self.first_step - (self.poison is not None and self.stage > 0)

    def config(self, world: int) -> dict[str, Any]:
        zero: dict[str, Any] = {"stage": self.stage}
        if self.stage in (1, 2):
            zero["round_robin_gradients"] = self.round_robin
        if self.offload:
            zero["offload_optimizer"] = {"device": "cpu"}
        if self.sub_group_size is not None:
            zero["sub_group_size"] = self.sub_group_size
        cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": self.gas,
                               "train_batch_size": 4 * world * self.gas, "zero_optimization": zero,
                               "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
                               "steps_per_print": 10 ** 9}
        if self.clip is not None:
            cfg["gradient_clipping"] = self.clip
        if self.bf16:
            cfg["bf16"] = {"enabled": True}
        if self.route == "config":
            cfg["optimizer"] = {"type": "LionSF", "params": {**HYPER[0], "betas": list(HYPER[0]["betas"]),
                                                             "agreement": self.agreement, "agreement_ema": self.ema}}
        return cfg


CASES = [
    Case("z0_config", 0, route="config", two_groups=False),
    Case("z1_instance", 1),
    Case("z1_rr_offload", 1, agreement="tensor", round_robin=True, offload=True),
    Case("z2_instance_rr", 2, round_robin=True),
    Case("z2_config_global", 2, route="config", agreement="global", two_groups=False),
    Case("z2_callable_offload", 2, route="callable", agreement="group", offload=True),
    Case("z2_clip", 2, clip=0.5),
    Case("z3_instance_subgroups", 3, sub_group_size=8),
    Case("z3_config_group", 3, route="config", agreement="group", two_groups=False),
    Case("z3_offload_tensor", 3, agreement="tensor", offload=True),
    Case("z1_accumulate", 1, gas=2),
    Case("z3_accumulate_offload", 3, gas=2, offload=True, agreement="global"),
    Case("z1_ema_tensor", 1, agreement="tensor", ema=True),
    Case("z3_ema_config_global", 3, route="config", agreement="global", two_groups=False, ema=True),
    Case("z2_prestepped", 2, route="prestepped", ema=True, agreement="tensor"),
    Case("z3_prestepped", 3, route="prestepped", sub_group_size=8),
    Case("z0_nonfinite", 0, poison=1),
    Case("z2_nonfinite", 2, poison=1),
    Case("z3_nonfinite", 3, poison=1),
]
# bf16 engines: their gradients differ from an fp32 run, so these are checked by replaying, on
# one process, the exact full tensors LionSF was handed (bitwise).
REPLAYS = [Case("z1_bf16", 1, bf16=True, replay=True), Case("z2_bf16_rr_offload", 2, bf16=True, replay=True,
                                                             round_robin=True, offload=True),
           Case("z3_bf16_subgroups", 3, bf16=True, replay=True, sub_group_size=8),
           Case("z3_fp32_subgroups_replay", 3, replay=True, sub_group_size=8),
           # bf16 exp_avg rounded stochastically: the bits must follow the logical element, not the partition
           Case("z1_sr_bf16_state", 1, replay=True, sr=True, agreement="tensor"),
           Case("z2_sr_bf16_state_rr", 2, replay=True, sr=True, round_robin=True),
           Case("z3_sr_bf16_state_subgroups", 3, replay=True, sr=True, sub_group_size=8)]
CONTROLS = [Case("z2_local_counts", 2, local_counts=True), Case("z3_local_counts", 3, local_counts=True,
                                                                 sub_group_size=8)]
ACCELERATE = [Case("z2_accelerate", 2, route="accelerate"), Case("z2_accelerate_plain", 2, route="accelerate_plain")]
PLAIN = [Case("z1_plain", 1, route="plain"), Case("z3_plain", 3, route="plain")]
LAUNCH_CASES = [Case(f"launch_zero{s}", s, route="json", agreement="tensor", two_groups=False) for s in (1, 2, 3)]
RESUMES = [Case(f"z{s}_resume", s, route="resume") for s in (1, 2, 3)] + [
    Case("z3_ema_resume", 3, route="resume", ema=True, sub_group_size=8, two_groups=False),
    # the engine loads its checkpoint before attach (as HF Trainer does), then attach runs twice
    Case("z2_resume_attach_late", 2, route="resume_late", ema=True, agreement="tensor")]
# bf16 without ZeRO: DeepSpeed wraps the optimizer in its own flat-partition optimizer.
UNSUPPORTED = [Case("z0_bf16", 0, route="unsupported", bf16=True)]


def cases_for(world: int) -> list[Case]:
    """Everything one spawned run at ``world`` ranks does (Accelerate allows one engine per process)."""
    accelerate = [ACCELERATE[1]] if world == 1 else [ACCELERATE[0]]
    controls = CONTROLS if world > 1 else []
    launch = LAUNCH_CASES if world == 2 else []
    replays = REPLAYS if world > 1 else []
    resumes = RESUMES if world == 3 else []
    return CASES + controls + PLAIN + UNSUPPORTED + accelerate + launch + replays + resumes


def reference(case: Case) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    """Single-process LionSF on the same model and batch: full params, exp_avg and gradient norms by name."""
    model = make_model()
    if case.route == "json":
        hyper = json.loads(launch_config(case.stage).read_text())["optimizer"]["params"]
        opt = LionSF(model.named_parameters(), **{**hyper, "betas": tuple(hyper["betas"])})
    else:
        opt = LionSF(param_groups(model, case.two_groups and case.route != "config"), lr=HYPER[0]["lr"],
                     agreement=case.agreement, agreement_ema=case.ema)
    norms = []
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), case.clip or float("inf"))))
        if step == case.poison:
            if case.stage > 0:
                continue  # DeepSpeed ZeRO skips the step (non-finite norm) before LionSF sees it
            poison(model[0].weight.grad)  # ZeRO-0: LionSF skips the unit holding it
        opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    exp_avg = {names[id(p)]: s["exp_avg"].clone() for p, s in opt.state.items()}
    return params, exp_avg, norms
