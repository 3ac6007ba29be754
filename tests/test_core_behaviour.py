"""LionSF as a torch optimizer: bad input, non-finite gradients, state, hooks and observability."""

from __future__ import annotations

import copy

import pytest
import torch

from lion_sf_dist import LionSF


def params(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def set_grads(ps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.0), "lr must be > 0"),
    (dict(lr=-1e-3), "lr must be > 0"),
    (dict(betas=(0.9, 1.5)), "betas"),
    (dict(betas=(-0.1, 0.9)), "betas"),
    (dict(pow=-1.0), "pow must be >= 0"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(agreement="layer"), "agreement must be one of"),
    (dict(negative="relu"), "negative must be one of"),
    (dict(lr=float("inf")), "lr must be > 0 and finite"),
    (dict(lr=float("nan")), "lr must be > 0 and finite"),
    (dict(weight_decay=float("inf")), "weight_decay must be >= 0 and finite"),
    (dict(pow=float("inf")), "pow must be >= 0 and finite"),
])
def test_bad_hyperparameters_name_the_cause(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LionSF(params((3,)), **kwargs)


def test_bad_group_values_name_the_cause():
    with pytest.raises(ValueError, match="betas"):
        LionSF([{"params": params((3,)), "betas": (0.9, 2.0)}])
    with pytest.raises(ValueError, match="lr must be > 0"):
        LionSF([{"params": params((3,)), "lr": 0.0}])


@pytest.mark.parametrize("group", [{"lr": -1.0}, {"betas": (0.9, 5.0)}, {"weight_decay": float("inf")}])
def test_rejected_param_group_is_not_added(group):
    """A refused add_param_group leaves nothing behind that a later step would move."""
    kept, refused = params((3,), (4,))
    opt = LionSF([kept], lr=0.1)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [refused], **group})
    assert len(opt.param_groups) == 1 and refused not in opt.state
    set_grads([kept, refused])
    before = refused.detach().clone()
    opt.step()
    assert torch.equal(refused.detach(), before)


def test_group_needing_names_is_not_added():
    opt = LionSF([("w", params((3,))[0])], agreement="module")
    with pytest.raises(ValueError, match="names"):
        opt.add_param_group({"params": params((2,))})
    assert len(opt.param_groups) == 1 and opt.unit_names == ("<root>",)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_non_float_parameters_refused_at_construction(dtype):
    odd = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match=f"floating-point parameters only.*{dtype}"):
        LionSF([params((2,))[0], odd])


def test_gradient_of_another_shape_is_refused():
    """Same element count, other shape: stepping it would pair elements with the wrong gradients."""
    (p,) = params((2, 3))
    opt = LionSF([p], lr=0.1)
    p.grad = torch.ones(2, 3)
    p.grad.data = torch.ones(3, 2)  # torch checks only the assignment of .grad itself
    with pytest.raises(ValueError, match=r"gradient of shape \(3, 2\).*parameter of shape \(2, 3\)"):
        opt.step()


def test_load_state_dict_refuses_other_optimizers_and_shapes():
    ps = params((2, 3), (4,))
    adamw = torch.optim.AdamW(ps)
    set_grads(ps)
    adamw.step()
    opt = LionSF(ps, lr=0.1)
    before = {p: opt.state[p]["exp_avg"].clone() for p in ps}
    with pytest.raises(ValueError, match="exp_avg_sq.*another optimizer's state"):
        opt.load_state_dict(adamw.state_dict())
    reshaped = copy.deepcopy(opt.state_dict())
    reshaped["state"][0]["exp_avg"] = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"exp_avg of parameter 0 has shape \(3, 2\)"):
        opt.load_state_dict(reshaped)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)  # AdamW's betas were not taken
    assert all(torch.equal(opt.state[p]["exp_avg"], before[p]) for p in ps)


def test_module_agreement_needs_names():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="named_parameters"):
        LionSF(model.parameters(), agreement="module")
    opt = LionSF(model.named_parameters(), agreement="module")
    assert opt.unit_names == ("<root>",)


def test_agreement_ema_refuses_a_unit_with_two_beta_pairs():
    model = torch.nn.Linear(3, 2)
    groups = [{"params": [("w", model.weight)]}, {"params": [("b", model.bias)], "betas": (0.5, 0.9)}]
    with pytest.raises(ValueError, match="different betas"):
        LionSF(groups, agreement="global", agreement_ema=True)


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = LionSF(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_units_by_agreement():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    named = list(model.named_parameters())
    groups = [{"params": named[:3]}, {"params": named[3:]}]
    assert LionSF(groups, agreement="tensor").units.ids == ((0, 1, 2), (3,))
    assert LionSF(groups, agreement="module").units.ids == ((0, 0, 1), (1,))
    assert LionSF(groups, agreement="group").units.ids == ((0, 0, 0), (1,))
    assert LionSF(groups, agreement="global").units.ids == ((0, 0, 0), (0,))


def test_non_finite_gradient_skips_only_its_unit():
    ps = params((4, 3), (5,), (6,))
    opt = LionSF(ps, lr=0.1, weight_decay=0.5)
    set_grads(ps, seed=1)
    opt.step()
    before = [p.detach().clone() for p in ps]
    m_before = [opt.state[p]["exp_avg"].clone() for p in ps]
    set_grads(ps, seed=2)
    ps[0].grad[1, 2] = float("nan")
    ps[1].grad[0] = float("-inf")
    opt.step()
    for i in (0, 1):
        assert torch.equal(ps[i].detach(), before[i]) and torch.equal(opt.state[ps[i]]["exp_avg"], m_before[i])
    assert not torch.equal(ps[2].detach(), before[2])
    assert torch.isfinite(opt.state[ps[2]]["exp_avg"]).all()
    assert opt.last_skipped.item() == 2
    assert opt.last_scale[0].item() == 0.0 and opt.last_scale[1].item() == 0.0


def test_non_finite_skips_a_global_unit_whole():
    ps = params((4, 3), (5,))
    opt = LionSF(ps, lr=0.1, agreement="global")
    set_grads(ps)
    ps[1].grad[2] = float("inf")
    before = [p.detach().clone() for p in ps]
    opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
    assert all(torch.equal(opt.state[p]["exp_avg"], torch.zeros_like(p)) for p in ps)


def test_parameter_without_grad_is_untouched():
    ps = params((3,), (4,))
    opt = LionSF(ps, lr=0.1, weight_decay=0.5, agreement="global")
    ps[0].grad = torch.ones(3)
    before = ps[1].detach().clone()
    opt.step()
    assert torch.equal(ps[1].detach(), before)
    assert torch.equal(opt.state[ps[1]]["exp_avg"], torch.zeros(4))
    # the global unit counted only the 3 elements that have a gradient: full agreement
    assert opt.last_agreement.item() == 1.0


def test_state_is_eager_and_round_trips():
    ps = params((3, 2), (0,), (5,))
    opt = LionSF(ps, lr=0.05, agreement_ema=True)
    assert all(torch.equal(opt.state[p]["exp_avg"], torch.zeros_like(p)) for p in ps)
    set_grads(ps)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())  # torch's state_dict() returns live references
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = LionSF(qs, lr=0.05, agreement_ema=True)
    opt2.load_state_dict(sd)
    for p, q in zip(ps, qs):
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])
        assert torch.equal(opt.state[p]["agreement_ema"], opt2.state[q]["agreement_ema"])
    for k in range(3):
        set_grads(ps, seed=10 + k)
        set_grads(qs, seed=10 + k)
        opt.step()
        opt2.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    assert torch.equal(opt.last_scale, opt2.last_scale)


def test_agreement_ema_state_moves():
    ps = params((50,))
    opt = LionSF(ps, lr=0.05, agreement_ema=True, betas=(0.9, 0.99))
    set_grads(ps)
    opt.step()
    a = opt.last_agreement.item()
    assert opt.agreement_average().shape == (1,)  # one unit: one average, the same object in every entry
    assert opt.state[ps[0]]["agreement_ema"][0].item() == pytest.approx(0.01 * a, rel=1e-6)
    assert opt.last_scale.item() == pytest.approx(abs(0.1 * a), rel=1e-6)


def test_closure_and_zero_grad():
    model = torch.nn.Linear(4, 1)
    opt = LionSF(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(20):
        last = opt.step(closure).item()
    assert last < first
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_swapped_parameters_take_their_state_along():
    """HF Accelerate swaps new tensors into param_groups after construction (docs/CONTRACT.md section 6)."""
    ps = params((3, 2), (4,))
    opt = LionSF(ps, lr=0.1)
    set_grads(ps)
    opt.step()
    m = [opt.state[p]["exp_avg"].clone() for p in ps]
    new = [p.detach().clone().requires_grad_() for p in ps]
    opt.param_groups[0]["params"] = new
    set_grads(new, seed=5)
    opt.step()
    assert len(opt.state) == 2 and all(p in opt.state for p in new)
    for p, old in zip(new, m):
        assert torch.equal(opt.state[p]["exp_avg"], old.mul(0.99).add(p.grad, alpha=0.01))
    assert len(opt.state_dict()["state"]) == 2


@pytest.mark.parametrize("foreach", [True, False], ids=["multi-tensor", "chunked"])
def test_step_reads_no_tensor_value_on_host(monkeypatch, foreach):
    """docs/CONTRACT.md section 4: no host-device synchronisation inside step(), on either eager path."""
    ps = params((4, 3), (7,), (0,))
    opt = LionSF(ps, agreement="group", agreement_ema=True, foreach=foreach)
    set_grads(ps)
    opt.step()  # the first step may build caches

    def forbidden(self, *args, **kwargs):
        raise AssertionError("step() read a tensor value on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    set_grads(ps, seed=3)
    opt.step()
    monkeypatch.undo()
    assert opt.last_scale.shape == (1,)
