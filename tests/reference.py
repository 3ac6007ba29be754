"""A slow LionSF written from docs/CONTRACT.md alone: the oracle the library is checked against.

Deliberately shares no code with ``lion_sf_dist``: counts are a Python loop over elements,
units come from names by string rules, scales are computed in float64 and rounded once.
The two torch expressions docs/CONTRACT.md section 2 pins for rounding (``c`` and ``m``) are
written as the contract writes them, so ``exp_avg`` must match bitwise.

Precision rules: whatever the dtype of ``p``, ``g`` and ``exp_avg``, every expression is
evaluated on float32 copies and each result is rounded once when stored (to nearest
here; :func:`bf16_neighbours` gives the two values a stochastic rounding may store, and
``last_fp32`` keeps the unrounded float32 results of the last step for that check).
"""

from __future__ import annotations

import math
import struct

import torch


def units_of(names: list[str], groups: list[int], agreement: str) -> list[str]:
    """The unit key of each parameter (docs/CONTRACT.md section 3)."""
    if agreement == "tensor":
        return [f"t{i}" for i in range(len(names))]
    if agreement == "module":
        return ["m:" + (n.rsplit(".", 1)[0] if "." in n else "") for n in names]
    if agreement == "group":
        return [f"g{g}" for g in groups]
    return ["all"] * len(names)


class ReferenceLionSF:
    """Full (unsharded) tensors in, docs/CONTRACT.md section 2 out; state kept here."""

    def __init__(self, params, names, groups, hyper, agreement="tensor", pow=1.0, decoupled=False,
                 initial_lr=None, negative="abs", agreement_ema=False, state_dtype=None):
        self.params = params
        self.hyper = hyper  # per group: dict(lr, betas, weight_decay)
        self.groups = groups  # group index of each parameter
        self.keys = units_of(names, groups, agreement)
        self.pow, self.decoupled, self.negative, self.ema_on = pow, decoupled, negative, agreement_ema
        self.initial_lr = initial_lr if initial_lr is not None else hyper[0]["lr"]
        self.exp_avg = [torch.zeros_like(p, dtype=state_dtype or p.dtype) for p in params]
        self.ema = {}
        self.last_fp32: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def step(self, grads):
        A, N, bad, u_of = {}, {}, {}, {}
        for i, (g, m) in enumerate(zip(grads, self.exp_avg)):
            if g is None:
                continue
            b1, _ = self.hyper[self.groups[i]]["betas"]
            c = m.float().mul(b1).add(g.float(), alpha=1 - b1)
            u = torch.sign(c)
            u_of[i] = u
            k = self.keys[i]
            agree = sum(1 for ui, gi in zip(u.flatten().tolist(), g.flatten().tolist()) if ui * gi > 0)
            A[k] = A.get(k, 0) + agree
            N[k] = N.get(k, 0) + g.numel()
            bad[k] = bad.get(k, False) or not all(math.isfinite(x) for x in g.flatten().tolist())
        self.last_fp32 = {}
        scale = {}
        for k in N:
            if N[k] == 0 or bad[k]:
                continue
            a = 2 * A[k] / N[k] - 1
            if self.ema_on:
                b1, b2 = self.hyper[self.groups[self.keys.index(k)]]["betas"]
                sa = self.ema.get(k, 0.0)
                signal = b1 * sa + (1 - b1) * a
                self.ema[k] = b2 * sa + (1 - b2) * a
            else:
                signal = a
            base = abs(signal) if self.negative == "abs" else max(signal, 0.0)
            scale[k] = base ** self.pow
        for i, u in u_of.items():
            k = self.keys[i]
            if k not in scale:
                continue
            h = self.hyper[self.groups[i]]
            lr, (b1, b2), wd = h["lr"], h["betas"], h["weight_decay"]
            wd_eff = wd / self.initial_lr if self.decoupled else wd
            p, g, m = self.params[i], grads[i], self.exp_avg[i]
            p32, m32 = p.float(), m.float()  # the tensors themselves when float32
            p32.mul_(1 - lr * wd_eff)
            p32.sub_(u.double().mul(lr * scale[k]).float())
            m32.mul_(b2).add_(g.float(), alpha=1 - b2)
            self.last_fp32[i] = (p32.clone(), m32.clone())
            p.copy_(p32)  # rounded once, to nearest, when p is not float32
            m.copy_(m32)
        return scale


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values (as float32) just below and just above each float32 element of ``x`` in magnitude.

    A bfloat16 value is a float32 whose low 16 bits are zero: truncating them gives the
    neighbour toward zero, adding one unit at bit 16 the neighbour away from zero (equal
    when ``x`` is already a bfloat16 value). Element by element on Python ints, slowly.
    """
    toward, away = [], []
    for v in x.flatten().tolist():
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        low = bits & 0xFFFF
        t = bits - low
        a = t if low == 0 else t + 0x10000
        toward.append(struct.unpack("<f", struct.pack("<I", t))[0])
        away.append(struct.unpack("<f", struct.pack("<I", a & 0xFFFFFFFF))[0])
    shape = x.shape
    return torch.tensor(toward, dtype=torch.float32).view(shape), torch.tensor(away, dtype=torch.float32).view(shape)
