"""The compiled path (``use_triton=True``) under changing betas and tensor sets: bounded compiling, never a crash.

Betas are tensors and sizes dynamic, so changing either compiles nothing new; a new
dtype pattern is a new graph, and past the variant budget the kernel runs the eager
path with one warning. Graphs run without dynamo's guards, so the tests also show that
what the guards would have caught is kept out of them by the batch plan. Results are
compared with the eager chunked path: counts exactly; ``exp_avg`` and parameters within
what inductor's possibly unfused ``m * b + g * (1 - b)`` allows (one rounding of
``g * (1 - b)``, 2**-24 * |g| per step; the parameters' steps are exactly ``+-lr`` for
the fixed scales used here, and ``u`` flips only if ``c`` is within that of 0, which
these seeded data avoid).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lion_sf_dist.kernel as kernel
from lion_sf_dist.kernel import Kernel

SHAPES = [(5, 3), (7,), (1,), (33, 17), (12,), (2, 3, 4), (9, 9), (40,), (3,), (6, 2), (11,)]


def _pair_step(compiled: Kernel, eager: Kernel, state: dict, idx: list[int], b1: float, b2: float,
               gen: torch.Generator, dtype: torch.dtype = torch.float32) -> None:
    ps_c, ms_c = [state["pc"][i].to(dtype) for i in idx], [state["mc"][i].to(dtype) for i in idx]
    ps_e, ms_e = [state["pe"][i].to(dtype) for i in idx], [state["me"][i].to(dtype) for i in idx]
    gs = [torch.randn(SHAPES[i], generator=gen).to(dtype) for i in idx]
    n = len(idx)
    rows_c = compiled.count(ms_c, gs, (b1,) * n)
    rows_e = eager.count(ms_e, gs, (b1,) * n)
    assert torch.equal(rows_c, rows_e)
    step, decay, keep = torch.full((n,), -1e-2), torch.full((n,), 1 - 1e-3), torch.ones(n, dtype=torch.bool)
    compiled.apply(ps_c, ms_c, gs, step, decay, keep, (b1,) * n, (b2,) * n)
    eager.apply(ps_e, ms_e, gs, step, decay, keep, (b1,) * n, (b2,) * n)
    for j, i in enumerate(idx):
        state["pc"][i], state["mc"][i] = ps_c[j].float(), ms_c[j].float()
        state["pe"][i], state["me"][i] = ps_e[j].float(), ms_e[j].float()
        g_max = gs[j].abs().max().item()
        torch.testing.assert_close(ms_c[j], ms_e[j], rtol=0, atol=4 * g_max * 2.0**-24 + 1e-30 if dtype == torch.float32
                                   else 2.0**-7)
        torch.testing.assert_close(ps_c[j], ps_e[j], rtol=2.0**-22, atol=1e-8 if dtype == torch.float32 else 2.0**-7)


@pytest.mark.parametrize("batch", [1, 4], ids=["one-per-call", "four-per-call"])
def test_changing_betas_and_tensor_sets_compile_within_a_bound(monkeypatch, batch):
    """Calls of one tensor, and of four with the last batch padded with dummies (the CPU default; GPUs take 8)."""
    monkeypatch.setattr(kernel.compiled, "COMPILE_BATCH", {"cpu": batch})
    monkeypatch.setattr(kernel.compiled, "_graphs", {"count": {}, "apply": {}})
    monkeypatch.setattr(kernel.compiled, "MAX_COMPILED_VARIANTS", 2)
    traced: list[tuple] = []
    real = kernel.compiled.compile_unguarded
    monkeypatch.setattr(kernel.compiled, "compile_unguarded", lambda fn, args: traced.append(args) or real(fn, args))
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    state = {k: [t.clone() * (0.1 if k[0] == "m" else 1.0) for t in init] for k in ("pc", "mc", "pe", "me")}
    compiled, eager = Kernel(True), Kernel(False)
    rng = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _k in range(12):
            size = 3 + int(torch.randint(0, len(SHAPES) - 3, (1,), generator=rng))
            idx = sorted(torch.randperm(len(SHAPES), generator=rng)[:size].tolist())
            b1 = 0.5 + 0.45 * torch.rand((), generator=rng).item()
            b2 = 0.9 + 0.099 * torch.rand((), generator=rng).item()
            _pair_step(compiled, eager, state, idx, b1, b2, gen)
        # float32 used both variants a kind may take (sizes >= 2, size 1): bfloat16 is past the budget
        for _ in range(2):
            _pair_step(compiled, eager, state, [0, 1, 3], 0.9, 0.99, gen, dtype=torch.bfloat16)
    fallbacks = [w for w in caught if issubclass(w.category, RuntimeWarning) and "eager path" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert len(kernel.compiled._graphs["apply"]) == 2
    assert len(traced) == 4  # a graph per function and kind, traced once: 12 steps of new sets and betas reuse them


def test_without_inductor_caches_the_step_runs_eagerly(monkeypatch):
    """Graphs are compiled ahead of their calls, which needs inductor's caches: with them disabled, one warning
    names the cause and the step runs on the eager path, with its results."""
    monkeypatch.setattr(kernel.compiled, "_graphs", {"count": {}, "apply": {}})
    ps, ms, gs = [torch.ones(4)], [torch.zeros(4)], [torch.full((4,), -1.0)]
    kern = Kernel(True)
    with torch.compiler.config.patch(force_disable_caches=True), \
            pytest.warns(RuntimeWarning, match="TORCHINDUCTOR_FORCE_DISABLE_CACHES.*eager path"):
        rows = kern.count(ms, gs, (0.9,))
        kern.apply(ps, ms, gs, torch.tensor([-0.5]), torch.tensor([1.0]), torch.tensor([True]), (0.9,), (0.99,))
    assert rows.tolist() == [[4, 0]] and torch.equal(ps[0], torch.full((4,), 1.5))
    assert kernel.compiled._graphs == {"count": {}, "apply": {}}


def test_a_parameter_whose_tensors_differ_in_size_is_refused_before_anything_runs(monkeypatch):
    """An unguarded graph trusts its tensors' sizes: a gradient the size of another parameter's is refused by the
    batch plan, with the sizes named, before a graph is called or a tensor written."""
    monkeypatch.setattr(kernel.compiled, "_graphs", {"count": {}, "apply": {}})
    ps, ms = [torch.ones(6), torch.ones(9)], [torch.zeros(6), torch.zeros(9)]
    gs = [torch.ones(6), torch.ones(8)]
    tables = torch.full((2,), -1e-2), torch.ones(2), torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"different sizes \(9, 9, 8\)"):
        Kernel(True).apply(ps, ms, gs, *tables, (0.9,) * 2, (0.99,) * 2)
    assert torch.equal(ps[0], torch.ones(6)) and torch.equal(ms[0], torch.zeros(6))
    assert kernel.compiled._graphs["apply"] == {}


def test_batch_plans_are_built_once_for_count_and_apply(monkeypatch):
    """A step's count and apply each have a plan (two and three lists); later steps reuse both, not rebuild."""
    built = []
    real = kernel.compiled._Batches
    monkeypatch.setattr(kernel.compiled, "_Batches", lambda *args: built.append(1) or real(*args))
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen) for s in SHAPES[:4]]
    ms = [torch.zeros_like(p) for p in ps]
    kern, n = Kernel(True), len(ps)
    for _ in range(3):
        gs = [torch.randn(p.shape, generator=gen) for p in ps]
        kern.count(ms, gs, (0.9,) * n)
        kern.apply(ps, ms, gs, torch.full((n,), -1e-3), torch.ones(n), torch.ones(n, dtype=torch.bool),
                   (0.9,) * n, (0.99,) * n)
    assert len(built) == 2


@pytest.mark.parametrize("batch", [1, 4], ids=["one-per-call", "four-per-call"])
def test_small_tensors_of_one_size_step_as_stacks(monkeypatch, batch):
    """Small contiguous tensors sharing a size and dtypes are stepped as one stack, the others by compiled calls;
    rows come back in the tensors' order, a skipped unit's stacked tensor keeps its values, and counts and
    values match the eager path (within the compiled path's tolerance, as above)."""
    monkeypatch.setattr(kernel.compiled, "COMPILE_BATCH", {"cpu": batch})
    stacked: list[int] = []
    real = kernel.compiled._stacked_apply
    monkeypatch.setattr(kernel.compiled, "_stacked_apply", lambda ps, *a: stacked.append(len(ps)) or real(ps, *a))
    shapes = [(8,), (3, 4), (40,), (8,), (12,), (8,), (1,), (3, 4), (8,), (1,), (8,), (12,), (1,), (1,), (5, 7)]
    gen = torch.Generator().manual_seed(3)
    ps_e = [torch.randn(s, generator=gen) for s in shapes]
    ps_e[-1] = ps_e[-1].t()  # not contiguous: never stacked
    ms_e = [torch.randn(p.shape, generator=gen).mul_(0.1).as_strided(p.shape, p.stride()) for p in ps_e]
    ps_c, ms_c = [p.clone() for p in ps_e], [m.clone() for m in ms_e]
    n = len(shapes)
    compiled, eager = Kernel(True), Kernel(False)
    for step in range(3):
        gs = [torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen)) for p in ps_e]  # p's layout
        gs[5][0] = float("nan") if step == 1 else gs[5][0]  # its unit skips this step
        b1, b2 = 0.8 + 0.05 * step, 0.99 - 0.01 * step
        rows_c = compiled.count(ms_c, gs, (b1,) * n)
        rows_e = eager.count(ms_e, gs, (b1,) * n)
        assert torch.equal(rows_c, rows_e)
        eights = [i for i, s in enumerate(shapes) if s == (8,)]
        assert len(set(rows_e[eights, 0].tolist())) > 1  # a stack's rows in the wrong order would be caught
        keep = torch.tensor([step != 1 or i != 5 for i in range(n)])
        step_size, decay = torch.linspace(-1e-2, -2e-2, n) * keep, torch.where(keep, 1 - 1e-3, 1.0)
        before = ps_c[5].clone(), ms_c[5].clone()
        compiled.apply(ps_c, ms_c, gs, step_size, decay, keep, (b1,) * n, (b2,) * n)
        eager.apply(ps_e, ms_e, gs, step_size, decay, keep, (b1,) * n, (b2,) * n)
        if step == 1:
            assert torch.equal(ps_c[5], before[0]) and torch.equal(ms_c[5], before[1])
        for i in range(n):
            g_max = gs[i].nan_to_num(0.0).abs().max().item()
            torch.testing.assert_close(ms_c[i], ms_e[i], rtol=0, atol=4 * g_max * 2.0**-24 + 1e-30)
            torch.testing.assert_close(ps_c[i], ps_e[i], rtol=2.0**-22, atol=1e-8)
    assert sorted(stacked[:3]) == [4, 4, 5]  # (1,) x4, numel 12 x4 ((3, 4) and (12,) flat alike), (8,) x5


def test_parameter_and_gradient_of_different_layouts(monkeypatch):
    """A transposed parameter with a contiguous gradient (as a DDP bucket view gives it), the reverse, and one
    transposed in all three tensors step as on the eager path: they take its chunked route, since a compiled
    call takes contiguous tensors flat (an unguarded graph traced for one stride pattern must not see another)."""
    gen = torch.Generator().manual_seed(5)
    ps_e = [torch.randn(5, 7, generator=gen).t(), torch.randn(7, 5, generator=gen), torch.randn(40, generator=gen),
            torch.randn(6, 3, generator=gen).t()]
    ms_e = [torch.randn(7, 5, generator=gen) * 0.1, torch.randn(5, 7, generator=gen).t() * 0.1, torch.zeros(40),
            torch.randn(6, 3, generator=gen).t() * 0.1]
    ps_c, ms_c = [p.clone() for p in ps_e], [m.clone() for m in ms_e]
    assert [p.is_contiguous() for p in ps_c] == [False, True, True, False] and not ms_c[1].is_contiguous()
    assert not ms_c[3].is_contiguous()
    compiled, eager = Kernel(True), Kernel(False)
    for _ in range(2):
        gs = [torch.randn(p.shape, generator=gen) for p in ps_e]
        gs[3] = torch.randn(6, 3, generator=gen).t()
        rows_c, rows_e = compiled.count(ms_c, gs, (0.9,) * 4), eager.count(ms_e, gs, (0.9,) * 4)
        assert torch.equal(rows_c, rows_e)
        tables = torch.full((4,), -1e-2), torch.full((4,), 1 - 1e-3), torch.ones(4, dtype=torch.bool)
        compiled.apply(ps_c, ms_c, gs, *tables, (0.9,) * 4, (0.99,) * 4)
        eager.apply(ps_e, ms_e, gs, *tables, (0.9,) * 4, (0.99,) * 4)
        for i in (0, 1, 3):  # the chunked route itself: bitwise
            assert torch.equal(ps_c[i], ps_e[i]) and torch.equal(ms_c[i], ms_e[i])
        torch.testing.assert_close(ps_c[2], ps_e[2], rtol=2.0**-22, atol=1e-8)


def test_tensors_past_the_int32_count_are_counted_on_the_chunked_route(monkeypatch):
    """Compiled counts are int32 sums; a tensor that could overflow one (here: a lowered bound) is counted by the
    chunked path instead, and its counts are the eager path's. Its apply stays compiled."""
    monkeypatch.setattr(kernel.update, "EXACT_INT32_COUNT", 30)
    counted: list[list[int]] = []
    real = kernel.chunked.count
    monkeypatch.setattr(kernel.chunked, "count", lambda ms, *a: counted.append([m.numel() for m in ms]) or real(ms, *a))
    gen = torch.Generator().manual_seed(6)
    shapes = [(5, 7), (12,), (40,), (29,), (30,)]
    ps = [torch.randn(s, generator=gen) for s in shapes]
    ms = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    gs = [torch.randn(s, generator=gen) for s in shapes]
    compiled = Kernel(True)
    rows = compiled.count(ms, gs, (0.9,) * 5)
    assert counted == [[35, 40, 30]]
    assert torch.equal(rows, Kernel(False).count(ms, gs, (0.9,) * 5))
    applied: list[object] = []
    monkeypatch.setattr(kernel.chunked, "apply", lambda *a, **k: applied.append(k))
    assert compiled.apply(ps, ms, gs, torch.full((5,), -1e-2), torch.ones(5), torch.ones(5, dtype=torch.bool),
                          (0.9,) * 5, (0.99,) * 5) is None and not applied
