"""torchtitan 0.3 (``LionSFOptimizersContainer``) on CPU: its trainer's optimizer part, W = 2 (gloo) and in process.

What is tested: the container torchtitan's trainer builds from ``config.optimizer``, over an
FSDP2-sharded model part at W = 2, bitwise against single-process LionSF (same global
batches, see ``tests/integration_model.py``), parameter names kept (module units, the
decay / no-decay split), and a ``torch.distributed.checkpoint`` round trip of the
container half way, as torchtitan's ``CheckpointManager`` does it, bitwise against the
uninterrupted run. Not tested: torchtitan's ``Trainer`` itself (its data loading needs the
``datasets`` package and a tokenizer, not installed here), pipeline parallelism, TP.
"""

from __future__ import annotations

import pytest

from lion_sf_dist.integrations.torchtitan import LionSFOptimizersContainer, build_lion_sf, lion_sf_optimizer
from tests.integration_model import DECAY, DECAYED, LR, UNITS, Tiny
from tests.integration_runs import OneRun, max_deviation
from tests.torchtitan_worker import run_cases

RUN = OneRun(run_cases, 2, timeout=300)


def test_fsdp2_part_matches_single_process_bitwise() -> None:
    r = RUN.result()
    assert r["param_types"] == ["DTensor"] and r["n_optimizers"] == 1
    for key in ("params", "exp_avg"):
        assert max_deviation(r["final"][key], r["reference"][key]) == 0.0, key


def test_names_reach_lion_sf_and_its_checkpoint_keys() -> None:
    r = RUN.result()
    assert tuple(sorted(r["unit_names"])) == tuple(sorted(UNITS))
    assert r["group_decay"] == {n: (DECAY if n in DECAYED else 0.0) for n in r["group_decay"]}
    assert r["flat_keys"] == sorted(f"state.{n}.exp_avg" for n in r["final"]["params"])


def test_checkpoint_round_trip_is_exact() -> None:
    r = RUN.result()
    for key in ("params", "exp_avg"):
        assert max_deviation(r["resumed"][key], r["final"][key]) == 0.0, key


def test_one_lion_sf_per_model_part() -> None:
    parts = [Tiny(), Tiny()]
    container = lion_sf_optimizer(lr=LR).build(model_parts=parts)
    assert isinstance(container, LionSFOptimizersContainer) and len(container) == 2
    for part, opt in zip(parts, container):
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in part.parameters()}


def test_instance_arguments_must_agree_across_groups() -> None:
    named = list(Tiny().named_parameters())
    groups = [{"params": [p], "param_names": [n], "lr": LR, "agreement": a, "fused": True}
              for (n, p), a in zip(named[:2], ("module", "tensor"))]
    with pytest.raises(ValueError, match="agreement"):
        build_lion_sf(groups)
    with pytest.raises(ValueError, match="optimizer_factory_kwargs_by_name"):
        build_lion_sf(groups[:1], agreement="global")


def test_bf16_adam_states_are_refused() -> None:
    config = lion_sf_optimizer(lr=LR)
    config.implementation = "fused_opt_states_bf16"
    with pytest.raises(ValueError, match="bf16"):
        config.build(model_parts=[Tiny()])
