"""What the framework tests (HF Trainer, Lightning, torchtitan) share around their spawned runs.

``OneRun``: the one spawned group a test module runs all its cases in, started on first
use and kept (a failure too, so it is reported by every test rather than re-run).
Inside the ranks: ``shared_dir`` (a temporary directory every rank agrees on) and the full
parameters and ``exp_avg`` by name, whatever the sharding (``full_state``).
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from tests.fsdp_layouts import full
from tests.harness import run

State = dict[str, dict[str, torch.Tensor]]  # {"params": {name: tensor}, "exp_avg": {name: tensor}}


class OneRun:
    """Rank 0's result of ``fn(rank, world, *args)`` on ``world`` spawned gloo ranks, run once."""

    def __init__(self, fn: Callable, world: int, *args: Any, timeout: float = 480.0) -> None:
        self.fn, self.world, self.args, self.timeout = fn, world, args, timeout
        self.outcome: Optional[Any] = None

    def result(self) -> Any:
        if self.outcome is None:
            try:
                self.outcome = run(self.fn, self.world, *self.args, timeout=self.timeout)[0]
            except AssertionError as e:
                self.outcome = e
        if isinstance(self.outcome, AssertionError):
            raise self.outcome
        return self.outcome


def max_deviation(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over same-named tensors (the names must match)."""
    assert actual.keys() == expected.keys()
    return max((actual[n] - expected[n]).abs().max().item() for n in expected)


@contextmanager
def shared_dir(prefix: str) -> Iterator[str]:
    """A temporary directory made by rank 0, known to every rank, removed after all are done."""
    where = [tempfile.mkdtemp(prefix=prefix) if dist.get_rank() == 0 else ""]
    dist.broadcast_object_list(where, src=0)
    try:
        yield where[0]
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(where[0], ignore_errors=True)


def full_state(named: list[tuple[str, torch.Tensor]], opt: Optional[torch.optim.Optimizer]) -> State:
    """Full parameters and ``exp_avg``: gathered from DTensors, or (``opt=None``) from DeepSpeed's ZeRO partitions."""
    if opt is None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        return {"params": {n: safe_get_full_fp32_param(p).clone() for n, p in named},
                "exp_avg": {n: safe_get_full_optimizer_state(p, "exp_avg").clone() for n, p in named}}
    return {"params": {n: full(p) for n, p in named}, "exp_avg": {n: full(opt.state[p]["exp_avg"]) for n, p in named}}
