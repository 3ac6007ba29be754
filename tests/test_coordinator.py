"""Several LionSF instances through one Coordinator equal one LionSF over all their parameters.

Model parts (torchtitan builds one optimizer per part) in one process, and pipeline stages
on two ranks (gloo), with gradients set directly, so the comparison is bitwise. The control:
the same parts without a coordinator count per part and end elsewhere.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist

from lion_sf_dist import Coordinator, LionSF
from tests.harness import run

STEPS = 3


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3), torch.nn.Linear(3, 2))


def grads(step: int, named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(p.shape, generator=gen) for n, p in named}


# "0.bias" sits in the second part while "0.weight" is in the first: a module split across parts
PARTS = (("0.weight", "2.weight", "2.bias"), ("0.bias", "3.weight", "3.bias"))


def split(named: list[tuple[str, torch.Tensor]]) -> list[list[tuple[str, torch.Tensor]]]:
    return [[(n, p) for n, p in named if n in part] for part in PARTS]


def train(opts: list[LionSF], named: list[tuple[str, torch.Tensor]], order: list[int]) -> None:
    for step in range(STEPS):
        for (_n, p), g in zip(named, grads(step, named).values()):
            p.grad = g.clone()
        for i in order:
            opts[i].step()


OPTIONS = {"global": dict(agreement="global"), "module": dict(agreement="module"),
           "group": dict(agreement="group"), "tensor": dict(agreement="tensor"),
           "global_ema_clamp": dict(agreement="global", agreement_ema=True, negative="clamp", pow=0.5)}


def reference(options: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    m = model()
    named = list(m.named_parameters())
    opt = LionSF(named, lr=0.05, weight_decay=0.1, **options)
    train([opt], named, [0])
    return {n: (p.detach().clone(), opt.state[p]["exp_avg"].clone()) for n, p in named}


def parts(options: dict[str, Any], coordinator: Optional[Coordinator], order: list[int]) -> dict:
    m = model()
    named = list(m.named_parameters())
    opts = [LionSF(part, lr=0.05, weight_decay=0.1, coordinator=coordinator, **options) for part in split(named)]
    train(opts, named, order)
    return {n: (p.detach().clone(), opt.state[p]["exp_avg"].clone())
            for opt, part in zip(opts, split(named)) for n, p in part}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)


@pytest.mark.parametrize("name", OPTIONS)
def test_parts_in_one_process_equal_one_optimizer(name: str) -> None:
    options = OPTIONS[name]
    expected = reference(options)
    assert same(parts(options, Coordinator(), [0, 1]), expected)
    assert same(parts(options, Coordinator(), [1, 0]), expected), "the order members step in does not matter"
    if name != "tensor":  # the control: counted per part, a shared unit is scaled differently
        assert not same(parts(options, None, [0, 1]), expected)


def test_a_member_stepping_twice_is_an_error() -> None:
    m = model()
    coordinator = Coordinator()
    a, _ = (LionSF(part, coordinator=coordinator) for part in split(list(m.named_parameters())))
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    a.step()
    with pytest.raises(RuntimeError, match="stepped twice"):
        a.step()


def test_members_share_one_agreement() -> None:
    m = model()
    coordinator = Coordinator()
    first, second = split(list(m.named_parameters()))
    kept = LionSF(first, agreement="global", coordinator=coordinator)
    with pytest.raises(ValueError, match="share one agreement"):
        LionSF(second, agreement="module", coordinator=coordinator)
    assert kept.unit_names == ("global",)


def _stages(rank: int, world: int, options: dict[str, Any], shared: bool) -> dict:
    """Rank ``r`` holds part ``r`` (a pipeline stage) and its own LionSF."""
    m = model()
    named = list(m.named_parameters())
    mine = split(named)[rank]
    opt = LionSF(mine, lr=0.05, weight_decay=0.1, coordinator=Coordinator(dist.group.WORLD) if shared else None,
                 **options)
    for step in range(STEPS):
        g = grads(step, named)
        for n, p in mine:
            p.grad = g[n].clone()
        opt.step()
    return {n: (p.detach().clone(), opt.state[p]["exp_avg"].clone()) for n, p in mine}


@pytest.mark.parametrize("name", ["global", "module", "global_ema_clamp"])
def test_pipeline_stages_on_two_ranks_equal_one_optimizer(name: str) -> None:
    options = OPTIONS[name]
    expected = reference(options)
    shared = run(_stages, 2, options, True)
    assert same({**shared[0], **shared[1]}, expected)
    alone = run(_stages, 2, options, False)
    assert not same({**alone[0], **alone[1]}, expected)


def _pipelined(rank: int, world: int, options: dict[str, Any]) -> dict:
    """A real 2-stage ``torch.distributed.pipelining`` GPipe schedule (2 microbatches), one LionSF per stage,
    beside the same steps of one LionSF over the whole model in this process."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).sum()

    whole = model()
    stages = [torch.nn.Sequential(*list(model())[:2]), torch.nn.Sequential(*list(model())[2:])]
    mine = stages[rank]
    # names as in the whole model (stage 1's "0.weight" is the whole model's "2.weight"), so units match it
    named = [(f"{int(n.split('.')[0]) + 2 * rank}.{n.split('.')[1]}", p) for n, p in mine.named_parameters()]
    opt = LionSF(named, lr=0.05, weight_decay=0.1, coordinator=Coordinator(dist.group.WORLD), **options)
    ref = LionSF(list(whole.named_parameters()), lr=0.05, weight_decay=0.1, **options)
    schedule = ScheduleGPipe(PipelineStage(mine, rank, world, torch.device("cpu")), n_microbatches=2,
                             loss_fn=loss_fn)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 5, generator=gen), torch.randn(4, 2, generator=gen)
        opt.zero_grad()
        schedule.step(x) if rank == 0 else schedule.step(target=y)
        opt.step()
        ref.zero_grad()
        for xm, ym in zip(x.chunk(2), y.chunk(2)):
            (loss_fn(whole(xm), ym) / 2).backward()  # the schedule averages gradients over microbatches
        ref.step()
    whole_named = dict(whole.named_parameters())
    return {n: (torch.equal(p, whole_named[n]), (opt.state[p]["exp_avg"] - ref.state[whole_named[n]]["exp_avg"])
                .abs().max().item()) for n, p in named}


def test_torch_pipelining_two_stages_equal_one_optimizer() -> None:
    results = run(_pipelined, 2, OPTIONS["global"])
    merged = {**results[0], **results[1]}
    assert len(merged) == 6
    assert all(params_equal for params_equal, _ in merged.values()), merged
    assert max(dev for _, dev in merged.values()) == 0.0, merged  # the same ops in the same order


def test_torchtitan_container_joins_its_model_parts() -> None:
    """torchtitan builds one LionSF per model part; the container's Coordinator makes them count as one."""
    from lion_sf_dist.integrations.torchtitan import lion_sf_optimizer

    def as_parts(m: torch.nn.Module) -> list[torch.nn.Module]:
        return [torch.nn.Sequential(*list(m)[:2]), torch.nn.Sequential(*list(m)[2:])]

    options = dict(lr=0.05, weight_decay=0.1, agreement="global")
    whole = model()
    ref = LionSF([{"params": [p for n, p in whole.named_parameters() if "bias" in n], "weight_decay": 0.0},
                  {"params": [p for n, p in whole.named_parameters() if "bias" not in n]}], **options)
    parts_model = model()
    container = lion_sf_optimizer(lr=0.05, weight_decay=0.1, no_decay="bias", agreement="global").build(
        model_parts=as_parts(parts_model))
    assert len(container.optimizers) == 2
    for step in range(STEPS):
        for m in (whole, parts_model):
            for (_n, p), g in zip(m.named_parameters(), grads(step, list(m.named_parameters())).values()):
                p.grad = g.clone()
        ref.step()
        container.step()
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), parts_model.parameters()))
