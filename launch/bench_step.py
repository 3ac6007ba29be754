"""Optimizer step time and memory, LionSF against its peers, measured side by side in one run.

Parameters are shaped like GPT-2 small's transformer blocks (12 x 7.1M = 85M fp32 by
default). Every optimizer gets its own copy of the same parameters and gradients; the
rounds interleave the optimizers, in alternating order, so that machine noise hits them
alike. Prints the median step time of each, its ratio to ``AdamW(fused=True)`` and to the
seed's per-tensor loop (each ratio the median over rounds of the ratio within a round),
the peak memory a step allocates beyond what it holds, and the optimizer state per parameter.

``--count-ops`` instead counts the ops one steady-state step dispatches (each at least one
kernel launch on a GPU), on ``meta`` tensors shaped like GPT-2 small and Llama-7B, for
LionSF's chunked and multi-tensor paths and for AdamW.

    python launch/bench_step.py [--blocks 12] [--rounds 11] [--threads 2] [--device cuda] [--count-ops]
                                [--keep-freed-memory]

``--keep-freed-memory`` pins glibc's malloc to keep freed memory, so that the optimizers
with large per-step temporaries (AdamW foreach, lion-pytorch's foreach Lion, LionSF's
multi-tensor path on CPU) run in their fast mode rather than whichever one the process drew.

On a GPU (``--device cuda``) each timed step ends with a device synchronisation and the
memory column is the step's peak device allocation beyond what the optimizer holds.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import time
from typing import Callable

import torch
from lion_pytorch.foreach import Lion as ForeachLion

from lion_sf_dist import LionSF
from lion_sf_dist.opcount import count_ops, gpt2_small_shapes, llama7b_shapes


def gpt2_block_shapes(blocks: int, d: int = 768) -> list[tuple[int, ...]]:
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return block * blocks


class SeedLoop(torch.optim.Optimizer):
    """The original LionSF's step as it runs: a Python loop over tensors, one host sync each."""

    def __init__(self, params, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m, g = state["exp_avg"], p.grad
                p.mul_(1 - lr * wd)
                u = m.clone().mul_(b1).add(g, alpha=1 - b1).sign_()
                scale = (((u * g) > 0).mean(dtype=torch.float32) * 2 - 1).abs()
                p.add_(u, alpha=-lr * scale.item())
                m.mul_(b2).add_(g, alpha=1 - b2)


def keep_freed_memory() -> None:
    """Make glibc's malloc serve blocks up to 32 MiB from its heap and never give freed memory back.

    The foreach optimizers allocate hundreds of MiB of temporaries a step; whether glibc maps
    them afresh each time (page faults: AdamW foreach then takes ~1.4x as long) depends on
    thresholds it adapts at run time, so one process gets the fast mode and the next the
    slow one. This pins the fast mode (``mallopt``: M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD).
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    for option, value in ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 40), (m_top_pad, 1 << 30)):
        if libc.mallopt(option, ctypes.c_int(min(value, 2**31 - 1))) != 1:
            raise SystemExit(f"--keep-freed-memory: mallopt({option}) failed (glibc only)")


def peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def state_bytes_per_param(opt: torch.optim.Optimizer, n: int) -> float:
    """Bytes of tensor state the optimizer keeps per parameter element."""
    total = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total / n


def steady_state_ops(make: Callable, shapes: list[tuple[int, ...]], device: torch.device) -> int:
    """Ops of the third step of ``make(params)`` (the first two build state and caches)."""
    ps = [torch.empty(s, device=device, requires_grad=True) for s in shapes]
    for p in ps:
        p.grad = torch.empty(p.shape, device=device)
    opt = make(ps)
    opt.step()
    opt.step()
    return count_ops(opt.step, device).total


def count_table() -> None:
    """Print the ops one steady-state step dispatches, per optimizer and model shape."""
    meta = torch.device("meta")
    models = {"GPT-2 small": gpt2_small_shapes(), "Llama-7B": llama7b_shapes()}
    makers: dict[str, Callable] = {
        "LionSF chunked (CPU default)": lambda ps: LionSF(ps, lr=1e-4, weight_decay=0.1, foreach=False),
        "LionSF multi-tensor": lambda ps: LionSF(ps, lr=1e-4, weight_decay=0.1, foreach=True),
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    }
    heads = [
        f"{name} ({len(s)} tensors, {sum(torch.Size(x).numel() for x in s) / 1e6:.0f}M)" for name, s in models.items()
    ]
    print("| ops per steady-state step | " + " | ".join(heads) + " |")
    print("|---|" + "---:|" * len(models))
    notes = []
    for label, make in makers.items():
        cells = []
        for shapes in models.values():
            try:
                cells.append(f"{steady_state_ops(make, shapes, meta):,}")
            except RuntimeError as err:  # fused AdamW has no meta kernel: count on one-element CPU tensors
                if "fused" not in str(err):
                    raise
                cells.append(f"{steady_state_ops(make, [(1,)] * len(shapes), torch.device('cpu')):,} *")
                note = ("* counted on CPU with one-element tensors (fused AdamW does not run on meta); "
                "its count does not depend on sizes")
                if note not in notes:
                    notes.append(note)
        print(f"| {label} | " + " | ".join(cells) + " |")
    for note in notes:
        print(f"\n{note}")


def timed_step(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """One step, finished on the device before returning (so the host clock measures it)."""
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_peak_mib(opt: torch.optim.Optimizer, device: torch.device) -> float:
    """Memory one step allocates beyond what is held before it (host RSS on CPU, allocator peak on CUDA)."""
    if device.type == "cuda":
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        timed_step(opt, device)
        return (torch.cuda.max_memory_allocated(device) - held) / 2**20
    before = rss_kib()
    reset_peak()
    opt.step()
    return (peak_rss_kib() - before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-compiled", action="store_true", help="leave out the torch.compile path")
    ap.add_argument("--count-ops", action="store_true", help="count dispatched ops per step on meta tensors instead")
    ap.add_argument("--device", default="cpu", help="where parameters, gradients and state live (cpu, cuda)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc keeps freed memory mapped: optimizers that allocate large temporaries each step "
                         "reuse them without page faults (their fast mode; by default a process gets one or the other)")
    args = ap.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.count_ops:
        count_table()
        return
    shapes = gpt2_block_shapes(args.blocks)
    gen = torch.Generator().manual_seed(0)
    params0 = [(torch.randn(s, generator=gen) * 0.02).to(device) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in shapes]
    n = sum(p.numel() for p in params0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{n / 1e6:.1f}M fp32 parameters in {len(shapes)} tensors on {device} ({where}), torch {torch.__version__}")

    makers: dict[str, Callable] = {
        "LionSF eager": lambda ps: LionSF(ps, lr=1e-4, weight_decay=0.1),
        "LionSF multi-tensor (foreach)": lambda ps: LionSF(ps, lr=1e-4, weight_decay=0.1, foreach=True),
        "LionSF compiled (use_triton=True)": lambda ps: LionSF(ps, lr=1e-4, weight_decay=0.1, use_triton=True),
        "seed LionSF loop": lambda ps: SeedLoop(ps, lr=1e-4, weight_decay=0.1),
        "Lion _foreach (lion-pytorch)": lambda ps: ForeachLion(ps, lr=1e-4, weight_decay=0.1),
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    }
    if args.skip_compiled:
        del makers["LionSF compiled (use_triton=True)"]
    opts, times, extra = {}, {k: [] for k in makers}, {}
    for name, make in makers.items():
        ps = [p.clone().requires_grad_() for p in params0]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt = make(ps)
        t0 = time.perf_counter()
        timed_step(opt, device)  # state creation, compilation (cold unless TORCHINDUCTOR_CACHE_DIR holds one)
        warm = time.perf_counter() - t0
        extra[name] = step_peak_mib(opt, device)
        opts[name] = opt
        print(f"  {name}: first step {warm:.2f} s")
    order = list(opts)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            timed_step(opts[name], device)
            times[name].append(time.perf_counter() - t0)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print("\n| optimizer | median step (ms) | x AdamW fused | x AdamW foreach | seed loop / this "
          "| peak extra memory in step (MiB) | state bytes / parameter |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in makers:
        print(f"| {name} | {statistics.median(times[name]) * 1e3:.1f} | {ratio(name, 'AdamW fused'):.2f} "
              f"| {ratio(name, 'AdamW foreach'):.2f} | {ratio('seed LionSF loop', name):.1f} "
              f"| {extra[name]:.0f} | {state_bytes_per_param(opts[name], n):.0f} |")
    if args.keep_freed_memory:
        print("\n(--keep-freed-memory: memory freed in an earlier step stays resident, so the peak-memory "
              "column shows only what a step allocates beyond it)")


if __name__ == "__main__":
    main()
