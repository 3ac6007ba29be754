"""Shared inputs of the FSDP2 / HSDP / tensor-parallel tests: a tiny model, seeded full gradients,
optimizer options, and the single-process results every sharded run must reproduce.

Sizes do not divide 2, 3 or 4, and ``c`` has one output row, so under FSDP2 every rank but
rank 0 holds empty shards of ``c.weight`` and ``c.bias``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional
from unittest import mock

import torch
from torch import Tensor, nn

import lion_sf_dist.kernel.chunked as chunked
import lion_sf_dist.kernel.compiled as compiled
from lion_sf_dist import LionSF
from tests.reference import ReferenceLionSF

NAMES = ("a.weight", "a.bias", "b.weight", "b.bias", "c.weight", "c.bias")
GROUP0 = ("a.weight", "a.bias", "c.weight")  # the rest is group 1: module units span both groups
HYPER = ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0})
BETAS = (0.9, 0.99)
STEPS = 3
OPTIONS: dict[str, dict[str, Any]] = {
    "tensor": {"agreement": "tensor"},
    "module": {"agreement": "module"},
    "group": {"agreement": "group", "pow": 2.0},
    "global": {"agreement": "global", "decoupled_weight_decay": True},
    "ema": {"agreement": "module", "agreement_ema": True, "negative": "clamp", "pow": 0.5},
    # bf16 exp_avg rounded stochastically: the bits follow each element's logical index, so
    # every sharding stores the same values (no reference: it cannot draw the library's bits)
    "bf16_sr": {"agreement": "tensor", "state_dtype": torch.bfloat16, "stochastic_rounding": True},
}
WITHOUT_REFERENCE = ("bf16_sr",)
STACKED = "stacked"  # options only inside every_tensor_stacked(): the compiled path's stacks,
STACKED_CHUNKED = "stacked-chunked"  # and the chunked path's


@contextlib.contextmanager
def every_tensor_stacked(path: str = "compiled") -> Iterator[list[int]]:
    """Module units with stacks of one allowed, so every tensor takes ``path``'s stacked route: ``"compiled"``
    (``OPTIONS[STACKED]``, ``use_triton=True``; compiling anything fails the case; every contiguous tensor,
    all of them under FSDP2) or ``"chunked"`` (``OPTIONS[STACKED_CHUNKED]``, the CPU default; every tensor
    of at most ``STACK_NUMEL`` elements). Yields the sizes of the stacks stepped."""
    stacked: list[int] = []
    if path == "compiled":
        real_apply = compiled._stacked_apply

        def no_compile(fn: Any, device: Any) -> Any:
            raise AssertionError("every tensor should take the stacked route")

        patches = [
            mock.patch.object(compiled, "STACK_MIN", 1),
            mock.patch.object(compiled, "_stacked_apply", lambda ps, *a: stacked.append(len(ps)) or real_apply(ps, *a)),
            mock.patch.object(compiled, "_compile", no_compile),
            mock.patch.dict(OPTIONS, {STACKED: {"agreement": "module", "use_triton": True}}),
        ]
    else:
        real_stacks = chunked._stacks
        patches = [
            mock.patch.object(chunked, "STACK_MIN", 1),
            mock.patch.object(chunked, "_stacks", lambda *a: [stacked.append(len(i)) or i for i in real_stacks(*a)]),
            mock.patch.dict(OPTIONS, {STACKED_CHUNKED: {"agreement": "module"}}),
        ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield stacked
BAD_STEP = STEPS - 1  # in "nonfinite" runs, this step's a.weight gradient has an Inf in its last row
NO_GRAD = ("b.bias", 1)  # this parameter has no gradient at this step


class Tiny(nn.Module):
    """5 -> 7 -> 3 -> 1 MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)
        self.c = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def initial() -> dict[str, Tensor]:
    """The full initial parameters, by name."""
    gen = torch.Generator().manual_seed(0)
    shapes = {n: p.shape for n, p in Tiny().named_parameters()}
    return {n: torch.randn(shapes[n], generator=gen) * 0.5 for n in NAMES}


def tiny_model() -> Tiny:
    """A :class:`Tiny` holding :func:`initial`'s values."""
    model = Tiny()
    values = initial()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(values[n])
    return model


def full_grads(step: int, nonfinite: bool = False) -> dict[str, Optional[Tensor]]:
    """The full gradient of every parameter at ``step`` (some elements exactly 0, one ``None``)."""
    gen = torch.Generator().manual_seed(100 + step)
    out: dict[str, Optional[Tensor]] = {}
    for n, p in initial().items():
        g = torch.randn(p.shape, generator=gen)
        out[n] = torch.where(g.abs() < 0.2, torch.zeros_like(g), g)
    if step == NO_GRAD[1]:
        out[NO_GRAD[0]] = None
    if nonfinite and step == BAD_STEP:
        out["a.weight"][-1, 0] = float("inf")
    return out


def param_groups(named: list[tuple[str, Tensor]]) -> list[dict[str, Any]]:
    """Two param groups with different ``lr`` and ``weight_decay``, parameters given by name."""
    g0 = [(n, p) for n, p in named if n in GROUP0]
    g1 = [(n, p) for n, p in named if n not in GROUP0]
    return [dict(params=g0, **HYPER[0]), dict(params=g1, **HYPER[1])]


def make_optimizer(named: list[tuple[str, Tensor]], option: str) -> LionSF:
    """``LionSF`` over ``named`` with the options named ``option``."""
    return LionSF(param_groups(named), lr=HYPER[0]["lr"], betas=BETAS, **OPTIONS[option])


def order(named: list[tuple[str, Tensor]]) -> list[str]:
    """Parameter names in ``param_groups`` order."""
    return [n for g in param_groups(named) for n, _ in g["params"]]


def single_process(option: str, nonfinite: bool = False, steps: int = STEPS) -> dict[str, dict[str, Tensor]]:
    """Full parameters and ``exp_avg`` after ``steps`` single-process steps, by name."""
    params = {n: nn.Parameter(t) for n, t in initial().items()}
    named = list(params.items())
    opt = make_optimizer(named, option)
    for step in range(steps):
        grads = full_grads(step, nonfinite)
        for n, p in named:
            p.grad = grads[n]
        opt.step()
    return {
        "params": {n: p.detach().clone() for n, p in named},
        "exp_avg": {n: opt.state[p]["exp_avg"].clone() for n, p in named},
    }


def reference(option: str, nonfinite: bool = False) -> dict[str, dict[str, Tensor]]:
    """The same run through ``tests/reference.py`` (written from docs/CONTRACT.md alone)."""
    opts = OPTIONS[option]
    names = order([(n, torch.empty(0)) for n in NAMES])
    values = initial()
    params = [values[n].clone() for n in names]
    groups = [0 if n in GROUP0 else 1 for n in names]
    hyper = [dict(h, betas=BETAS) for h in HYPER]
    ref = ReferenceLionSF(
        params, names, groups, hyper, agreement=opts["agreement"], pow=opts.get("pow", 1.0),
        decoupled=opts.get("decoupled_weight_decay", False), initial_lr=HYPER[0]["lr"],
        negative=opts.get("negative", "abs"), agreement_ema=opts.get("agreement_ema", False),
    )
    for step in range(STEPS):
        grads = full_grads(step, nonfinite)
        ref.step([grads[n] for n in names])
    return {"params": dict(zip(names, ref.params)), "exp_avg": dict(zip(names, ref.exp_avg))}
