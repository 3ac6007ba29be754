"""What the count reduction costs: LionSF step time with and without it, FSDP2-sharded, CPU gloo.

Parameters are shaped like GPT-2 small's transformer blocks (12 x 7.1M = 85M fp32 by
default) and sharded ``Shard(0)`` over a 1-D mesh of W gloo ranks, as ``fully_shard``
lays them out. Each round times one ``step()`` with the reduction (the library) and one
without it (``reduce_counts`` replaced by a local sum: what a shard-local optimizer does,
wrong under sharding but the cost floor), in alternating order. Every timed step starts
after a barrier and ends when the slowest rank is done (max over ranks, taken outside
the timing). Prints, for each W, the median step times, their ratio, the median time spent
inside the reduction itself and its share of the step, and the bytes the reduction moves
per step (one int64 ``[U, 3]`` vector per process group).

    python launch/bench_comm.py [--worlds 1 2 4] [--blocks 12] [--rounds 5] [--agreement tensor]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, zeros

import lion_sf_dist.optimizer as optimizer_module
from lion_sf_dist import LionSF


def gpt2_block_shapes(blocks: int, d: int = 768) -> list[tuple[int, ...]]:
    """Parameter shapes of ``blocks`` GPT-2 small transformer blocks (7.1M elements each)."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return block * blocks


def _local_sum(slotted: Tensor, groups: Any) -> Tensor:
    return slotted.sum(0)


def _timed(step: Callable[[], None], inside: list[float]) -> tuple[float, float]:
    """``(step, reduction)`` seconds: the step until the slowest rank is done, and the time
    the fastest-to-finish rank spent inside ``reduce_counts`` (the collective itself, not
    the wait for ranks that are still counting)."""
    dist.barrier()
    inside.clear()
    t0 = time.perf_counter()
    step()
    elapsed = time.perf_counter() - t0
    step_max = torch.tensor([elapsed], dtype=torch.float64)
    reduce_min = torch.tensor([sum(inside)], dtype=torch.float64)
    dist.all_reduce(step_max, op=dist.ReduceOp.MAX)
    dist.all_reduce(reduce_min, op=dist.ReduceOp.MIN)
    return float(step_max), float(reduce_min)


def _timing(real: Callable[..., Tensor], inside: list[float]) -> Callable[..., Tensor]:
    def timed(*args: Any) -> Tensor:
        t0 = time.perf_counter()
        out = real(*args)
        inside.append(time.perf_counter() - t0)
        return out
    return timed


def _bytes_reduced(opt: LionSF) -> int:
    moved = []
    real = dist.all_reduce

    def spy(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        moved.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    with mock.patch.object(dist, "all_reduce", spy):
        opt.step()
    return sum(moved)


def _rank(rank: int, world: int, args: argparse.Namespace, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    torch.set_num_threads(args.threads)
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(rank)
    params = []
    with torch.no_grad():
        for shape in gpt2_block_shapes(args.blocks):
            p = nn.Parameter(zeros(shape, device_mesh=mesh, placements=[Shard(0)]))
            p.to_local().normal_(generator=gen)
            p.grad = zeros(shape, device_mesh=mesh, placements=[Shard(0)])
            p.grad.to_local().normal_(generator=gen)
            params.append(p)
    opt = LionSF(params, lr=1e-4, weight_decay=0.1, agreement=args.agreement)
    inside: list[float] = []
    patches = {
        "with": mock.patch.object(optimizer_module, "reduce_counts", _timing(optimizer_module.reduce_counts, inside)),
        "without": mock.patch.object(optimizer_module, "reduce_counts", _local_sum),
    }
    times: dict[str, list[float]] = {"with": [], "without": [], "reduce": []}
    for r in range(args.rounds + 1):  # round 0 warms up: plans, groups, allocator
        for mode in (("with", "without") if r % 2 == 0 else ("without", "with")):
            with patches[mode]:
                step, reduce = _timed(opt.step, inside)
            if r > 0:
                times[mode].append(step)
                if mode == "with":
                    times["reduce"].append(reduce)
    moved = _bytes_reduced(opt)
    if rank == 0:
        numel = sum(p.numel() for p in params)
        out = {"world": world, "numel": numel, "bytes": moved, "units": opt.units.count,
               **{k: statistics.median(v) for k, v in times.items()}}
        Path(tmp, "result.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict[str, Any]:
    """Median step times with and without the reduction at ``world`` gloo ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, args, tmp), nprocs=world, join=True)
        return json.loads(Path(tmp, "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--blocks", type=int, default=12, help="GPT-2 blocks (7.1M parameters each)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--agreement", default="tensor", choices=["tensor", "module", "group", "global"])
    args = parser.parse_args()
    rows = [measure(w, args) for w in args.worlds]
    print(f"{rows[0]['numel'] / 1e6:.1f}M parameters, Shard(0) over W gloo ranks, agreement={args.agreement}, "
          f"{args.threads} thread(s) per rank, median of {args.rounds} rounds")
    print(f"{'W':>3} {'with (ms)':>10} {'without (ms)':>13} {'ratio':>7} {'reduce (ms)':>12} {'share':>7} "
          f"{'bytes/step':>11} {'units':>6}")
    for r in rows:
        print(f"{r['world']:>3} {r['with'] * 1e3:>10.1f} {r['without'] * 1e3:>13.1f} {r['with'] / r['without']:>7.3f} "
              f"{r['reduce'] * 1e3:>12.2f} {r['reduce'] / r['with'] * 100:>6.2f}% {r['bytes']:>11} {r['units']:>6}")
    print("ratio: with / without (W=1 has no collective: its distance from 1 is this machine's noise); "
          "reduce: time inside reduce_counts, min over ranks; share: reduce / step with")


if __name__ == "__main__":
    main()
