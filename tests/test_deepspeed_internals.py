"""The DeepSpeed internals lion_sf_dist relies on fail loudly when missing; argument checks of initialize."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer  # noqa: E402

from lion_sf_dist import LionSF  # noqa: E402
from lion_sf_dist import deepspeed as lds  # noqa: E402
from lion_sf_dist.layouts import zero_internals as zi  # noqa: E402


@pytest.mark.parametrize("cls,names", [(DeepSpeedZeroOptimizer, zi.STAGE12_ATTRS),
                                       (DeepSpeedZeroOptimizer_Stage3, zi.STAGE3_ATTRS)])
def test_missing_attribute_fails_loudly(cls: type, names: tuple) -> None:
    bare = object.__new__(cls)  # an optimizer lacking every attribute the recipes read
    with pytest.raises(RuntimeError, match="zero_internals.py") as info:
        zi.check_attributes(bare)
    assert all(n in str(info.value) for n in names if not hasattr(cls, n))


def test_flattened_markers() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    assert not zi.flattened_by_deepspeed(p)
    p.ds_id = 0
    assert zi.flattened_by_deepspeed(p)


def test_unattached_lionsf_raises_with_both_fixes() -> None:
    """Without an engine: a parameter DeepSpeed marked makes an unattached step refuse."""
    model = torch.nn.Linear(3, 2)
    opt = LionSF(model.parameters(), lr=0.1)
    model.weight._hp_mapping = object()
    opt.param_groups[0]["params"] = [torch.zeros(8, requires_grad=True)]  # a flat partition
    opt.param_groups[0]["params"][0].grad = torch.ones(8)
    with pytest.raises(RuntimeError) as info:
        opt.step()
    assert "lion_sf_dist.deepspeed.initialize" in str(info.value)
    assert "lion_sf_dist.deepspeed.attach(engine)" in str(info.value)


def test_initialize_rejects_two_optimizers() -> None:
    model = torch.nn.Linear(3, 2)
    cfg = {"optimizer": {"type": "LionSF", "params": {"lr": 0.1}}, "train_batch_size": 1}
    with pytest.raises(ValueError, match="optimizer"):
        lds.initialize(model=model, optimizer=LionSF(model.parameters()), config=cfg)


def test_initialize_needs_a_config() -> None:
    with pytest.raises(ValueError, match="config"):
        lds.initialize(model=torch.nn.Linear(3, 2))
