"""Shared pieces of the checkpoint tests: a tiny model with a buffer, deterministic batches,
training, and full (unsharded) copies of everything a checkpoint restores.

Sizes do not divide 2, 3 or 4 and ``b`` has 3 output rows, so under FSDP2 at 4 ranks one
rank holds empty shards of ``b``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lion_sf_dist import LionSF
from lion_sf_dist.checkpoint.collect import unwrap

STEPS = 3
BATCH = 12  # divisible by 1, 2, 3 and 4: every rank sees its slice, the mean is the same


class Tiny(nn.Module):
    """7 -> 6 -> 3 MLP with a persistent buffer that counts steps."""

    def __init__(self, seed: int = 0, out: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(7, 6)
        self.b = nn.Linear(6, out)
        self.register_buffer("seen", torch.zeros(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def make_optimizer(model: nn.Module, ema: bool = True) -> LionSF:
    """LionSF with module units and (``ema``) the agreement average: every kind of state is exercised."""
    inner = unwrap(model)
    groups = [
        {"params": [inner.a.weight, inner.b.weight], "param_names": ["a.weight", "b.weight"]},
        {"params": [inner.a.bias, inner.b.bias], "param_names": ["a.bias", "b.bias"], "lr": 3e-3},
    ]
    return LionSF(groups, lr=1e-2, weight_decay=0.1, agreement="module", agreement_ema=ema, pow=0.5)


def batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 7, generator=g), torch.randn(BATCH, 3, generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    """``steps`` steps on this rank's slice of each batch (DDP and FSDP2 average the gradients)."""
    for step in steps:
        x, y = batch(step)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = torch.nn.functional.mse_loss(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            unwrap(model).seen += 1


def _full(t: Tensor) -> Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_state(model: nn.Module, opt: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
    """Full copies of parameters, buffers, ``exp_avg`` and ``agreement_ema`` by name (collective under FSDP2)."""
    inner = unwrap(model)
    out: dict[str, Any] = {"params": {n: _full(p) for n, p in inner.named_parameters()},
                           "buffers": {n: _full(b) for n, b in inner.named_buffers()}}
    if opt is not None:
        names = dict((id(p), n) for n, p in inner.named_parameters())
        out["exp_avg"] = {names[id(p)]: _full(s["exp_avg"]) for p, s in opt.state.items()}
        averages = opt.agreement_average()
        if averages is not None:
            out["ema"] = {names[id(p)]: averages[unit] for ps, ids in zip(opt.logical_params(), opt.units.ids)
                          for p, unit in zip(ps, ids)}
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any], what: str = "") -> None:
    """Bitwise equality of two :func:`full_state` results, naming the first difference."""
    assert a.keys() == b.keys(), f"{what}: {a.keys()} vs {b.keys()}"
    for kind in a:
        assert a[kind].keys() == b[kind].keys(), f"{what} {kind}: {sorted(a[kind])} vs {sorted(b[kind])}"
        assert a[kind], f"{what} {kind}: nothing to compare"
        for name in a[kind]:
            x, y = a[kind][name], b[kind][name]
            assert x.shape == y.shape and x.dtype == y.dtype, f"{what} {kind} {name}: {x.shape} vs {y.shape}"
            assert torch.equal(x, y), f"{what} {kind} {name} differs:\n{x}\n{y}"


def trained(steps: int = 2, seed: int = 0) -> tuple[Tiny, LionSF]:
    """A :class:`Tiny` (``seed``) and its optimizer after ``steps`` steps: every kind of state non-zero."""
    model = Tiny(seed)
    opt = make_optimizer(model)
    train(model, opt, range(steps))
    return model, opt


class WritesAFile:
    """Unpickles into a call that writes a file: the code a tampered checkpoint file would run."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.target)!r}, 'w').write('ran')",)
