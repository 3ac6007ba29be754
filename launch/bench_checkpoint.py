"""Checkpoint save and load times: an FSDP2 GPT-2-small-block model with LionSF, CPU gloo.

Each block holds GPT-2 small's block parameters (7.1M fp32); every block and the root are
``fully_shard``-ed over W gloo ranks. After one step (non-zero ``exp_avg``) the run times
``lion_sf_dist.checkpoint.save``, ``load`` (hot restart, in place) and ``save_async`` (the
time it blocks, and the rest until written), each from a barrier to the slowest rank's end,
and a load of the same checkpoint at world size 1 (one process, no process group). Prints
seconds, and MB/s of the checkpoint's size on disk.

The cost of checksums is measured side by side: save and load alternate with the same save
and load with checksums switched off (hashing replaced by nothing, verification skipped),
``--repeats`` times each, in alternating order (``--loads-per-save`` loads after each
save: a load takes a fraction of a save); the fastest of each is compared. Since the
difference of two noisy times is noisier still, the median of the paired ratios (each run
against the one beside it) is printed too, and the time a load waits for its files'
checksums (median over the runs; hashing starts early and overlaps the load's other work).
Each run starts after a full garbage collection, and each load after ``os.sync()``, so that
neither the collector nor the kernel's writeback of the save before it lands in the load.
``--cold`` evicts the checkpoint from the page cache before each load, as a restart on
another node finds it.

Side by side, save times follow the disk's writeback (their ratios swing by tens of
percent between runs), so the save's hashing is also timed inside each save: the seconds
its running checksums spend on the written bytes, against the save's time. And since a
load cannot verify its bytes for less than one pass over them, the time one core takes to
hash a rank's share of the page-cached checkpoint is printed: with no idle core (each rank
owns one), that pass is what checksums add to a load.

    python launch/bench_checkpoint.py [--worlds 1 2 4] [--blocks 12] [--repeats 3] [--loads-per-save 3] [--cold]
                                      [--dir /tmp/ckpt_bench]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import mmap
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import xxhash
from torch import nn

from lion_sf_dist import LionSF, checkpoint
from lion_sf_dist.checkpoint import checksum
from lion_sf_dist.checkpoint.verification import Verification


class Block(nn.Module):
    def __init__(self, d: int = 768) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


def model_of(blocks: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(blocks)])


def _stepped(model: nn.Module) -> LionSF:
    opt = LionSF(model.named_parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def _timed(fn, distributed: bool) -> float:
    """Seconds ``fn`` takes (the slowest rank's), after a full garbage collection.

    As ``timeit`` does, the collector's debt is paid before the clock starts: a full
    collection of this process's objects takes over 100 ms here, and would otherwise fall
    into whichever run crossed the threshold, with checksums or without.
    """
    gc.collect()
    if distributed:
        dist.barrier()
    t0 = time.perf_counter()
    fn()
    elapsed = torch.tensor(time.perf_counter() - t0)
    if distributed:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


class _NoHash:
    def update(self, data: checksum.Buffer, /) -> None:
        pass

    def hexdigest(self) -> str:
        return "0"


@contextlib.contextmanager
def _verifying_timed(spent: list[float]) -> Iterator[None]:
    """Adds the seconds this rank's load waits for its files' checksums to ``spent[-1]``."""
    check = Verification.check

    def timed(self: Verification, names: list[str]) -> None:
        t0 = time.perf_counter()
        try:
            check(self, names)
        finally:
            spent[-1] += time.perf_counter() - t0

    Verification.check = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        Verification.check = check  # type: ignore[method-assign]


class _TimedHash:
    """A save's running checksum that adds the seconds each update takes to ``spent[-1]``."""

    def __init__(self, inner: checksum.Hasher, spent: list[float]) -> None:
        self._inner, self._spent = inner, spent

    def update(self, data: checksum.Buffer, /) -> None:
        t0 = time.perf_counter()
        self._inner.update(data)
        self._spent[-1] += time.perf_counter() - t0

    def hexdigest(self) -> str:
        return self._inner.hexdigest()


@contextlib.contextmanager
def _hashing_timed(spent: list[float]) -> Iterator[None]:
    """Saves add the seconds their checksums take to ``spent[-1]``."""
    new = checksum.new
    checksum.new = lambda algorithm=checksum.ALGORITHM: _TimedHash(new(algorithm), spent)
    try:
        yield
    finally:
        checksum.new = new


def _one_core_hash_seconds(ckpt: Path) -> float:
    """Seconds one thread takes to hash the (page-cached) files of ``ckpt`` with XXH3-64, fastest of 3."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for f in ckpt.iterdir():
            if not f.stat().st_size:  # nothing to hash, and an empty file cannot be mapped
                continue
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                xxhash.xxh3_64_intdigest(mapped)
        best = min(best, time.perf_counter() - t0)
    return best


@contextlib.contextmanager
def _checksums_off() -> Iterator[None]:
    """Saves record a dummy checksum and loads verify nothing: the baseline the cost is measured against."""
    new, start, check = checksum.new, Verification.start, Verification.check
    checksum.new = lambda algorithm=checksum.ALGORITHM: _NoHash()
    Verification.start = Verification.check = lambda self, names: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        checksum.new, Verification.start, Verification.check = new, start, check  # type: ignore[method-assign]


def _evict(root: str) -> None:
    """Drop the newest checkpoint's files from the page cache, so the next load reads the disk."""
    for f in checkpoint.latest(root).iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _paired(with_: list[float], without: list[float]) -> float:
    """The median over repeats of each run's time against the run beside it: slow drift cancels."""
    return statistics.median(a / b - 1 for a, b in zip(with_, without))


def _rank(rank: int, world: int, blocks: int, repeats: int, loads: int, cold: bool, root: str, rendezvous: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world))  # as torchrun sets it: every rank on this host
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = model_of(blocks)
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _stepped(model)
    times: dict[tuple[str, bool], list[float]] = {(op, on): [] for op in ("save", "load") for on in (True, False)}
    verifying: list[float] = []
    hashing: list[float] = []  # each checksummed save's seconds spent hashing, then that share of the save
    for i in range(repeats):
        for on in (i % 2 == 0, i % 2 == 1):  # alternate which goes first: the disk remembers the last write
            with _verifying_timed(verifying) if on else _checksums_off(), _hashing_timed(hashing):
                hashing.append(0.0)
                times["save", on].append(_timed(lambda: checkpoint.save(root, model, opt, keep=1), True))
                hashing[-1] /= times["save", on][-1]
                if not on:
                    hashing.pop()
                os.sync()  # the save's writeback, left to the kernel, would otherwise run during the load
                for _ in range(loads):
                    verifying += [0.0] if on else []
                    if cold and rank == 0:
                        _evict(root)
                    times["load", on].append(_timed(lambda: checkpoint.load(root, model, opt), True))
    (save, plain_save), (load, plain_load) = ((min(times[op, True]), min(times[op, False])) for op in ("save", "load"))
    slowest = torch.tensor(verifying)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    verify = statistics.median(slowest.tolist())
    share = torch.tensor(hashing)
    dist.all_reduce(share, op=dist.ReduceOp.MAX)
    in_save = statistics.median(share.tolist())
    handle = []
    blocked = _timed(lambda: handle.append(checkpoint.save_async(root, model, opt)), True)
    background = _timed(lambda: handle[0].wait(), True)
    if rank == 0:
        size = sum(f.stat().st_size for f in checkpoint.latest(root).iterdir()) / 1e6
        print(f"W={world}: save {save:.2f} s ({size / save:.0f} MB/s), load {load:.2f} s ({size / load:.0f} MB/s), "
              f"{size:.0f} MB; save_async blocks {blocked:.2f} s, then writes {background:.2f} s more", flush=True)
        print(f"  checksums ({checksum.ALGORITHM}): save {save:.3f} s vs {plain_save:.3f} s without "
              f"({save / plain_save - 1:+.1%}), load {load:.3f} s vs {plain_load:.3f} s without "
              f"({load / plain_load - 1:+.1%}), both {save + load:.3f} s vs {plain_save + plain_load:.3f} s "
              f"({(save + load) / (plain_save + plain_load) - 1:+.1%}); fastest of {repeats}", flush=True)
        print(f"  paired medians: save {_paired(times['save', True], times['save', False]):+.1%}, "
              f"load {_paired(times['load', True], times['load', False]):+.1%}; the load waited "
              f"{verify:.3f} s for checksums (slowest rank, median run); the rest of the hashing overlapped "
              f"its other work", flush=True)
        print(f"  inside the saves, hashing took {in_save:.1%} of each (slowest rank, median run)", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--blocks", type=int, default=12, help="12: 85M parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loads-per-save", type=int, default=3, help="loads timed after each save (a load is short)")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each load")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench"))
    n = sum(p.numel() for p in model_of(args.blocks).parameters())
    print(f"{args.blocks} GPT-2 small block(s): {n / 1e6:.1f}M parameters, LionSF (params + exp_avg fp32)")
    for world in args.worlds:
        root = base / f"w{world}"
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_rank, args=(world, args.blocks, args.repeats, args.loads_per_save, args.cold, str(root),
                                            f"{tmp}/store"),
                               nprocs=world, start_method="spawn")
        model = model_of(args.blocks)
        opt = LionSF(model.named_parameters(), lr=1e-4)
        t = _timed(functools.partial(checkpoint.load, root, model, opt), False)
        print(f"  W={world} -> 1 process: load {t:.2f} s", flush=True)
        one_core = _one_core_hash_seconds(checkpoint.latest(root))
        print(f"  one core hashes the checkpoint in {one_core:.3f} s: a rank's share {one_core / world:.3f} s",
              flush=True)
    if args.dir is None:
        shutil.rmtree(base)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
