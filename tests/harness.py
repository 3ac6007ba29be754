"""Run a function on W real gloo processes on localhost and collect what each rank returns.

``run(fn, world_size, *args)`` spawns ``world_size`` processes, initialises a gloo process
group in each, calls ``fn(rank, world_size, *args)`` and returns the ranks' results in
rank order. ``fn`` must be importable (a module-level function). A rank that saved its
result and then died in gloo's teardown counts as a success; one that raised has its
traceback shown.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(fn: Callable, rank: int, world_size: int, tmp: str, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    out = Path(tmp)
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save(result, out / f"result{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def run(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """Results of ``fn(rank, world_size, *args)`` on each of ``world_size`` gloo ranks."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, tmp, args)) for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = sorted(Path(tmp).glob("error*.txt"))
        if errors:
            raise AssertionError("\n".join(f"{e.stem}:\n{e.read_text()}" for e in errors))
        if hung:
            raise AssertionError(f"ranks {hung} still running after {timeout}s (a collective some rank skipped?)")
        missing = [r for r in range(world_size) if not (Path(tmp) / f"result{r}.pt").exists()]
        if missing:
            codes = [procs[r].exitcode for r in missing]
            raise AssertionError(f"ranks {missing} exited with codes {codes} before returning a result")
        return [torch.load(Path(tmp) / f"result{r}.pt", weights_only=False) for r in range(world_size)]
