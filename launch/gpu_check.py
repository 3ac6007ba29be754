"""The checks a GPU machine must pass, in one short run: paths against the CPU reference, a non-blocking step.

    python launch/gpu_check.py [--device cuda]

1. Each path (chunked eager, multi-tensor, compiled) steps a small model of awkward shapes
   on ``--device`` and is compared with the chunked path on the CPU (the one the
   reference tests pin): ``exp_avg`` within a few ulp of the gradient (devices may fuse
   the multiply-adds differently), parameters equal except where a rounding flips a sign.
   bf16 parameters with bf16 state and stochastic rounding take the same comparison.
2. A timed step: GPU work is queued first, then ``step()`` is called; a step that does
   not synchronise returns long before the queued work ends (CUDA only).

Exits non-zero when a check fails. On a CPU device it runs the same comparisons (CPU
against CPU), which is how the test suite keeps this script working without a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lion_sf_dist import LionSF

SHAPES = [(37, 19), (19,), (0,), (5, 3, 7), (1,), (300, 129)]
PATHS = {"chunked eager": dict(foreach=False), "multi-tensor": dict(foreach=True), "compiled": dict(use_triton=True)}
PRECISIONS = {"fp32": dict(), "bf16 + stochastic rounding": dict(stochastic_rounding=True)}
STEPS = 4


def run(device: torch.device, dtype: torch.dtype, **options: object) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters and ``exp_avg`` (on the CPU, as float32) after ``STEPS`` steps on ``device``."""
    gen = torch.Generator().manual_seed(0)
    ps = [(torch.randn(s, generator=gen) * 0.02).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES]
    opt = LionSF(ps, lr=1e-2, weight_decay=0.1, agreement="global", **options)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(device=device, dtype=dtype)
        opt.step()
    return ([p.detach().float().cpu() for p in ps], [opt.state[p]["exp_avg"].float().cpu() for p in ps])


def compare(device: torch.device) -> list[tuple[str, str, bool, str]]:
    """``(path, precision, passed, detail)`` for every path and precision."""
    rows = []
    for precision, extra in PRECISIONS.items():
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        ref_p, ref_m = run(torch.device("cpu"), dtype, foreach=False, **extra)
        for path, options in PATHS.items():
            p, m = run(device, dtype, **options, **extra)
            m_dev = max(((a - b).abs().max().item() if a.numel() else 0.0) for a, b in zip(m, ref_m))
            flips = sum(int((a != b).sum()) for a, b in zip(p, ref_p))
            total = sum(a.numel() for a in p)
            m_tol = 1e-6 if precision == "fp32" else 1e-2  # bf16 state: one bf16 ulp of |exp_avg| <= 1
            passed = m_dev <= m_tol and flips <= max(1, total // 1000)
            detail = f"exp_avg max abs diff {m_dev:.2e}, params differing {flips}/{total}"
            rows.append((path, precision, passed, detail))
    return rows


def host_not_blocked(device: torch.device) -> tuple[bool, str]:
    """Queue about half a second of GPU work, then time ``step()`` on the host."""
    if device.type != "cuda":
        return True, "n/a (not a CUDA device)"
    ps = [torch.randn(s, device=device, requires_grad=True) for s in [(4096, 4096)] * 8]
    opt = LionSF(ps, lr=1e-4)
    for p in ps:
        p.grad = torch.randn_like(p)
    for _ in range(3):
        opt.step()  # warm: tables built, state created
    torch.cuda.synchronize()
    x = torch.randn(8192, 8192, device=device)
    t0 = time.perf_counter()
    for _ in range(200):
        x = torch.tanh(x @ x * 1e-4)
    queued = time.perf_counter() - t0
    t1 = time.perf_counter()
    opt.step()
    host = time.perf_counter() - t1
    torch.cuda.synchronize()
    busy = time.perf_counter() - t0
    detail = f"step() returned after {host * 1e3:.2f} ms while {busy * 1e3:.0f} ms of work ran"
    return host < 0.5 * (busy - queued), detail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(ap.parse_args().device)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    rows = compare(device)
    print("\n| path | precision | passed | detail |\n|---|---|---|---|")
    for path, precision, passed, detail in rows:
        print(f"| {path} | {precision} | {'yes' if passed else 'NO'} | {detail} |")
    ok, detail = host_not_blocked(device)
    print(f"\nnon-blocking step: {'yes' if ok else 'NO'}: {detail}")
    return 0 if ok and all(r[2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
