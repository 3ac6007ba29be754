"""``LionSFTrainer`` (HF Trainer) at W = 2 on CPU (gloo): DDP and DeepSpeed ZeRO 1-3 equal single-process LionSF.

Every case runs in one spawned 2-rank group (``tests/transformers_worker.py``): the
comparisons are bitwise, because the data is read in order (the global batch of each step
is known) and the reference averages the two ranks' gradients as the engines do, with
the same single thread. Resuming from the Trainer's own checkpoint at step 2 and training
to step 4 must give the uninterrupted run's parameters and ``exp_avg``, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from tests.integration_model import DECAY, LR, UNITS, Tiny
from tests.integration_runs import OneRun, max_deviation
from tests.transformers_worker import Case, ds_config, run_cases

WORLD = 2
CASES = [
    Case("ddp", resume=True),
    Case("ddp_default_clipping", disable_clipping=False),
    Case("lr_clash", lion_sf={"lr": 2 * LR}, expect_error=True),
    Case("decay_clash", trainer_weight_decay=DECAY / 2, expect_error=True),
    Case("adamw_in_ds_config", deepspeed={**ds_config(2), "optimizer": {"type": "AdamW", "params": {}}},
         expect_error=True),
    Case("zero1", deepspeed=ds_config(1)),
    Case("zero2", deepspeed=ds_config(2), resume=True),
    Case("zero3_config_entry", deepspeed=ds_config(3, optimizer_entry=True), lion_sf={}, resume=True),
    # Last: it leaves accelerate's process-wide state thinking it runs alone.
    Case("cpu_without_use_cpu", deepspeed=ds_config(2), use_cpu=False, expect_error=True),
]
EXACT = [c for c in CASES if not c.expect_error]
RUN = OneRun(run_cases, WORLD, CASES, timeout=480)


@pytest.mark.parametrize("case", EXACT, ids=[c.name for c in EXACT])
def test_matches_single_process_bitwise(case: Case) -> None:
    out = RUN.result()
    r = out[case.name]
    stage = None if case.deepspeed is None else case.deepspeed["zero_optimization"]["stage"]
    engine = "DistributedDataParallel" if stage is None else f"deepspeed ZeRO-{stage}"
    assert r["engine"].startswith(f"{engine} W={WORLD}"), r["engine"]
    ref = out["reference"][None if case.disable_clipping else 1.0]
    for key in ("params", "exp_avg"):
        assert max_deviation(r["final"][key], ref[key]) == 0.0, key
    assert r["unit_names"] == UNITS, "agreement='module' needs the parameter names"
    assert r["group_decay"] == [DECAY, 0.0], "LionSF's weight decay on the decay group, none on biases / norm"


def test_default_clipping_is_reported_and_changes_the_run() -> None:
    out = RUN.result()
    r = out["ddp_default_clipping"]
    assert r["max_grad_norm"] == 1.0 and any("max_grad_norm" in w for w in r["warnings"]), r["warnings"]
    assert max_deviation(r["final"]["exp_avg"], out["reference"][None]["exp_avg"]) > 1e-3
    assert not any("max_grad_norm" in w for w in out["ddp"]["warnings"])
    assert out["ddp"]["max_grad_norm"] == 0.0


@pytest.mark.parametrize("case", [c for c in CASES if c.resume], ids=[c.name for c in CASES if c.resume])
def test_resume_from_trainer_checkpoint_is_exact(case: Case) -> None:
    r = RUN.result()[case.name]
    for key in ("params", "exp_avg"):
        assert max_deviation(r["resumed"][key], r["final"][key]) == 0.0, key
    assert any(torch.count_nonzero(m) for m in r["final"]["exp_avg"].values())


def test_lr_clash_is_refused() -> None:
    error = RUN.result()["lr_clash"]["error"]
    assert error is not None and "args.learning_rate" in error, error


def test_trainer_weight_decay_never_overrides_lion_sf_silently() -> None:
    error = RUN.result()["decay_clash"]["error"]
    assert error is not None and "args.weight_decay" in error and f"weight_decay={DECAY}" in error, error


def test_accelerate_seeing_one_process_is_refused() -> None:
    """Without ``use_cpu=True`` on CPU, accelerate would hand every rank the same batches."""
    error = RUN.result()["cpu_without_use_cpu"]["error"]
    assert error is not None and "use_cpu=True" in error, error


def test_other_optimizer_in_deepspeed_config_is_refused() -> None:
    error = RUN.result()["adamw_in_ds_config"]["error"]
    assert error is not None and "'AdamW'" in error, error


@pytest.mark.parametrize("given", [{"optimizers": (torch.optim.SGD([torch.zeros(1)], lr=0.1), None)},
                                   {"optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 0.1})}],
                         ids=["optimizers", "optimizer_cls_and_kwargs"])
def test_another_optimizer_is_refused(given: dict) -> None:
    """Refused before the Trainer is built (so this runs in pytest's own process, creating no accelerate state)."""
    from lion_sf_dist.integrations.transformers import LionSFTrainer

    with pytest.raises(ValueError, match="lion_sf="):
        LionSFTrainer(model=Tiny(), **given)
