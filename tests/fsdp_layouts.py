"""The sharded layouts the FSDP2 tests run: each turns :func:`tests.fsdp_cases.initial` into named parameters.

Runs inside a gloo rank (see ``tests/harness.py``). Layouts by world size:

* ``fsdp2``: ``fully_shard`` on a 1-D mesh of all ranks (every world size).
* ``mixed1d``: ``distribute_tensor`` with ``Shard(0)``, ``Shard(1)``, ``Replicate()`` and one plain tensor.
* ``hsdp`` (W=4): ``fully_shard`` on a ``(replicate=2, shard=2)`` mesh, ``(Replicate(), Shard(0))``.
* ``tp_fsdp`` (W=4): ``ColwiseParallel``/``RowwiseParallel`` on the ``tp`` dim (7 hidden units: uneven, so the
  column-parallel output stays a DTensor), then ``fully_shard`` on ``dp``.
* ``mixed2d`` (W=4): parameters on a 2-D mesh, a 1-D mesh and a sub-mesh of a 3-D mesh, with
  ``(Shard, Shard)``, ``(Shard(0), Shard(0))``, ``(Shard, Replicate)`` and ``(Replicate, Replicate)``.
  It runs before ``hsdp`` so that the sub-mesh's ``(Shard, Shard)`` parameter makes LionSF
  create its own group of ranks (0, 1) and (2, 3), which only those ranks join.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from tests.fsdp_cases import initial, tiny_model

Named = list[tuple[str, Tensor]]


class Meshes:
    """Every mesh a world size's layouts use, built once (mesh creation is collective)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.flat = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
        if world == 4:
            self.hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
            self.tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
            self.three = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("r", "u", "s"))


def layouts(world: int) -> tuple[str, ...]:
    """The layouts run at ``world`` ranks."""
    return ("fsdp2", "mixed1d", "mixed2d", "hsdp", "tp_fsdp") if world == 4 else ("fsdp2", "mixed1d")


def fsdp2_model(mesh: DeviceMesh, model: Optional[nn.Module] = None) -> nn.Module:
    """``fully_shard`` each layer of ``model`` (default :func:`tiny_model`), then the root."""
    model = tiny_model() if model is None else model
    for layer in (model.a, model.b, model.c):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def tp_fsdp_model(meshes: Meshes) -> nn.Module:
    """:func:`tiny_model` with ``a`` column- and ``b`` row-parallel over ``tp``, then ``fully_shard`` over ``dp``."""
    plan = {"a": ColwiseParallel(use_local_output=False), "b": RowwiseParallel()}
    model = parallelize_module(tiny_model(), meshes.tp["tp"], plan)
    return fsdp2_model(meshes.tp["dp"], model)


def _distributed(spec: dict[str, Optional[tuple[DeviceMesh, tuple]]]) -> Named:
    values = initial()
    out = []
    for name, t in values.items():
        where = spec[name]
        data = t.clone() if where is None else distribute_tensor(t, where[0], where[1], src_data_rank=None)
        out.append((name, nn.Parameter(data)))
    return out


def build(layout: str, meshes: Meshes) -> Named:
    """Named parameters of :func:`tests.fsdp_cases.initial` laid out as ``layout``."""
    builders: dict[str, Callable[[], Named]] = {
        "fsdp2": lambda: list(fsdp2_model(meshes.flat).named_parameters()),
        "hsdp": lambda: list(fsdp2_model(meshes.hsdp).named_parameters()),
        "tp_fsdp": lambda: list(tp_fsdp_model(meshes).named_parameters()),
        "mixed1d": lambda: _distributed({
            "a.weight": (meshes.flat, (Shard(1),)),
            "a.bias": (meshes.flat, (Shard(0),)),
            "b.weight": (meshes.flat, (Replicate(),)),
            "b.bias": (meshes.flat, (Shard(0),)),
            "c.weight": (meshes.flat, (Shard(1),)),
            "c.bias": None,
        }),
        "mixed2d": lambda: _distributed({
            "a.weight": (meshes.hsdp, (Shard(0), Shard(1))),
            "a.bias": (meshes.hsdp, (Shard(0), Shard(0))),
            "b.weight": (meshes.hsdp, (Shard(1), Replicate())),
            "b.bias": (meshes.flat, (Shard(0),)),
            "c.weight": (meshes.three["u", "s"], (Shard(0), Shard(1))),
            "c.bias": (meshes.hsdp, (Replicate(), Replicate())),
        }),
    }
    return builders[layout]()


def set_grads(named: Named, grads: dict[str, Optional[Tensor]]) -> None:
    """Give each parameter its slice of the full gradient (sliced locally on each rank)."""
    for name, p in named:
        g = grads[name]
        if g is None:
            p.grad = None
        elif isinstance(p, DTensor):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        else:
            p.grad = g.clone()


def full(t: Tensor) -> Tensor:
    """The whole logical tensor (collective for a DTensor)."""
    return t.full_tensor().detach().clone() if isinstance(t, DTensor) else t.detach().clone()


def describe(named: Named) -> dict[str, str]:
    """Each parameter's mesh shape and placements, for failure messages and layout checks."""
    return {
        n: f"{tuple(p.device_mesh.shape)} {tuple(p.placements)}" if isinstance(p, DTensor) else "plain"
        for n, p in named
    }
