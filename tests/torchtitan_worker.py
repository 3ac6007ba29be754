"""torchtitan cases for ``tests/test_torchtitan.py``, run inside one spawned gloo group.

The model part is ``tests.integration_model.Tiny`` sharded with FSDP2 (``fully_shard`` per
layer and at the root, as torchtitan's ``parallelize_fn`` s do) on a 1-D mesh of all ranks;
the optimizer is built as torchtitan's trainer builds it, ``config.optimizer.build(model_parts=...)``.
Rank ``r`` takes the ``r``-th half of each global batch, so the shared single-process
reference applies (``tests/integration_model.py``).

Checkpointing goes through ``torch.distributed.checkpoint`` with the container as a
``Stateful``, as torchtitan's ``CheckpointManager`` saves it: after ``STEPS // 2`` steps,
save; a new model and container load it and train the remaining steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lion_sf_dist.integrations.torchtitan import lion_sf_optimizer
from tests.integration_model import DECAY, LR, PER_DEVICE, STEPS, Tiny, dataset, reference
from tests.integration_runs import State, full_state, shared_dir


def contiguous_samples(step: int, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of global batch ``step``: the ``rank``-th ``PER_DEVICE`` samples of it."""
    start = (step * world + rank) * PER_DEVICE
    return list(range(start, start + PER_DEVICE))


def _sharded_part() -> Tiny:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = Tiny()
    for layer in (model.inp, model.norm, model.out):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(model: Tiny, container: Any, steps: range) -> None:
    data = dataset(dist.get_world_size())
    for step in steps:
        part = [data[i] for i in contiguous_samples(step, dist.get_rank(), dist.get_world_size())]
        loss = model(torch.stack([d["x"] for d in part]), torch.stack([d["labels"] for d in part]))["loss"]
        container.zero_grad()
        loss.backward()
        container.step()


def _state(model: Tiny, container: Any) -> State:
    return full_state(list(model.named_parameters()), container.optimizers[0])


def run_cases(rank: int, world: int) -> dict[str, Any]:
    """Train ``STEPS`` steps; train again with a checkpoint round trip half way; (rank 0) the reference."""
    config = lion_sf_optimizer(lr=LR, weight_decay=DECAY)
    model = _sharded_part()
    container = config.build(model_parts=[model])
    opt = container.optimizers[0]
    _train(model, container, range(STEPS))
    result: dict[str, Any] = {
        "final": _state(model, container), "n_optimizers": len(container),
        "unit_names": opt.unit_names, "param_types": sorted({type(p).__name__ for p in model.parameters()}),
        "group_decay": {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]},
        "flat_keys": sorted(k for k in container.state_dict() if k.startswith("state.")),
    }
    with shared_dir("lion_sf_tt_") as where:
        model = _sharded_part()
        container = config.build(model_parts=[model])
        _train(model, container, range(STEPS // 2))
        dcp.save({"model": model.state_dict(), "optimizer": container}, checkpoint_id=where)
        model = _sharded_part()
        container = config.build(model_parts=[model])
        restored = model.state_dict()
        dcp.load({"model": restored, "optimizer": container}, checkpoint_id=where)
        model.load_state_dict(restored)
        _train(model, container, range(STEPS // 2, STEPS))
        result["resumed"] = _state(model, container)
    if rank == 0:
        result["reference"] = reference(world, contiguous_samples)
    return result
