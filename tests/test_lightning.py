"""Lightning at W = 2 on CPU (gloo): FSDP2, TP x FSDP and DeepSpeed ZeRO-2/3 equal single-process LionSF.

Every case runs in one spawned 2-rank group (``tests/lightning_worker.py``); the comparisons
are bitwise (data read in order with a non-shuffling sampler, gradients averaged as the
engines do, see ``tests/integration_model.py``), except ``exp_avg`` under tensor
parallelism (``ModelParallelStrategy`` with 2 tensor-parallel ranks and a data-parallel
mesh of 1, against a single process on the same batch): the row-parallel layer sums two
partial matmuls, which rounds differently from one, so ``exp_avg`` is compared within
``RTOL = 1e-5``, ``ATOL = 1e-6`` (observed 3e-8); parameters move by signs and stay exact. Lightning refuses CPU for
``DeepSpeedStrategy``; the DeepSpeed cases use ``CPUDeepSpeedStrategy``, a test-only subclass
that bypasses its GPU checks and changes nothing else. Resuming from Lightning's own
checkpoint at step 2 (``fit(ckpt_path=...)``) must give the uninterrupted run's state, bit
for bit.
"""

from __future__ import annotations

import pytest
import torch

from lion_sf_dist.integrations.lightning import CLIPPING_WARNING
from tests.deepspeed_cases import ATOL, RTOL
from tests.integration_runs import OneRun, max_deviation
from tests.lightning_worker import Case, run_cases

WORLD = 2
FIXES = ("lion_sf_dist.deepspeed.initialize", "lion_sf_dist.deepspeed.attach(engine)")
CASES = [
    Case("fsdp2", "fsdp2"),
    Case("tp_fsdp", "tp_fsdp"),
    Case("deepspeed2", "deepspeed2"),
    Case("deepspeed3", "deepspeed3"),
    Case("deepspeed2_without_callback", "deepspeed2", callback=False, resume=False),
    Case("deepspeed2_clipped", "deepspeed2", resume=False, clip=1.0),
]
TRAINED = [c for c in CASES if c.callback and c.clip is None]
RUN = OneRun(run_cases, WORLD, CASES, timeout=480)


@pytest.mark.parametrize("case", TRAINED, ids=[c.name for c in TRAINED])
def test_matches_single_process(case: Case) -> None:
    """Bitwise, except ``exp_avg`` under tensor parallelism (within ``RTOL`` / ``ATOL``, see the module docstring)."""
    out = RUN.result()
    r = out[case.name]
    assert r["error"] is None
    sharded = case.strategy in ("fsdp2", "tp_fsdp")
    assert r["param_types"] == (["DTensor"] if sharded else ["Parameter"]), r["param_types"]
    ref = out["reference"][1 if case.strategy == "tp_fsdp" else WORLD]
    assert max_deviation(r["final"]["params"], ref["params"]) == 0.0
    if case.strategy == "tp_fsdp":
        for name, expected in ref["exp_avg"].items():
            torch.testing.assert_close(r["final"]["exp_avg"][name], expected, rtol=RTOL, atol=ATOL)
    else:
        assert max_deviation(r["final"]["exp_avg"], ref["exp_avg"]) == 0.0
    assert not any(CLIPPING_WARNING in w for w in r["warnings"]), "Lightning's DeepSpeed config clips only if asked"


def test_clipping_is_reported_and_changes_the_run() -> None:
    out = RUN.result()
    r = out["deepspeed2_clipped"]
    assert any(CLIPPING_WARNING in w and "gradient_clip_val" in w for w in r["warnings"]), r["warnings"]
    assert max_deviation(r["final"]["exp_avg"], out["reference"][WORLD]["exp_avg"]) > 1e-3


@pytest.mark.parametrize("case", [c for c in CASES if c.resume], ids=[c.name for c in CASES if c.resume])
def test_resume_from_lightning_checkpoint_is_exact(case: Case) -> None:
    r = RUN.result()[case.name]
    assert r["resumed_steps"] == (4, 2), "the resumed fit must train the last two steps only"
    for key in ("params", "exp_avg"):
        assert max_deviation(r["resumed"][key], r["final"][key]) == 0.0, key


def test_deepspeed_without_the_callback_raises_naming_the_fixes() -> None:
    error = RUN.result()["deepspeed2_without_callback"]["error"]
    assert error is not None and all(fix in error for fix in FIXES), error
