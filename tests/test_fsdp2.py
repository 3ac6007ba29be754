"""FSDP2, HSDP and tensor parallel: sharded LionSF equals single-process LionSF bit for bit.

What is promised: docs/CONTRACT.md sections 4-6.

Each world size is one spawned gloo job (``tests/fsdp_worker.py:all_cases``) that runs every
layout and option with full gradients sliced onto the shards; the tests below read its
results. The expected values are computed here, in a single process, on full tensors.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from tests.fsdp_cases import (
    BAD_STEP,
    NAMES,
    OPTIONS,
    STACKED,
    STACKED_CHUNKED,
    STEPS,
    WITHOUT_REFERENCE,
    every_tensor_stacked,
    initial,
    make_optimizer,
    reference,
    single_process,
    tiny_model,
)
from tests.fsdp_layouts import layouts
from tests.fsdp_worker import TRAIN_BATCH, TRAIN_STEPS, all_cases
from tests.harness import run

WORLDS = (1, 2, 3, 4)


@functools.cache
def results(world: int) -> list[dict[Any, Any]]:
    """Every rank's results of the one job at ``world`` ranks."""
    return run(all_cases, world, timeout=400.0)


@functools.cache
def expected(option: str, nonfinite: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    return single_process(option, nonfinite)


def assert_same(got: dict, want: dict, what: str) -> None:
    """Full params and exp_avg bitwise equal, parameter by parameter."""
    for kind in ("params", "exp_avg"):
        for n in NAMES:
            a, b = got[kind][n], want[kind][n]
            assert a.shape == b.shape and torch.equal(a, b), (
                f"{what}: {kind} of {n} differs (max |diff| {(a - b).abs().max().item():.3g}); "
                f"layout {got.get('layout', {}).get(n)}"
            )


CASES = [(w, layout, option) for w in WORLDS for layout in layouts(w) for option in OPTIONS]


@pytest.mark.parametrize("world,layout,option", CASES)
def test_sharded_equals_single_process(world: int, layout: str, option: str) -> None:
    for rank, res in enumerate(results(world)):
        got = res[("equal", layout, option)]
        assert_same(got, expected(option), f"W={world} {layout} {option} rank {rank}")
        assert all(got["exp_avg_like_param"].values()), "exp_avg must be laid out like its parameter"


@pytest.mark.parametrize("option", [o for o in OPTIONS if o not in WITHOUT_REFERENCE])
def test_single_process_matches_reference(option: str) -> None:
    """The single-process run the sharded ones equal matches the contract-only reference:
    exp_avg bitwise, parameters to float32 rounding of the scalar step (tests/reference.py)."""
    for nonfinite in (False, True):
        ours, ref = expected(option, nonfinite), reference(option, nonfinite)
        for n in NAMES:
            assert torch.equal(ours["exp_avg"][n], ref["exp_avg"][n]), n
            torch.testing.assert_close(ours["params"][n], ref["params"][n], rtol=0, atol=1e-7)


@pytest.mark.parametrize("world,layout", [(4, "tp_fsdp"), (4, "mixed2d"), (3, "fsdp2")])
def test_sharded_matches_reference(world: int, layout: str) -> None:
    ref = reference("module")
    got = results(world)[0][("equal", layout, "module")]
    for n in NAMES:
        assert torch.equal(got["exp_avg"][n], ref["exp_avg"][n]), n
        torch.testing.assert_close(got["params"][n], ref["params"][n], rtol=0, atol=1e-7)


@pytest.mark.parametrize("world", WORLDS[1:])
def test_compiled_stacked_route_sharded_equals_single_process(world: int) -> None:
    """use_triton=True with every tensor on the stacked route: FSDP2 shards (uneven, some empty) give the
    single-process result bit for bit, and that one matches the eager path within the compiled path's
    tolerance (one rounding of ``g * (1 - b)`` per step, tests/test_core_reference.py)."""
    with every_tensor_stacked() as stacked:
        want = single_process(STACKED)
    assert stacked, "the single-process run took no stack"
    eager = expected("module")
    for n in NAMES:
        torch.testing.assert_close(want["exp_avg"][n], eager["exp_avg"][n], rtol=0, atol=STEPS * 2.0**-22)
        torch.testing.assert_close(want["params"][n], eager["params"][n], rtol=0, atol=1e-7)
    for rank, res in enumerate(results(world)):
        got = res[("stacked", "fsdp2")]
        assert got["stacks"], f"rank {rank} took no stack"
        assert_same(got, want, f"W={world} fsdp2 stacked rank {rank}")


@pytest.mark.parametrize("world", WORLDS[1:])
def test_chunked_stacked_route_sharded_equals_single_process(world: int) -> None:
    """The CPU default with every small tensor on its stacked route: FSDP2 shards (uneven, some empty)
    give the single-process result bit for bit, and that one is the tensor-by-tensor result bit for bit."""
    with every_tensor_stacked("chunked") as stacked:
        want = single_process(STACKED_CHUNKED)
    assert stacked, "the single-process run took no stack"
    assert_same(want, expected("module"), "single process, stacked against tensor by tensor")
    for rank, res in enumerate(results(world)):
        got = res[(STACKED_CHUNKED, "fsdp2")]
        assert got["stacks"], f"rank {rank} took no stack"
        assert_same(got, want, f"W={world} fsdp2 chunked stacks rank {rank}")


def test_layouts_are_what_they_claim() -> None:
    """The W=4 layouts hold the shardings the tests are about (empty shards, 2-D, strided)."""
    res = results(4)[0]
    hsdp = res[("equal", "hsdp", "tensor")]["layout"]
    assert all(v == "(2, 2) (Replicate(), Shard(dim=0))" for v in hsdp.values()), hsdp
    tp = res[("equal", "tp_fsdp", "tensor")]["layout"]
    assert "_StridedShard" in tp["a.weight"] and "Shard(dim=1)" in tp["b.weight"], tp
    mixed = res[("equal", "mixed2d", "tensor")]["layout"]
    assert mixed["c.weight"].startswith("(1, 2)") and mixed["b.bias"].startswith("(4,)"), mixed
    assert initial()["c.weight"].shape[0] < 2 and initial()["b.bias"].shape[0] < 4  # empty shards on high ranks


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("option", ["tensor", "global"])
def test_local_counts_give_a_different_answer(world: int, option: str) -> None:
    """Control: the same run with the count reduction removed is not the single-process result."""
    want = expected(option)
    per_rank = [res[("control", "fsdp2", option)] for res in results(world)]
    differs = [any(not torch.equal(c["params"][n], want["params"][n]) for n in NAMES) for c in per_rank]
    assert all(differs), "shard-local counts matched the exact result: the equality test could not fail"
    scales = [c["scale"] for c in per_rank]
    assert any(not torch.equal(s, scales[0]) for s in scales), "shard-local scales should disagree across ranks"


def _units(option: str) -> int:
    named = list(tiny_model().named_parameters())
    return make_optimizer(named, option).units.count


@pytest.mark.parametrize("world,layout", [(w, layout) for w in (2, 3, 4) for layout in layouts(w)])
def test_one_all_reduce_per_process_group(world: int, layout: str) -> None:
    """The second step issues only int64 all_reduces, one per distinct set of ranks."""
    sizes = set()
    for rank, res in enumerate(results(world)):
        calls = res[("collectives", layout)]
        assert calls, f"rank {rank}: no collective at all"
        assert {op for op, _, _ in calls} == {"all_reduce"}, calls
        ranks = [r for _, r, _ in calls]
        assert len(set(ranks)) == len(ranks), f"rank {rank}: a group was reduced twice: {calls}"
        assert all(rank in r for r in ranks), calls
        assert all(info == (torch.int64, 3 * _units("global")) for _, _, info in calls), calls
        sizes.add(tuple(sorted(len(r) for r in ranks)))
    if layout in ("fsdp2", "mixed1d"):
        assert sizes == {(world,)}, sizes
    if layout == "hsdp":
        assert sizes == {(2,)}, "HSDP reduces over its shard dimension only"
    if layout == "tp_fsdp":
        assert sizes == {(2, 4)}, "FSDP-only parameters over dp, FSDP x TP ones over the whole mesh"


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("case", [("fsdp2", "tensor"), ("fsdp2", "global"), ("last", "module")])
def test_nonfinite_on_one_shard_skips_the_unit_everywhere(world: int, case: tuple[str, str]) -> None:
    layout, option = case
    layout = layouts(world)[-1] if layout == "last" else layout
    want = expected(option, nonfinite=True)
    for rank, res in enumerate(results(world)):
        got = res[("nonfinite", layout, option)]
        assert_same(got, want, f"W={world} {layout} {option} rank {rank}")
        assert int(got["skipped"][BAD_STEP]) == 1, f"rank {rank}: {got['skipped']}"
        assert torch.equal(got["params"]["a.weight"], got["before_bad"]["a.weight"]), "skipped unit moved"
        assert all(torch.isfinite(t).all() for t in got["exp_avg"].values())


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("option", ["module", "ema"])
def test_state_follows_parameters_swapped_in(world: int, option: str) -> None:
    """Accelerate-style swap after a step on full parameters: state follows, state_dict() works."""
    want = expected(option)
    for res in results(world):
        got = res[("swapped", option)]
        assert_same(got, want, f"W={world} swapped {option}")
        sd = got["state_dict"]
        assert sd["keys"] == list(range(got["n_params"])) and sd["exp_avg_types"] == ["DTensor"], sd
        assert not sd["old_in_state"], "state of the replaced parameters was kept"


def test_hf_accelerate_fsdp2_prepare() -> None:
    """Through Accelerate's own FSDP2 prepare (CPU, W=2): bitwise equal to single process;
    save_state / load_state restore params and exp_avg exactly."""
    want = expected("module")
    for res in results(2):
        got = res[("accelerate", "module")]
        assert "error" not in got, got.get("error")
        assert got["param_types"] == ["DTensor"], got["param_types"]
        assert got["state_keys"] == list(range(got["n_params"])) and got["exp_avg_types"] == ["DTensor"]
        assert_same(got, want, "accelerate")
        assert got["restored"] == {"moved": True, "back": True}, got["restored"]


def test_fsdp1_is_refused() -> None:
    for res in results(2):
        msgs = res[("fsdp1",)]
        for when in ("construct", "step"):
            assert "FSDP1" in msgs[when] and "fully_shard" in msgs[when], (when, msgs[when])


def _train_single_process() -> dict[str, torch.Tensor]:
    model = tiny_model()
    opt = make_optimizer(list(model.named_parameters()), "module")
    gen = torch.Generator().manual_seed(7)
    for _ in range(TRAIN_STEPS):
        x, y = torch.randn(TRAIN_BATCH, 5, generator=gen), torch.randn(TRAIN_BATCH, 1, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def test_fsdp2_training_w2_matches_w1() -> None:
    """Real backward passes: FSDP2 at W=2 (each rank half the batch, gradients averaged by
    reduce-scatter) vs W=1 and a plain single process. Gradients differ by float rounding
    only, so parameters agree to 1e-6 (a sign flip would move an element by 2 * lr = 2e-2)."""
    plain = _train_single_process()
    w1 = results(1)[0][("train",)]
    for n in NAMES:
        assert torch.equal(w1[n], plain[n]), f"FSDP2 at W=1 differs from plain training in {n}"
    for res in results(2):
        for n in NAMES:
            torch.testing.assert_close(res[("train",)][n], w1[n], rtol=0, atol=1e-6)
    assert any(not torch.equal(plain[n], initial()[n]) for n in NAMES)


def test_tp_fsdp_training_matches_single_process() -> None:
    """Real backward passes through ColwiseParallel/RowwiseParallel x FSDP2 on a 2x2 mesh
    (each dp row half the batch): gradients arrive laid out like their parameters and the
    result equals plain training up to float rounding of the gradients (1e-6)."""
    plain = _train_single_process()
    for res in results(4):
        for n in NAMES:
            torch.testing.assert_close(res[("train", "tp_fsdp")][n], plain[n], rtol=0, atol=1e-6)


def test_stochastic_rounding_refuses_a_shard_that_is_not_one_block() -> None:
    res = results(2)
    assert [r[("interleaved",)]["rows"] for r in res] == [[0, 1, 4, 5], [2, 3, 6, 7]]  # not one block, as meant
    for r in res:
        assert "stochastic_rounding needs each element's place" in r[("interleaved",)][True]
        assert r[("interleaved",)][False] == ""
        assert (r[("interleaved",)]["probes", True], r[("interleaved",)]["probes", False]) == (1, 0)


def test_partial_gradient_is_refused() -> None:
    for res in results(2):
        assert "Partial" in res[("partial",)] and "redistribute" in res[("partial",)], res[("partial",)]
