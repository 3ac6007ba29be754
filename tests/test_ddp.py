"""DDP: every rank holds full replicas and reduced gradients, so LionSF needs no reduction."""

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from lion_sf_dist import LionSF
from tests.harness import run


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _batches(steps):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 7, generator=g), torch.randn(6, 3, generator=g)) for _ in range(steps)]


def _train(model, opt, batches, rank=0, world=1):
    for x, y in batches:
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = torch.nn.functional.mse_loss(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _ddp_rank(rank, world, steps):
    model = DDP(_model())
    opt = LionSF(model.named_parameters(), lr=1e-2, weight_decay=0.1, agreement="module")
    params = _train(model, opt, _batches(steps), rank, world)
    return params, opt.last_scale


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_matches_single_process(world):
    steps = 4
    model = _model()
    opt = LionSF(model.named_parameters(), lr=1e-2, weight_decay=0.1, agreement="module")
    # The single-process run sees the mean of the per-rank batch means, as DDP averages them.
    ref = []
    for x, y in _batches(steps):
        opt.zero_grad()
        for xs, ys in zip(x.chunk(world), y.chunk(world)):
            (torch.nn.functional.mse_loss(model(xs), ys) / world).backward()
        opt.step()
    ref = [p.detach() for p in model.parameters()]
    results = run(_ddp_rank, world, steps)
    for params, scale in results:
        for a, b in zip(params, results[0][0]):
            assert torch.equal(a, b), "DDP ranks diverged"
        torch.testing.assert_close(scale, opt.last_scale, rtol=0, atol=1e-6)
        for a, b in zip(params, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
