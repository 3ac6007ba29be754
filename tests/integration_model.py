"""The tiny model, data and single-process reference shared by the framework tests (HF Trainer, Lightning).

The model (57 elements in 6 tensors, a LayerNorm among them so a decay / no-decay split has
something to split) trains on a fixed dataset read in order. Which samples rank ``r`` sees at
step ``k`` depends on the framework's sampler (``samples(step, rank, world)``); a shuffling
sampler would give the reference other batches, so the tests read the data in order.

The reference computes the gradient of each rank's batch separately and adds them scaled by
``1/W``, which is what the engines' gradient averaging computes; at ``W = 2`` scaling by
1/2 is exact in floating point, so the comparison is bitwise. It must run single-threaded
like the ranks (``torch.set_num_threads(1)``): a matmul's sums round differently with
another thread count (2e-9 on ``exp_avg`` here).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from lion_sf_dist import LionSF

PER_DEVICE = 2
STEPS = 4
LR = 1e-2
DECAY = 0.1
BETAS = (0.9, 0.99)
DECAYED = ("inp.weight", "out.weight")  # what a decay / no-decay split gives weight decay to
UNITS = ("inp", "out", "norm")  # LionSF's unit names under agreement="module"

Samples = Callable[[int, int, int], list[int]]  # (step, rank, world) -> dataset indices of that rank's batch


class Tiny(torch.nn.Module):
    """``forward(x, labels)`` returns ``{"loss", "logits"}``, as an HF Trainer expects."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(6, 5)
        self.norm = torch.nn.LayerNorm(5)
        self.out = torch.nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.out(torch.tanh(self.norm(self.inp(x))))
        # A sum over outputs times 4, so the gradient norm exceeds 1 and default clipping would matter.
        return {"loss": ((logits - labels) ** 2).sum(-1).mean() * 4.0, "logits": logits}


def dataset(world: int, steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{"x": torch.randn(6, generator=g), "labels": torch.randn(2, generator=g)}
            for _ in range(steps * PER_DEVICE * world)]


def named_groups(named: list[tuple[str, torch.nn.Parameter]], prefix: str = "") -> list[dict]:
    """LionSF groups: weight decay on ``DECAYED`` (names after ``prefix``), none on biases and the norm."""
    decay = [(n, p) for n, p in named if n.removeprefix(prefix) in DECAYED]
    rest = [(n, p) for n, p in named if n.removeprefix(prefix) not in DECAYED]
    return [{"params": decay, "weight_decay": DECAY}, {"params": rest, "weight_decay": 0.0}]


def make_lion_sf(named: list[tuple[str, torch.nn.Parameter]], prefix: str = "") -> LionSF:
    return LionSF(named_groups(named, prefix), lr=LR, betas=BETAS, agreement="module")


def reference(world: int, samples: Samples, steps: int = STEPS, clip: Optional[float] = None,
              data_steps: int = STEPS) -> dict[str, dict[str, torch.Tensor]]:
    """Single-process LionSF on the batches the ranks see, gradients averaged as the engines do.

    ``data_steps``: the dataset holds that many global batches (fewer than ``steps``: several epochs).
    """
    model = Tiny()
    named = list(model.named_parameters())
    opt = make_lion_sf(named)
    data = dataset(world, data_steps)
    for step in range(steps):
        opt.zero_grad()
        for rank in range(world):
            part = [data[i] for i in samples(step, rank, world)]
            loss = model(torch.stack([d["x"] for d in part]), torch.stack([d["labels"] for d in part]))["loss"]
            (loss / world).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in named},
            "exp_avg": {n: opt.state[p]["exp_avg"].clone() for n, p in named}}
