"""One spawned run per world size does every FSDP2 / HSDP / TP case and returns all results.

Spawning gloo ranks costs seconds of imports each time, so :func:`all_cases` loops over
layouts, options and the special cases (control, collective count, non-finite gradient,
swapped parameters, end-to-end training) inside one job. The tests compare its results
with the single-process ones computed in the pytest process.
"""

from __future__ import annotations

from typing import Any, Callable
from unittest import mock

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial, distribute_tensor

import lion_sf_dist.optimizer as optimizer_module
from lion_sf_dist import LionSF
from tests.fsdp_accelerate import accelerate_case
from tests.fsdp_cases import (
    BAD_STEP,
    NAMES,
    OPTIONS,
    STACKED,
    STACKED_CHUNKED,
    STEPS,
    every_tensor_stacked,
    full_grads,
    make_optimizer,
    tiny_model,
)
from tests.fsdp_layouts import Meshes, build, describe, fsdp2_model, full, layouts, set_grads, tp_fsdp_model

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "barrier", "all_to_all_single", "reduce", "all_gather_object", "new_group")
TRAIN_STEPS = 5
TRAIN_BATCH = 12


def _local_counts_only(slotted: Tensor, groups: Any) -> Tensor:
    """What a shard-local optimizer does: sum its own counts, reduce nothing."""
    return slotted.sum(0)


def _laid_out_alike(m: Tensor, p: Tensor) -> bool:
    if isinstance(p, DTensor):
        return isinstance(m, DTensor) and m.device_mesh == p.device_mesh and m.placements == p.placements
    return not isinstance(m, DTensor) and m.shape == p.shape


def run_case(layout: str, option: str, meshes: Meshes, nonfinite: bool = False, control: bool = False) -> dict:
    """``STEPS`` steps with full gradients sliced onto ``layout``; full params and ``exp_avg`` after."""
    named = build(layout, meshes)
    opt = make_optimizer(named, option)
    skipped, before_bad = [], None
    patch = mock.patch.object(optimizer_module, "reduce_counts", _local_counts_only) if control else None
    if patch is not None:
        patch.start()
    try:
        for step in range(STEPS):
            set_grads(named, full_grads(step, nonfinite))
            if step == BAD_STEP:
                before_bad = {n: full(p) for n, p in named}
            opt.step()
            skipped.append(opt.last_skipped.clone())
    finally:
        if patch is not None:
            patch.stop()
    return {
        "params": {n: full(p) for n, p in named},
        "exp_avg": {n: full(opt.state[p]["exp_avg"]) for n, p in named},
        "exp_avg_like_param": {n: _laid_out_alike(opt.state[p]["exp_avg"], p) for n, p in named},
        "scale": opt.last_scale.clone(),
        "skipped": skipped,
        "before_bad": before_bad,
        "layout": describe(named),
    }


def count_collectives(layout: str, meshes: Meshes) -> list[tuple[str, tuple[int, ...], Any]]:
    """The collectives issued by the second ``step()`` (the first may create groups), in order."""
    named = build(layout, meshes)
    opt = make_optimizer(named, "global")
    set_grads(named, full_grads(0))
    opt.step()
    calls: list[tuple[str, tuple[int, ...], Any]] = []

    def spy(op: str, real: Callable) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            ranks = tuple(sorted(dist.get_process_group_ranks(group or dist.group.WORLD)))
            tensor = args[0] if args and isinstance(args[0], Tensor) else None
            calls.append((op, ranks, None if tensor is None else (tensor.dtype, tensor.numel())))
            return real(*args, **kwargs)
        return wrapped

    set_grads(named, full_grads(2))
    patches = [mock.patch.object(dist, op, spy(op, getattr(dist, op))) for op in COLLECTIVES if hasattr(dist, op)]
    for p in patches:
        p.start()
    try:
        opt.step()
    finally:
        for p in patches:
            p.stop()
    return calls


def train(model: torch.nn.Module, shard: int, shards: int) -> dict[str, Tensor]:
    """``TRAIN_STEPS`` with real backward passes, this rank on part ``shard`` of ``shards`` of each batch."""
    opt = make_optimizer(list(model.named_parameters()), "module")
    gen = torch.Generator().manual_seed(7)
    for _ in range(TRAIN_STEPS):
        x, y = torch.randn(TRAIN_BATCH, 5, generator=gen), torch.randn(TRAIN_BATCH, 1, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x.chunk(shards)[shard]), y.chunk(shards)[shard])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: full(p) for n, p in model.named_parameters()}


def partial_grad_error(meshes: Meshes) -> str:
    """The error of a step whose gradient holds unreduced (``Partial``) sums."""
    named = build("mixed1d", meshes)
    opt = make_optimizer(named, "tensor")
    set_grads(named, full_grads(0))
    p = dict(named)["b.weight"]  # Replicate(): its local gradient is whole, as a Partial one would be
    p.grad = DTensor.from_local(p.grad.to_local() / p.device_mesh.size(), p.device_mesh, [Partial()], run_check=False)
    try:
        opt.step()
    except ValueError as e:
        return str(e)
    return ""


def interleaved_shard_rounding(meshes: Meshes) -> dict[str, object]:
    """A placement whose local rows are not one block of the parameter (``_StridedShard`` alone
    interleaves them): stochastic rounding must refuse it; the plain step still runs, without
    probing where the rows lie (``probes``: the probes each step took)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    from lion_sf_dist.layouts import params as param_layout

    real_probe, probes = param_layout._is_block, []
    param_layout._is_block = lambda *args: probes.append(1) or real_probe(*args)

    full = torch.arange(24, dtype=torch.float32).view(8, 3) / 24
    p = nn.Parameter(distribute_tensor(full, meshes.flat, [_StridedShard(0, split_factor=2)], src_data_rank=None))
    out: dict[str, object] = {"rows": (p.to_local()[:, 0] * 8).round().int().tolist()}
    for rounding in (True, False):
        opt = LionSF([("w", p)], lr=1e-2, state_dtype=torch.bfloat16, stochastic_rounding=rounding)
        p.grad = distribute_tensor(torch.ones(8, 3), meshes.flat, p.placements, src_data_rank=None)
        probes.clear()
        try:
            opt.step()
            out[rounding] = ""
        except ValueError as e:
            out[rounding] = str(e)
        out["probes", rounding] = len(probes)
    param_layout._is_block = real_probe
    return out


def swapped(meshes: Meshes, option: str) -> dict:
    """Accelerate's FSDP2 ``prepare`` by hand: build on full parameters, step once, shard, swap, go on.

    The optimizer is built on the unsharded model and takes step 0 there; then the model is
    ``fully_shard``-ed and every parameter in ``param_groups`` replaced by its DTensor at the
    same position (state untouched), as ``accelerate`` does. ``state_dict()`` is taken right
    after the swap, before any further step.
    """
    model = tiny_model()
    opt = make_optimizer(list(model.named_parameters()), option)
    set_grads(list(model.named_parameters()), full_grads(0))
    opt.step()
    old = [p for g in opt.param_groups for p in g["params"]]
    fsdp2_model(meshes.flat, model)
    new = dict(model.named_parameters())
    for g in opt.param_groups:
        g["params"] = [new[n] for n in g["param_names"]]
    sd = opt.state_dict()
    sd_info = {
        "keys": sorted(sd["state"]),
        "exp_avg_types": sorted({type(s["exp_avg"]).__name__ for s in sd["state"].values()}),
        "old_in_state": any(p in opt.state for p in old),
    }
    named = list(new.items())
    for step in range(1, STEPS):
        set_grads(named, full_grads(step))
        opt.step()
    return {
        "params": {n: full(p) for n, p in named},
        "exp_avg": {n: full(opt.state[p]["exp_avg"]) for n, p in named},
        "state_dict": sd_info,
        "n_params": len(named),
    }


def fsdp1_refused(meshes: Meshes) -> dict[str, str]:
    """The errors LionSF raises on FSDP1 (``use_orig_params=True``) parameters: at construction,
    and at the first step when the optimizer was built before the model was wrapped."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    out = {}
    model = FullyShardedDataParallel(tiny_model(), use_orig_params=True, device_id=torch.device("cpu"))
    try:
        LionSF(model.parameters(), lr=1e-3)
        out["construct"] = ""
    except ValueError as e:
        out["construct"] = str(e)
    plain = tiny_model()
    opt = make_optimizer(list(plain.named_parameters()), "tensor")
    wrapped = FullyShardedDataParallel(plain, use_orig_params=True, device_id=torch.device("cpu"))
    wrapped(torch.randn(4, 5)).sum().backward()
    try:
        opt.step()
        out["step"] = ""
    except ValueError as e:
        out["step"] = str(e)
    return out


def _accelerate_or_why(rank: int, world: int) -> dict[str, Any]:
    """:func:`accelerate_case`, or why it could not run (so only its own test fails)."""
    try:
        import accelerate  # noqa: F401
    except ImportError as e:
        return {"error": f"HF Accelerate is needed for this test (pip install 'accelerate>=1.15,<1.16'): {e}"}
    return accelerate_case(rank, world, "module")


def all_cases(rank: int, world: int) -> dict[str, Any]:
    """Every FSDP2-family case at ``world`` ranks; results keyed by case."""
    torch.manual_seed(0)
    meshes = Meshes(world)
    out: dict[str, Any] = {}
    for layout in layouts(world):
        for option in OPTIONS:
            out[("equal", layout, option)] = run_case(layout, option, meshes)
    if world > 1:
        for option in ("tensor", "global"):
            out[("control", "fsdp2", option)] = run_case("fsdp2", option, meshes, control=True)
            out[("nonfinite", "fsdp2", option)] = run_case("fsdp2", option, meshes, nonfinite=True)
        out[("nonfinite", layouts(world)[-1], "module")] = run_case(layouts(world)[-1], "module", meshes,
                                                                     nonfinite=True)
        for layout in layouts(world):
            out[("collectives", layout)] = count_collectives(layout, meshes)
        for option in ("module", "ema"):
            out[("swapped", option)] = swapped(meshes, option)
        for path, option in (("compiled", STACKED), ("chunked", STACKED_CHUNKED)):
            with every_tensor_stacked(path) as stacked:
                out[(option, "fsdp2")] = run_case("fsdp2", option, meshes)
            out[(option, "fsdp2")]["stacks"] = stacked
    if world <= 2:
        out[("train",)] = train(fsdp2_model(meshes.flat), rank, world)
    if world == 4:
        out[("train", "tp_fsdp")] = train(tp_fsdp_model(meshes), meshes.tp["dp"].get_local_rank(), 2)
    if world == 2:
        out[("fsdp1",)] = fsdp1_refused(meshes)
        out[("partial",)] = partial_grad_error(meshes)
        out[("interleaved",)] = interleaved_shard_rounding(meshes)
        out[("accelerate", "module")] = _accelerate_or_why(rank, world)
    return out


__all__ = ["all_cases", "run_case", "count_collectives", "train", "swapped", "NAMES"]
