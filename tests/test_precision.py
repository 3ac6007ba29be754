"""Low-precision parameters and state against the reference's precision rules (see docs/CONTRACT.md).

* fp32 maths: with bfloat16 (or float16) ``p``, ``g`` and ``exp_avg``, every result is the
  float32 expression rounded once when stored. With ``pow=0`` the scale is exactly 1, so
  the library and tests/reference.py compute the same float32 values and must store the
  same bits; a kernel doing the arithmetic in bfloat16 must fail.
* stochastic rounding: each stored value is one of the two bfloat16 neighbours of the
  float32 result, and their average is the float32 result; rounding to nearest must fail.
"""

from __future__ import annotations

import pytest
import torch

import lion_sf_dist.kernel as kernel
from lion_sf_dist import LionSF
from lion_sf_dist.kernel import Kernel
from lion_sf_dist.rounding import IndexMap, Rounding
from tests.reference import ReferenceLionSF, bf16_neighbours

SHAPES = [(6, 5), (7,), (1,), (40, 33)]
HYPER = [dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.3)]


def _run(dtype: torch.dtype, foreach: bool, steps: int = 5, pow: float = 0.0):
    gen = torch.Generator().manual_seed(11)
    full = [(torch.randn(s, generator=gen) * 0.05).to(dtype) for s in SHAPES]
    lib = [t.clone().requires_grad_() for t in full]
    opt = LionSF(lib, **HYPER[0], pow=pow, foreach=foreach)
    ref = ReferenceLionSF([t.clone() for t in full], [f"t{i}" for i in range(len(full))], [0] * len(full), HYPER,
                          pow=pow)
    for _ in range(steps):
        grads = [(torch.randn(s, generator=gen) * 0.1).to(dtype) for s in SHAPES]
        for p, g in zip(lib, grads):
            p.grad = g.clone()
        opt.step()
        ref.step([g.clone() for g in grads])
    return opt, lib, ref


def _assert_bitwise(opt, lib, ref) -> None:
    for i, (p, rp, rm) in enumerate(zip(lib, ref.params, ref.exp_avg)):
        assert torch.equal(opt.state[p]["exp_avg"], rm), f"exp_avg of tensor {i} differs"
        assert torch.equal(p.detach(), rp), f"parameter {i} differs"


@pytest.mark.parametrize("foreach", [False, True], ids=["chunked", "foreach"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float32_maths_rounded_once(dtype, foreach):
    opt, lib, ref = _run(dtype, foreach)
    assert lib[0].dtype == dtype and opt.state[lib[0]]["exp_avg"].dtype == dtype
    _assert_bitwise(opt, lib, ref)


def test_bf16_arithmetic_is_caught(monkeypatch):
    """The update computed in bfloat16 (each op rounded) instead of float32 must fail the bitwise check."""

    def apply_bf16(pieces, step_size, decay, keep, beta1, beta2, draws=None, scratch=None, signs=None):
        for p, m, g in pieces:
            u = m.mul(beta1).add_(g, alpha=1.0 - beta1).sign_()
            p.mul_(decay).addcmul_(u, step_size)
            m.mul_(torch.where(keep, beta2, 1.0)).add_(g.mul(keep).nan_to_num_(0.0, 0.0, 0.0), alpha=1.0 - beta2)

    monkeypatch.setattr(kernel.update, "apply_pieces", apply_bf16)
    opt, lib, ref = _run(torch.bfloat16, foreach=False)
    with pytest.raises(AssertionError, match="differs"):
        _assert_bitwise(opt, lib, ref)


@pytest.mark.parametrize("stochastic", [True, False])
def test_bf16_momentum_needs_stochastic_rounding(stochastic):
    """The issue's example: bf16 ``exp_avg``, beta2 = 0.99, a constant gradient 1.0, 600 steps (fp32: 0.9976).

    Rounded to nearest, the increment ``0.01 * (1 - m)`` drops below half a bf16 ulp and
    ``m`` stalls near 0.8; rounded stochastically it reaches the float32 value on average.
    """
    kern = Kernel(False)
    p = torch.zeros(1024, dtype=torch.bfloat16)
    m = torch.zeros_like(p)
    g = torch.ones_like(p)
    step = torch.zeros((), dtype=torch.int64)
    rounding = Rounding(0, step, [0], [IndexMap.slice(0, p.numel())]) if stochastic else None
    for _ in range(600):
        step += 1
        kern.apply([p], [m], [g], torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([True]), (0.9,), (0.99,),
                   rounding=rounding)
    mean = m.float().mean().item()
    assert (abs(mean - (1 - 0.99**600)) < 2e-3) if stochastic else (mean < 0.85)


# -- stochastic rounding -----------------------------------------------------------------

def _sr_step(kern: Kernel, p32: torch.Tensor, grad_sign: float, lr: float, seed: int = 5, step: int = 3):
    """One kernel step of a bf16 tensor with ``pow``-free scale 1 and stochastic rounding.

    Returns (stored p, fp32 p)."""
    p = p32.to(torch.bfloat16)
    m = torch.zeros_like(p)
    g = torch.full_like(p, grad_sign)
    n = p.numel()
    rounding = Rounding(seed, torch.tensor(step), [0], [IndexMap.slice(0, n)])
    exact = p.float().add(torch.sign(m.float().mul(0.9).add(g.float(), alpha=0.1)), alpha=-lr)
    kern.apply([p], [m], [g], torch.tensor([-lr]), torch.tensor([1.0]), torch.tensor([True]), (0.9,), (0.99,),
               rounding=rounding)
    return p, exact


@pytest.mark.parametrize("foreach", [False, True], ids=["chunked", "foreach"])
def test_stochastic_rounding_is_unbiased(foreach):
    """A quarter-ulp step from 1.0: every value is a neighbour, a quarter of them round up, the mean is the
    fp32 value."""
    lr = 2.0**-9  # bf16 ulp on [1, 2) is 2**-7
    stored, exact = _sr_step(Kernel(False, foreach=foreach), torch.ones(64, 64), grad_sign=-1.0, lr=lr)
    lo, hi = bf16_neighbours(exact)
    s = stored.float()
    assert bool(((s == lo) | (s == hi)).all()), "a stored value is not a bfloat16 neighbour of the float32 result"
    n = s.numel()
    stderr = (2.0**-7) * (0.25 * 0.75 / n) ** 0.5
    assert abs(s.mean().item() - exact.mean().item()) < 5 * stderr


def test_nearest_where_stochastic_is_asked_is_caught(monkeypatch):
    monkeypatch.setattr(kernel.chunked, "stochastic_bf16", lambda x, r: x)
    monkeypatch.setattr(kernel.chunked, "_draw_fn", lambda rounding, seg, stream, start, shape: (lambda v: v))
    stored, exact = _sr_step(Kernel(False), torch.ones(64, 64), grad_sign=-1.0, lr=2.0**-9)
    stderr = (2.0**-7) * (0.25 * 0.75 / stored.numel()) ** 0.5
    assert abs(stored.float().mean().item() - exact.mean().item()) > 5 * stderr


def _sliced_step(foreach: bool, pieces: list[tuple[torch.Tensor, IndexMap]], full_p: torch.Tensor,
                 full_g: torch.Tensor, chunk: int, monkeypatch) -> torch.Tensor:
    """Step the logical bf16 tensor as the given local pieces (index into the full tensor, map), reassemble it."""
    monkeypatch.setattr(kernel.chunked, "CHUNK", chunk)
    kern = Kernel(False, foreach=foreach)
    ps = [full_p[ix].clone().contiguous() for ix, _ in pieces]
    ms = [torch.zeros_like(p) for p in ps]
    gs = [full_g[ix].clone().contiguous() for ix, _ in pieces]
    s = len(ps)
    step = torch.tensor(7)
    rounding = Rounding(1234, step, [3] * s, [imap for _, imap in pieces])
    kern.apply(ps, ms, gs, torch.full((s,), -1e-3), torch.full((s,), 1 - 1e-4), torch.ones(s, dtype=torch.bool),
               (0.9,) * s, (0.99,) * s, rounding=rounding)
    out = full_p.clone()
    for (ix, _), p in zip(pieces, ps):
        out[ix] = p
    return out


@pytest.mark.parametrize("foreach", [False, True], ids=["chunked", "foreach"])
def test_stochastic_bits_follow_the_logical_index(foreach, monkeypatch):
    """The same logical tensor stepped whole, as ZeRO-style flat slices and as row and column shards: same bits."""
    gen = torch.Generator().manual_seed(2)
    rows, cols = 24, 40
    full_p = (torch.randn(rows, cols, generator=gen) * 0.1).to(torch.bfloat16)
    full_g = (torch.randn(rows, cols, generator=gen)).to(torch.bfloat16)
    flat_p, flat_g = full_p.view(-1), full_g.view(-1)
    whole = _sliced_step(foreach, [((slice(None), slice(None)), IndexMap.shard((rows, cols), (rows, cols), (0, 0)))],
                         full_p, full_g, 1 << 18, monkeypatch)
    bounds = [0, 1, 333, 334, 700, rows * cols]
    flat = _sliced_step(foreach, [(slice(a, b), IndexMap.slice(a, b - a)) for a, b in zip(bounds, bounds[1:])],
                        flat_p, flat_g, 128, monkeypatch).view(rows, cols)
    by_rows = _sliced_step(foreach, [((slice(a, b), slice(None)), IndexMap.shard((rows, cols), (b - a, cols), (a, 0)))
                                     for a, b in [(0, 7), (7, 8), (8, 24)]], full_p, full_g, 64, monkeypatch)
    by_cols = _sliced_step(foreach, [((slice(None), slice(a, b)), IndexMap.shard((rows, cols), (rows, b - a), (0, a)))
                                     for a, b in [(0, 13), (13, 40)]], full_p, full_g, 100, monkeypatch)
    nearest = (full_p.float() * (1 - 1e-4) - 1e-3 * torch.sign(full_g.float() * 0.1)).to(torch.bfloat16)
    assert not torch.equal(whole, nearest), "stochastic rounding should differ from nearest somewhere"
    for name, other in [("flat slices", flat), ("row shards", by_rows), ("column shards", by_cols)]:
        assert torch.equal(whole, other), f"{name} drew different bits"


def test_bits_from_the_local_position_are_caught(monkeypatch):
    """Bits drawn from the local (per-shard) position instead of the logical index must fail the slicing check."""
    positions = IndexMap.positions
    monkeypatch.setattr(IndexMap, "positions", lambda self, start, n, device: positions(
        IndexMap(0, self.sizes, self.strides), start, n, device))
    with pytest.raises(AssertionError, match="drew different bits"):
        test_stochastic_bits_follow_the_logical_index(False, monkeypatch)


# -- through the optimizer ---------------------------------------------------------------

def test_state_dtype_bf16_with_fp32_params_matches_reference():
    """``state_dtype=torch.bfloat16``: bf16 ``exp_avg`` beside fp32 parameters, float32 maths, one rounding."""
    gen = torch.Generator().manual_seed(4)
    full = [torch.randn(s, generator=gen) * 0.05 for s in SHAPES]
    lib = [t.clone().requires_grad_() for t in full]
    opt = LionSF(lib, **HYPER[0], pow=0.0, state_dtype=torch.bfloat16)
    ref = ReferenceLionSF([t.clone() for t in full], [f"t{i}" for i in range(len(full))], [0] * len(full), HYPER,
                          pow=0.0, state_dtype=torch.bfloat16)
    for _ in range(4):
        grads = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]
        for p, g in zip(lib, grads):
            p.grad = g.clone()
        opt.step()
        ref.step([g.clone() for g in grads])
    assert opt.state[lib[0]]["exp_avg"].dtype == torch.bfloat16 and lib[0].dtype == torch.float32
    _assert_bitwise(opt, lib, ref)


def test_stochastic_rounding_moves_small_updates_and_restarts_with_the_same_bits():
    """The issue's example: bf16 weights (std 0.02), lr 1e-4, 20 steps. Rounded to nearest a fifth never move;
    rounded stochastically far fewer do (those whose steps cancel). A state_dict taken mid-way replays the same bits."""
    gen = torch.Generator().manual_seed(8)
    init = (torch.randn(4096, generator=gen) * 0.02).to(torch.bfloat16)
    grads = [torch.randn(4096, generator=gen).to(torch.bfloat16) for _ in range(20)]

    def run(opt: LionSF, p: torch.Tensor, steps: range) -> None:
        for k in steps:
            p.grad = grads[k].clone()
            opt.step()

    nearest = init.clone().requires_grad_()
    run(LionSF([nearest], lr=1e-4, pow=0.0), nearest, range(20))
    stochastic = init.clone().requires_grad_()
    opt = LionSF([stochastic], lr=1e-4, pow=0.0, stochastic_rounding=True, rounding_seed=3)
    run(opt, stochastic, range(10))
    saved = opt.state_dict()
    saved["state"] = {k: {n: v.clone() for n, v in e.items()} for k, e in saved["state"].items()}
    restarted = stochastic.detach().clone().requires_grad_()
    run(opt, stochastic, range(10, 20))
    again = LionSF([restarted], lr=1e-4, pow=0.0, stochastic_rounding=True, rounding_seed=3)
    again.load_state_dict(saved)
    run(again, restarted, range(10, 20))
    never_nearest = (nearest.detach() == init).float().mean().item()
    never_stochastic = (stochastic.detach() == init).float().mean().item()
    assert never_nearest > 0.1 and never_stochastic < never_nearest / 3, (never_nearest, never_stochastic)
    assert torch.equal(restarted.detach(), stochastic.detach()), "the restart drew other bits"


def test_checkpoint_hot_restart_draws_the_same_bits(tmp_path):
    """``lion_sf_dist.checkpoint`` keeps the step count that keys the bits: a restart continues bitwise."""
    from lion_sf_dist import checkpoint

    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(64, 8, generator=gen).to(torch.bfloat16) for _ in range(6)]

    def model_and_opt() -> tuple[torch.nn.Module, LionSF]:
        model = torch.nn.Linear(8, 64, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            model.weight.copy_((torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) * 0.02))
        return model, LionSF(model.parameters(), lr=1e-4, pow=0.0, stochastic_rounding=True, rounding_seed=7)

    def run(model: torch.nn.Module, opt: LionSF, steps: range) -> None:
        for k in steps:
            model.weight.grad = grads[k].clone()
            opt.step()

    model, opt = model_and_opt()
    run(model, opt, range(3))
    checkpoint.save(tmp_path / "ckpt", model, opt)
    run(model, opt, range(3, 6))
    again, opt2 = model_and_opt()
    checkpoint.load(tmp_path / "ckpt", again, opt2)
    assert opt2.rounding_step == 3
    run(again, opt2, range(3, 6))
    assert torch.equal(again.weight, model.weight)


def test_checkpoint_converts_exp_avg_dtype_with_one_warning(tmp_path):
    """fp32 state loaded into a bf16-state optimizer (and back) is converted, with one warning naming it."""
    import warnings

    from lion_sf_dist import checkpoint

    def trained(state_dtype):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        opt = LionSF(model.parameters(), lr=1e-2, state_dtype=state_dtype)
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        return model, opt

    model, opt = trained(None)
    checkpoint.save(tmp_path / "fp32", model, opt)
    model_bf, opt_bf = trained(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"exp_avg of 4 parameter\(s\) converted on load \(float32 -> bfloat16") as w:
        checkpoint.load(tmp_path / "fp32", model_bf, opt_bf)
    assert len([x for x in w if "converted on load" in str(x.message)]) == 1
    for p, q in zip(model.parameters(), model_bf.parameters()):
        assert opt_bf.state[q]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(opt_bf.state[q]["exp_avg"], opt.state[p]["exp_avg"].to(torch.bfloat16))
    checkpoint.save(tmp_path / "bf16", model_bf, opt_bf)
    with pytest.warns(UserWarning, match=r"bfloat16 -> float32"):
        checkpoint.load(tmp_path / "bf16", model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same dtypes: no warning at all
        checkpoint.load(tmp_path / "bf16", model_bf, opt_bf)
