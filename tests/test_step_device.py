"""A GPU-shaped step, checked on CPU: dispatched ops, host traffic, hyper-parameter changes, count reduction device.

* On ``meta`` tensors (a non-CPU device, so ``foreach=None`` picks the multi-tensor path)
  a steady-state step of GPT-2 small and Llama-7B shapes dispatches at most 120 ops, and
  no op of the third step takes a host tensor of one or more dims (a host-to-device copy).
* An ``lr_scheduler`` changing ``lr`` every step still steers every update.
* Counts held on a device the process group's backend has none for (CPU offload under
  NCCL, here a ``"cuda:gloo"`` group) go to CUDA, or fail with an error naming the cause.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from lion_sf_dist import LionSF
from lion_sf_dist.opcount import count_ops, gpt2_small_shapes, llama7b_shapes
from lion_sf_dist.reduce import backend_device_types, reduction_device

META = torch.device("meta")


def _meta_params(shapes):
    ps = [torch.empty(s, device=META, requires_grad=True) for s in shapes]
    for p in ps:
        p.grad = torch.empty(p.shape, device=META)
    return ps


@pytest.mark.parametrize("shapes", [gpt2_small_shapes(), llama7b_shapes()], ids=["gpt2-small", "llama-7b"])
def test_steady_state_step_dispatches_few_ops_and_no_host_tensor(shapes):
    opt = LionSF(_meta_params(shapes), lr=1e-4, weight_decay=0.1)
    opt.step()
    opt.step()
    third = count_ops(opt.step, META)
    assert third.total <= 120, third.ops.most_common(10)
    assert third.host_inputs == []


def test_host_tensor_check_can_fail():
    """A step that builds a table on the host (as the chunked path's callers once did) is seen."""
    opt = LionSF(_meta_params([(4, 4)]), lr=1e-4)
    opt.step()
    seen = count_ops(lambda: torch.tensor([1.0, 2.0]).to(META), META)
    assert seen.host_inputs


@pytest.mark.parametrize("foreach", [False, True])
def test_lr_scheduler_steers_every_step(foreach):
    """With pow=0 and no decay a step moves each element by exactly lr: it must follow the scheduler's lr."""
    p = torch.zeros(64, requires_grad=True)
    opt = LionSF([p], lr=2.0**-4, pow=0.0, foreach=foreach)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)
    for k in range(5):
        before = p.detach().clone()
        p.grad = torch.ones(64)
        opt.step()
        sched.step()
        assert torch.equal(before - p.detach(), torch.full((64,), 2.0**-4 * 0.5**k)), f"step {k}"


@pytest.fixture
def group():
    """A one-rank process group whose backend has a CUDA device only."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = "29561"
    dist.init_process_group("cuda:gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_counts_on_a_device_the_backend_lacks(group, monkeypatch):
    assert backend_device_types(group) == {"cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend \\(cuda:gloo\\) has no cpu device"):
            reduction_device(group, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert reduction_device(group, torch.device("cpu")) == torch.device("cuda", 0)
    assert reduction_device(group, torch.device("cuda", 0)) == torch.device("cuda", 0)
