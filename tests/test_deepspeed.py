"""DeepSpeed ZeRO 0/1/2/3 (CPU accelerator, gloo): LionSF under the engine equals single-process LionSF.

Every rank feeds the same batch, so the gradient the engine averages equals the
single-process gradient up to rounding; after ``STEPS`` steps the full parameters and
``exp_avg`` (rebuilt from every rank's partitions by ``LionSF.fragments()``, and independently
from the model's all-gathered parameters / ``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``) must match single-process LionSF.

Tolerance (``RTOL = 1e-5``, ``ATOL = 1e-6``): averaging W equal fp32 gradients rounds
(at W = 3, ``(g + g + g) / 3`` differs from ``g`` in the last bit), and clipping rescales
with a differently rounded norm. ``exp_avg`` is linear in the gradient, so it inherits a
relative error of a few ulp (observed <= 3e-8 absolute, at W = 3). Parameters depend on
the gradient only through signs and integer counts, so they are exact unless a rounding
flips a sign, which these inputs never do (observed 0). The control counting per partition
deviates by about 1e-3 to 7e-3, far above the tolerance. Where the gradients LionSF is handed
are known exactly (logged and replayed on one process, bf16 engines included), the check is
bitwise.

Engine setup is slow, so one spawned run per world size builds every engine (cached here).
"""

from __future__ import annotations

import os

import pytest
import torch

from lion_sf_dist import LionSF
from tests.deepspeed_cases import (
    ACCELERATE,
    ATOL,
    CASES,
    CONTROLS,
    HYPER,
    LAUNCH_CASES,
    PLAIN,
    REPLAYS,
    RESUMES,
    RTOL,
    STEPS,
    UNSUPPORTED,
    Case,
    cases_for,
    make_model,
    param_groups,
    reference,
)
from tests.deepspeed_worker import run_cases
from tests.harness import run

os.environ.setdefault("DS_ACCELERATOR", "cpu")
WORLDS = [1, 2, 3]
FIXES = ("lion_sf_dist.deepspeed.initialize", "lion_sf_dist.deepspeed.attach(engine)")


_RUNS: dict[int, object] = {}


def results(world: int) -> list[dict]:
    """Every rank's results of the one spawned run at ``world`` ranks (a failure is kept too, not re-run)."""
    if world not in _RUNS:
        try:
            _RUNS[world] = run(run_cases, world, cases_for(world), timeout=480)
        except AssertionError as e:
            _RUNS[world] = e
    if isinstance(_RUNS[world], AssertionError):
        raise _RUNS[world]
    return _RUNS[world]


_REFS: dict = {}


def ref(case: Case):
    if case.name not in _REFS:
        _REFS[case.name] = reference(case)
    return _REFS[case.name]


def _close(actual: dict, expected: dict) -> float:
    """Assert ``actual`` matches ``expected`` name by name; return the largest absolute deviation."""
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
    return max((actual[n] - expected[n]).abs().max().item() for n in expected)


MATCHING = ([(w, c) for w in WORLDS for c in CASES] + [(w, ACCELERATE[0]) for w in WORLDS if w > 1]
            + [(2, c) for c in LAUNCH_CASES])


@pytest.mark.parametrize("world,case", MATCHING, ids=[f"W{w}-{c.name}" for w, c in MATCHING])
def test_matches_single_process(world: int, case: Case) -> None:
    params, exp_avg, _ = ref(case)
    out = results(world)
    for rank, res in enumerate(out):
        r = res[case.name]
        assert r["error"] is None
        assert all((c == 1).all() for c in r["cover"].values()), "partitions must tile every parameter exactly once"
        dev_p = _close(r["params"], params)
        dev_m = _close(r["exp_avg"], exp_avg)
        _close(r["ds_params"], params)
        if not case.round_robin:  # DeepSpeed's own state views assume the original order
            _close(r["ds_exp_avg"], exp_avg)
        assert torch.equal(r["scale"], out[0][case.name]["scale"]), f"rank {rank}'s scales differ from rank 0's"
        if rank == 0:
            print(f"W={world} {case.name} stage {r['stage']}: max |dparam| {dev_p:.2e}, max |dexp_avg| {dev_m:.2e}")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", CONTROLS, ids=[c.name for c in CONTROLS])
def test_local_counts_exceed_tolerance(world: int, case: Case) -> None:
    """Counting each rank's partition alone (no all-reduce) gives a result the tolerance rejects."""
    params, _, _ = ref(case)
    r = results(world)[0][case.name]
    with pytest.raises(AssertionError):
        _close(r["params"], params)


@pytest.mark.parametrize("world", WORLDS)
def test_one_reduction_per_engine_step(world: int) -> None:
    """One count reduction per engine step, one int64 collective in it (none at W = 1 or ZeRO-0)."""
    for case in CASES:
        r = results(world)[0][case.name]
        expected = 1 if world > 1 and case.stage > 0 else 0
        assert r["reductions"] == [expected] * case.lionsf_steps, (case.name, r["reductions"])


def test_units_spanning_partitions_were_deferred() -> None:
    """The cases with several partitions per rank exercise counting across them before any is stepped."""
    r = results(2)[0]
    assert r["z1_instance"]["partitions"] == 2 and r["z2_instance_rr"]["partitions"] == 2
    assert r["z3_instance_subgroups"]["partitions"] > 2


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", PLAIN, ids=[c.name for c in PLAIN])
def test_plain_deepspeed_initialize_raises_naming_the_fixes(world: int, case: Case) -> None:
    for res in results(world):
        error = res[case.name]["error"]
        assert error is not None and all(fix in error for fix in FIXES), error


def test_accelerate_without_attach_raises_naming_the_fixes() -> None:
    error = results(1)[0][ACCELERATE[1].name]["error"]
    assert error is not None and all(fix in error for fix in FIXES), error


def test_bf16_without_zero_is_refused() -> None:
    error = results(1)[0][UNSUPPORTED[0].name]["error"]
    assert error is not None and "ZeRO stage 1, 2 or 3" in error, error


def test_nonfinite_gradient_poisons_nothing() -> None:
    """ZeRO-0: LionSF skips the unit holding a +inf gradient; ZeRO 1-3: DeepSpeed skips the whole step.

    Both are compared with the single-process run in ``test_matches_single_process``; here:
    everything stays finite, and LionSF stepped only where it should.
    """
    for world in WORLDS:
        for case in (c for c in CASES if c.poison is not None):
            r = results(world)[0][case.name]
            assert all(torch.isfinite(t).all() for t in [*r["params"].values(), *r["exp_avg"].values()])
            assert len(r["reductions"]) == case.lionsf_steps


def test_clipping_policy() -> None:
    """A missing ``gradient_clipping`` means none (DeepSpeed would clip to 1.0); an explicit one is honoured."""
    r = results(2)[0]
    unclipped = [c for c in CASES if c.clip is None]
    assert all(r[c.name]["clip"] == 0.0 for c in unclipped)
    clipped = next(c for c in CASES if c.clip is not None)
    assert r[clipped.name]["clip"] == clipped.clip
    # The check can fail: the gradient norm exceeds both limits, so clipping changes exp_avg.
    _, exp_clip, norms = ref(clipped)
    assert norms[0] > max(1.0, clipped.clip)
    _, exp_plain, _ = ref(Case("noclip", clipped.stage))
    assert not all(torch.allclose(exp_clip[n], exp_plain[n], rtol=RTOL, atol=ATOL) for n in exp_plain)


@pytest.mark.parametrize("world", [1, 3])
def test_pinned_deepspeed_internals_exist(world: int) -> None:
    """Every private DeepSpeed name zero_internals reads exists on real engines of each stage."""
    for case in CASES:
        r = results(world)[0][case.name]
        assert r["missing_attrs"] == [] and r["missing_markers"] == [], case.name
        assert all(r["flattened"]) == (case.stage > 0) and any(r["flattened"]) == (case.stage > 0), case.name


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", REPLAYS, ids=[c.name for c in REPLAYS])
def test_bitwise_replay_of_what_lionsf_was_handed(world: int, case: Case) -> None:
    """Given the exact full tensors of each engine step, one process computes the same step, bit for bit.

    This covers engines whose gradients differ from an fp32 single-process run (bf16), and
    shows the per-engine-step schedule (several sub-groups) changes nothing.
    """
    log = results(world)[0][case.name]["replays"]
    assert len(log) == STEPS
    scales, nearest_differs = [], False
    for step, (before, after) in enumerate(log):
        for rounding in (True, False) if case.sr else (True,):
            opt, named = _replayed(case, before, step, rounding)
            if rounding:
                scales.append(opt.last_scale)
            for name, t in after.items():
                same = (torch.equal(named[name].detach().view(-1), t["p"])
                        and torch.equal(opt.state[named[name]]["exp_avg"].float().view(-1), t["m"]))
                assert same or not rounding, f"step {step}: {name}"
                nearest_differs |= not same
    assert any((s < 1).any() for s in scales), "every unit fully agreed: the replay could not tell counts apart"
    if case.sr:
        assert nearest_differs, "rounding to nearest gave the same bits: the replay could not tell rounding apart"


def _replayed(case: Case, before: dict, step: int, stochastic: bool) -> tuple[LionSF, dict[str, torch.Tensor]]:
    """One process's LionSF (the case's options; its ``step``-th rounded step) stepped on the logged tensors."""
    model = make_model()
    options = {**case.options(), "stochastic_rounding": stochastic and case.sr}
    opt = LionSF(param_groups(model, case.two_groups), lr=HYPER[0]["lr"], **options)
    opt.rounding_step = step
    named = dict(model.named_parameters())
    assert before.keys() == named.keys()
    for name, t in before.items():
        p = named[name]
        p.data.copy_(t["p"].view(t["shape"]))
        p.grad = t["g"].view(t["shape"]).clone()
        opt.state[p]["exp_avg"].copy_(t["m"].view(t["shape"]))
    opt.step()
    return opt, named


@pytest.mark.parametrize("case", RESUMES, ids=[c.name for c in RESUMES])
def test_deepspeed_checkpoint_resume_equals_uninterrupted(case: Case) -> None:
    """``engine.save_checkpoint`` / ``load_checkpoint`` keep LionSF's per-partition ``exp_avg``: bitwise."""
    r = results(3)[0][case.name]
    for a, b in zip(r["resumed"][:2], r["uninterrupted"][:2]):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[n], b[n]) for n in a)
