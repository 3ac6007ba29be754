"""Counting the ops an optimizer step dispatches, on ``meta`` tensors (no memory, no arithmetic).

Each dispatched ATen op costs at least one kernel launch on a GPU (a few microseconds of
host time each), so the count is what decides whether a step is launch-bound. Counting
on ``meta`` tensors takes seconds even for 7B-parameter shapes. Used by the tests and by
``launch/bench_step.py --count-ops``.

A ``_foreach`` op counts once here; on CUDA it runs as one fused multi-tensor launch
(per ~100 tensors) when its lists share dtype and shapes, else as one launch per tensor.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lion_sf_dist._torch_private import dispatch_mode


class OpCounter(dispatch_mode()):  # type: ignore[misc]
    """A dispatch mode counting ops by name; also records ops that take a host tensor of one or more dims
    while the step runs on another device (a host-to-device copy each time)."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.device = device
        self.host_inputs: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        self.ops[str(func.overloadpacket.__name__)] += 1
        if self.device is not None and self.device.type != "cpu":
            flat = [*args, *kwargs.values()]
            flat += [t for x in flat if isinstance(x, (list, tuple)) for t in x]
            if any(isinstance(t, Tensor) and t.device.type == "cpu" and t.dim() >= 1 for t in flat):
                self.host_inputs.append(str(func))
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(fn: Callable[[], Any], device: Optional[torch.device] = None) -> OpCounter:
    """Run ``fn()`` under an :class:`OpCounter` and return it."""
    with OpCounter(device) as counter:
        fn()
    return counter


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small's parameters (HF ``GPT2LMHeadModel``, tied head): 148 tensors, 124.4M elements."""
    d, block = 768, []
    block += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(50257, d), (1024, d), *block * 12, (d,), (d,)]


def llama7b_shapes() -> list[tuple[int, ...]]:
    """Llama-2-7B's parameters: 291 tensors, 6.74B elements."""
    d, ff, vocab = 4096, 11008, 32000
    layer = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff), (d,), (d,)]
    return [(vocab, d), *layer * 32, (d,), (vocab, d)]
