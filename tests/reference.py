"""A slow LionSF written from docs/CONTRACT.md alone: the oracle the library is checked against.

Deliberately shares no code with ``lion_sf_dist``: counts are a Python loop over elements,
units come from names by string rules, scales are computed in float64 and rounded once.
The two torch expressions docs/CONTRACT.md section 2 pins for rounding (``c`` and ``m``) are
written as the contract writes them, so ``exp_avg`` must match bitwise.
"""

from __future__ import annotations

import math

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
                 initial_lr=None, negative="abs", agreement_ema=False):
        self.params = params
        self.hyper = hyper  # per group: dict(lr, betas, weight_decay)
        self.groups = groups  # group index of each parameter
        self.keys = units_of(names, groups, agreement)
        self.pow, self.decoupled, self.negative, self.ema_on = pow, decoupled, negative, agreement_ema
        self.initial_lr = initial_lr if initial_lr is not None else hyper[0]["lr"]
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.ema = {}

    def step(self, grads):
        A, N, bad, u_of = {}, {}, {}, {}
        for i, (g, m) in enumerate(zip(grads, self.exp_avg)):
            if g is None:
                continue
            b1, _ = self.hyper[self.groups[i]]["betas"]
            c = m.mul(b1).add(g, alpha=1 - b1)
            u = torch.sign(c)
            u_of[i] = u
            k = self.keys[i]
            agree = sum(1 for ui, gi in zip(u.flatten().tolist(), g.flatten().tolist()) if ui * gi > 0)
            A[k] = A.get(k, 0) + agree
            N[k] = N.get(k, 0) + g.numel()
            bad[k] = bad.get(k, False) or not all(math.isfinite(x) for x in g.flatten().tolist())
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
            p.mul_(1 - lr * wd_eff)
            p.sub_(u.double().mul(lr * scale[k]).float())
            m.mul_(b2).add_(g, alpha=1 - b2)
        return scale
