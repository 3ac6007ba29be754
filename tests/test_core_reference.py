"""LionSF against the slow contract-only reference (tests/reference.py) and the lion-pytorch oracle.

Tolerance on parameters, derived from docs/CONTRACT.md section 2: ``u`` and the exact counts are
bitwise equal, so parameters differ only through the float32 scalar ``lr * s_U`` (the
library rounds ``A / N``, ``2 a - 1``, ``|a| ** pow`` and ``-lr * s`` to float32, about
``(pow + 4)`` roundings of relative size 2**-24; the reference rounds once) and the final
rounding of ``p``. Per step and element that is at most ``lr * (pow + 4) * 2**-24`` plus
one ulp of ``p``; over ``k`` steps ``k`` times that (decay only shrinks old errors, and
``exp_avg``, hence ``u``, does not depend on ``p``). ``exp_avg`` must match bitwise.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from lion_pytorch import Lion

import lion_sf_dist.kernel as kernel
from lion_sf_dist import LionSF
from tests.reference import ReferenceLionSF

SHAPES = {"a.w": (5, 3), "a.b": (5,), "b.w": (1,), "b.e": (0, 4), "c.w": (2, 3, 4), "d.w": (33, 17)}
GROUP_OF = {"a.w": 0, "a.b": 0, "b.w": 0, "b.e": 1, "c.w": 1, "d.w": 1}
HYPER = [dict(lr=3e-2, betas=(0.9, 0.99), weight_decay=0.1), dict(lr=1e-2, betas=(0.5, 0.95), weight_decay=0.3)]


def grads_for(step: int, zero_frac: float = 0.2) -> dict[str, torch.Tensor]:
    """Seeded gradients with exact zeros, and at step 1 a ``c`` that cancels to exactly 0."""
    gen = torch.Generator().manual_seed(100 + step)
    out = {}
    for name, shape in SHAPES.items():
        g = torch.randn(shape, generator=gen)
        g[torch.rand(shape, generator=gen) < zero_frac] = 0.0
        out[name] = g
    return out


def make_pair(agreement, pow, decoupled, negative="abs", ema=False, use_triton=False):
    gen = torch.Generator().manual_seed(7)
    full = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    lib_params = {n: t.clone().requires_grad_() for n, t in full.items()}
    groups = [
        dict(params=[(n, lib_params[n]) for n in SHAPES if GROUP_OF[n] == gi], **HYPER[gi]) for gi in range(2)
    ]
    opt = LionSF(groups, lr=HYPER[0]["lr"], decoupled_weight_decay=decoupled, pow=pow, agreement=agreement,
                 negative=negative, agreement_ema=ema, use_triton=use_triton)
    order = [n for gi in range(2) for n in SHAPES if GROUP_OF[n] == gi]
    ref = ReferenceLionSF([full[n].clone() for n in order], order, [GROUP_OF[n] for n in order], HYPER,
                          agreement=agreement, pow=pow, decoupled=decoupled, negative=negative, agreement_ema=ema)
    return opt, [lib_params[n] for n in order], ref, order


def run_both(opt, lib, ref, order, steps):
    for k in range(steps):
        g = grads_for(k)
        if k == 1:  # with beta1 = 0.5, g = -m makes c = m * b1 + g * (1 - b1) exactly 0 while g != 0
            name, m = order[-1], ref.exp_avg[-1]
            assert HYPER[GROUP_OF[name]]["betas"][0] == 0.5
            idx = m.view(-1).nonzero().view(-1)[:5]
            g[name].view(-1)[idx] = -m.view(-1)[idx]
            assert len(idx) == 5 and (m.mul(0.5).add(g[name], alpha=0.5).view(-1)[idx] == 0).all()
        for p, n in zip(lib, order):
            p.grad = g[n].clone()
        opt.step()
        ref.step([g[n].clone() for n in order])


def assert_matches(opt, lib, ref, pow, steps):
    for i, (p, rp, rm) in enumerate(zip(lib, ref.params, ref.exp_avg)):
        assert torch.equal(opt.state[p]["exp_avg"], rm), f"exp_avg of parameter {i} differs"
        lr = max(h["lr"] for h in HYPER)
        atol = steps * lr * (pow + 4) * 2.0**-24
        torch.testing.assert_close(p.detach(), rp, rtol=steps * 2.0**-23, atol=atol)


@pytest.mark.parametrize("agreement,pow,decoupled", [
    *itertools.product(["tensor", "module", "group", "global"], [1.0], [False]),
    ("tensor", 0.0, False), ("tensor", 0.5, True), ("module", 2.0, True), ("global", 0.5, False),
])
def test_matches_reference(agreement, pow, decoupled):
    opt, lib, ref, order = make_pair(agreement, pow, decoupled)
    run_both(opt, lib, ref, order, steps=4)
    assert_matches(opt, lib, ref, pow, steps=4)


def test_stacked_route_matches_reference(monkeypatch):
    """The chunked path's stacks (small tensors stepped as rows) checked alone: with stacks of one
    allowed, every tensor here is small and takes that route."""
    monkeypatch.setattr(kernel.chunked, "STACK_MIN", 1)
    stacked: list[int] = []
    real = kernel.chunked._stacks
    monkeypatch.setattr(kernel.chunked, "_stacks", lambda *a: [stacked.append(len(i)) or i for i in real(*a)])
    opt, lib, ref, order = make_pair("module", 1.0, True)
    run_both(opt, lib, ref, order, steps=4)
    non_empty = sum(1 for shape in SHAPES.values() if 0 not in shape)  # an empty tensor has nothing to step
    assert sum(stacked) == 2 * non_empty * 4  # count and apply, every tensor, every step
    assert_matches(opt, lib, ref, 1.0, steps=4)


@pytest.mark.parametrize("negative,ema", [("clamp", False), ("abs", True), ("clamp", True)])
def test_variants_match_reference(negative, ema):
    opt, lib, ref, order = make_pair("group", 1.0, False, negative=negative, ema=ema)
    run_both(opt, lib, ref, order, steps=5)
    assert_matches(opt, lib, ref, 1.0, steps=5)


def test_clamp_differs_from_abs_when_agreement_is_negative():
    """A unit whose update mostly disagrees with its gradient: abs steps, clamp does not."""
    p_abs, p_clamp = (torch.ones(64, requires_grad=True) for _ in range(2))
    opts = [LionSF([p_abs], lr=0.1, betas=(0.9, 0.99)), LionSF([p_clamp], lr=0.1, betas=(0.9, 0.99), negative="clamp")]
    for opt, p in zip(opts, (p_abs, p_clamp)):
        opt.state[p]["exp_avg"].fill_(1.0)
        p.grad = torch.full((64,), -0.5)  # c = 0.9 - 0.05 > 0, g < 0: agreement -1
        opt.step()
    assert opts[0].last_agreement.item() == -1.0
    assert torch.equal(p_abs.detach(), torch.full((64,), 0.9)) and torch.equal(p_clamp.detach(), torch.ones(64))


def test_pow0_is_lion_pytorch_bitwise():
    """With pow=0 every scale is 1: LionSF must be lion_pytorch.Lion, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 5), (3,), (1,), (2, 2, 2), (300, 301)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]
    ours = LionSF(a, lr=1e-2, weight_decay=0.2, pow=0.0)
    theirs = Lion(b, lr=1e-2, weight_decay=0.2)
    for _ in range(5):
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, generator=gen)
            y.grad = x.grad.clone()
        ours.step()
        theirs.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert torch.equal(ours.state[x]["exp_avg"], theirs.state[y]["exp_avg"])


def test_wrong_formula_is_caught(monkeypatch):
    """The reference comparison fails on a subtly wrong count (>= 0 instead of > 0)."""

    def count_nonnegative(m, g, beta1, scratch=None, signs=None):
        u = m.mul(beta1).add_(g, alpha=1.0 - beta1).sign_()
        if signs is not None:
            signs.copy_(u)
        return (u.mul_(g) >= 0).to(torch.float32).add_(g, alpha=0.0).sum(dtype=torch.float32)

    monkeypatch.setattr(kernel.update, "agreement_sum", count_nonnegative)
    opt, lib, ref, order = make_pair("tensor", 1.0, False)
    run_both(opt, lib, ref, order, steps=3)
    with pytest.raises(AssertionError):
        assert_matches(opt, lib, ref, 1.0, steps=3)


def test_lerp_rounding_is_caught(monkeypatch):
    """docs/CONTRACT.md section 2 pins ``m.mul_(b2).add_(g, alpha=1 - b2)``; a lerp momentum update
    must fail the bitwise check."""

    def apply_lerp(pieces, step_size, decay, keep, beta1, beta2, draws=None, scratch=None, signs=None):
        for p, m, g in pieces:
            u = m.mul(beta1).add_(g, alpha=1.0 - beta1).sign_()
            p.mul_(decay).addcmul_(u, step_size)
            m.lerp_(g, 1.0 - beta2)

    monkeypatch.setattr(kernel.update, "apply_pieces", apply_lerp)
    opt, lib, ref, order = make_pair("tensor", 1.0, False)
    run_both(opt, lib, ref, order, steps=3)
    with pytest.raises(AssertionError, match="exp_avg"):
        assert_matches(opt, lib, ref, 1.0, steps=3)


@pytest.mark.parametrize("stack_min", [kernel.compiled.STACK_MIN, 1], ids=["compiled-calls", "every-tensor-stacked"])
def test_compiled_path_matches_reference(monkeypatch, stack_min):
    """use_triton=True: the same maths through torch.compile (``every-tensor-stacked``: every tensor here is
    small, so with stacks of one allowed none takes a compiled call and the stacked route is checked alone).

    Inductor may round ``m * b + g * (1 - b)`` without the fused multiply-add eager torch
    uses (docs/CONTRACT.md section 2 allows either): one extra rounding of ``g * (1 - b)``, at most
    ``2**-24 * max|g|`` per step in absolute terms (relative error is unbounded where the
    two terms cancel). The parameters keep the tolerance above (``u`` flips only if ``c``
    is within that error of 0, which these seeded data avoid).
    """
    monkeypatch.setattr(kernel.compiled, "STACK_MIN", stack_min)
    stacked: list[int] = []
    real = kernel.compiled._stacked_apply
    monkeypatch.setattr(kernel.compiled, "_stacked_apply", lambda ps, *a: stacked.append(len(ps)) or real(ps, *a))
    opt, lib, ref, order = make_pair("module", 1.0, True, use_triton=True)
    steps = 3
    run_both(opt, lib, ref, order, steps)
    non_empty = sum(1 for shape in SHAPES.values() if 0 not in shape)  # an empty tensor has nothing to step
    assert sum(stacked) == (non_empty * steps if stack_min == 1 else 0)
    max_g = max(g.abs().max().item() for k in range(steps) for g in grads_for(k).values() if g.numel())
    for p, rp, rm in zip(lib, ref.params, ref.exp_avg):
        torch.testing.assert_close(opt.state[p]["exp_avg"], rm, rtol=0, atol=steps * max_g * 2.0**-24)
        torch.testing.assert_close(p.detach(), rp, rtol=steps * 2.0**-23, atol=steps * 5 * 3e-2 * 2.0**-24)
