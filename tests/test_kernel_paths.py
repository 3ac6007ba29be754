"""The kernel's paths agree with each other, and the multi-tensor one dispatches a constant number of ops.

* multi-tensor (``_foreach``) against chunked: counts and ``exp_avg`` bitwise, parameters
  bitwise (the same float32 ops in the same order, only batched), with exact zeros in
  ``g`` and in ``c``, non-finite gradients (skip), several beta groups, mixed dtypes and a
  non-contiguous tensor;
* ops counted on ``meta`` tensors: the multi-tensor path's count does not change with the
  number or size of tensors (GPT-2 small and Llama-7B shapes), and after the first step it
  takes no host tensor of one or more dims.
"""

from __future__ import annotations

import pytest
import torch

import lion_sf_dist.kernel as kernel
from lion_sf_dist import LionSF
from lion_sf_dist._torch_private import dispatch_mode
from lion_sf_dist.kernel import Kernel
from lion_sf_dist.opcount import count_ops, gpt2_small_shapes, llama7b_shapes

SHAPES = [(5, 3), (7,), (1,), (33, 17), (300, 301), (4, 6)]
BETAS1 = (0.9, 0.5, 0.9, 0.9, 0.5, 0.9)
BETAS2 = (0.99, 0.95, 0.99, 0.99, 0.95, 0.99)


def _case(dtypes: list[torch.dtype], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).to(d) for s, d in zip(SHAPES, dtypes)]
    ms = [(torch.randn(s, generator=gen) * 0.1).to(d) for s, d in zip(SHAPES, dtypes)]
    gs = [torch.randn(s, generator=gen).to(d) for s, d in zip(SHAPES, dtypes)]
    gs[1][2] = 0.0  # g == 0
    gs[4][0, :10] = 0.0
    gs[3][0, 0] = float("nan")  # skips its unit
    gs[5][1, 1] = float("inf")
    ms[4][1, :5] = 1.0  # with beta1 = 0.5, g = -m makes c exactly 0 while g != 0
    gs[4][1, :5] = -1.0
    return ps, ms, gs


def _step(kern: Kernel, ps, ms, gs, transpose_last: bool = False):
    ps, ms = [p.clone() for p in ps], [m.clone() for m in ms]
    gs = list(gs)
    if transpose_last:  # a non-contiguous segment (a transposed view of contiguous storage)
        ps[-1], ms[-1], gs[-1] = (t.t().contiguous().t() for t in (ps[-1], ms[-1], gs[-1]))
    rows = kern.count(ms, gs, BETAS1)
    keep = torch.tensor([True, True, True, False, True, False])
    step = torch.where(keep, torch.tensor([-0.01, -0.02, -0.03, -0.1, -0.001, -0.1]), 0.0)
    decay = torch.where(keep, torch.tensor([0.999, 0.99, 1.0, 0.9, 0.9, 0.9]), 1.0)
    kern.apply(ps, ms, gs, step, decay, keep, BETAS1, BETAS2)
    return rows, ps, ms


@pytest.mark.parametrize("dtypes", [
    [torch.float32] * 6,
    [torch.bfloat16] * 6,
    [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float32],
], ids=["fp32", "bf16", "mixed"])
@pytest.mark.parametrize("transpose_last", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("chunk", [kernel.chunked.CHUNK, 1000], ids=["one-chunk", "many-chunks"])
def test_foreach_matches_chunked_bitwise(dtypes, transpose_last, chunk, monkeypatch):
    monkeypatch.setattr(kernel.chunked, "CHUNK", chunk)
    ps, ms, gs = _case(dtypes)
    rows_c, ps_c, ms_c = _step(Kernel(False), ps, ms, gs, transpose_last)
    rows_f, ps_f, ms_f = _step(Kernel(False, foreach=True), ps, ms, gs, transpose_last)
    assert torch.equal(rows_c, rows_f)
    assert rows_c[:, 1].tolist() == [0, 0, 0, 1, 0, 1] and rows_c[3, 0] == 0
    for i, (a, b, c, d) in enumerate(zip(ps_c, ps_f, ms_c, ms_f)):
        assert torch.equal(a, b), f"parameter {i} differs"
        assert torch.equal(c, d), f"exp_avg {i} differs"
    for i in (3, 5):  # skipped units keep their values, NaN and Inf notwithstanding
        assert torch.equal(ps_f[i], ps[i]) and torch.equal(ms_f[i], ms[i])


def test_chunked_counts_sum_over_chunks(monkeypatch):
    """Chunk sums reduced per tensor equal the count written from the formula over the whole tensor,
    for empty tensors, single chunks, a ragged last chunk and a non-finite value in a middle chunk."""
    monkeypatch.setattr(kernel.chunked, "CHUNK", 7)
    gen = torch.Generator().manual_seed(3)
    shapes = [(0,), (5, 3), (40,), (7,), (13, 2), (6,)]
    ms = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    gs = [torch.randn(s, generator=gen) for s in shapes]
    gs[2][::3] = 0.0
    gs[4][5, 1] = float("inf")  # element 11: the first of 4 chunks is clean, the second is not
    rows = kernel.chunked.count(ms, gs, [0.9] * len(shapes))
    for i, (m, g) in enumerate(zip(ms, gs)):
        c = m.double() * 0.9 + g.double() * 0.1
        agree = int(((c > 0) & (g > 0) | (c < 0) & (g < 0)).sum())
        poisoned = int((~torch.isfinite(g)).any())
        expected = [0 if poisoned else agree, poisoned]
        assert rows[i].tolist() == expected, f"tensor {i}: {rows[i].tolist()} != {expected}"
        if g.numel() > 7:
            first = kernel.chunked.count([m.reshape(-1)[:7]], [g.reshape(-1)[:7]], [0.9])[0].tolist()
            assert first != expected, f"tensor {i}: its first chunk alone would pass"


@pytest.mark.parametrize("foreach", [False, True], ids=["chunked", "foreach"])
def test_without_nan_cleaning_is_caught(monkeypatch, foreach):
    """Dropping the gradient cleaning of skipped units (the chunked path's bit mask, the multi-tensor
    path's ``nan_to_num_``) lets NaN into ``exp_avg``: the comparison must see it."""
    monkeypatch.setattr(torch.Tensor, "nan_to_num_", lambda self, *a, **k: self)
    monkeypatch.setattr(torch, "bitwise_and", lambda g, mask, out=None: g if out is None else out.copy_(g))
    ps, ms, gs = _case([torch.float32] * 6)
    _, _, ms_f = _step(Kernel(False, foreach=foreach), ps, ms, gs)
    assert not torch.equal(ms_f[3], ms[3])


class _Signs(dispatch_mode()):  # type: ignore[misc]
    """Counts ``sign`` ops (in place or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket in (torch.ops.aten.sign, torch.ops.aten.sign_)
        return func(*args, **(kwargs or {}))


def _chunked_step(ps, ms, gs, signs, between=lambda gs: None, beta1s=BETAS1):
    """One chunked count and apply (with ``signs``), after ``between`` ran on the gradients in the middle;
    returns the new parameters and ``exp_avg`` and how many ``sign`` ops ran."""
    ps, ms, gs = [p.clone() for p in ps], [m.clone() for m in ms], [g.clone() for g in gs]
    keep = torch.tensor([True, True, True, False, True, False])
    values = kernel.update.StepValues(
        torch.where(keep, torch.tensor([-0.01, -0.02, -0.03, -0.1, -0.001, -0.1]), 0.0),
        torch.where(keep, torch.tensor([0.999, 0.99, 1.0, 0.9, 0.9, 0.9]), 1.0),
        keep, beta1s, BETAS2,
    )
    with _Signs() as mode:
        kernel.chunked.count(ms, gs, BETAS1, signs=signs)
        between(gs)
        kernel.chunked.apply(ps, ms, gs, values, signs=signs)
    return ps, ms, mode.calls


def test_chunked_apply_reads_the_counted_signs(monkeypatch):
    """The count stage records each element's update sign and the apply stage reads it back: ``sign``
    runs once per piece instead of twice, with the same parameters and ``exp_avg``, bitwise. A record
    whose gradient changed in place since, or asked for with another ``beta1``, is not used (the
    result equals a fresh computation); using a stale one regardless is seen, so the comparison can fail."""
    monkeypatch.setattr(kernel.chunked, "CHUNK", 1000)
    ps, ms, gs = _case([torch.float32] * 6)
    ps_r, ms_r, signs_r = _chunked_step(ps, ms, gs, kernel.chunked.Signs())
    ps_n, ms_n, signs_n = _chunked_step(ps, ms, gs, None)
    pieces = sum(-(-t.numel() // 1000) for t in ms)  # ceil: the chunks of each tensor
    assert signs_r == pieces and signs_n == 2 * pieces
    assert all(torch.equal(a, b) for a, b in zip(ps_r + ms_r, ps_n + ms_n))

    def flip(gs):
        gs[4].neg_()

    _, ms_f, signs_f = _chunked_step(ps, ms, gs, kernel.chunked.Signs(), flip)
    _, ms_fresh, _ = _chunked_step(ps, ms, gs, None, flip)
    assert signs_f == pieces + 91 and all(torch.equal(a, b) for a, b in zip(ms_f, ms_fresh))  # tensor 4 again
    beta1s = (0.9,) * 6
    ps_b, _, signs_b = _chunked_step(ps, ms, gs, kernel.chunked.Signs(), beta1s=beta1s)
    ps_bf, _, _ = _chunked_step(ps, ms, gs, None, beta1s=beta1s)
    assert signs_b == pieces + 91 + 1 and all(torch.equal(a, b) for a, b in zip(ps_b, ps_bf))  # tensors 1 and 4
    monkeypatch.setattr(kernel.chunked._torch_private, "version", lambda t: 0)
    ps_s, _, _ = _chunked_step(ps, ms, gs, kernel.chunked.Signs(), flip)
    ps_fresh, _, _ = _chunked_step(ps, ms, gs, None, flip)
    assert not torch.equal(ps_s[4], ps_fresh[4])


def test_optimizer_step_computes_each_sign_once(monkeypatch):
    """In LionSF's own step on CPU (the chunked path) the apply stage finds the signs the count stage
    recorded for the very segments it steps: one ``sign`` op per piece."""
    monkeypatch.setattr(kernel.chunked, "CHUNK", 1000)
    gen = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = LionSF(ps, lr=1e-3, foreach=False)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        with _Signs() as mode:
            opt.step()
    assert mode.calls == sum(-(-p.numel() // 1000) for p in ps)


STACK_SHAPES = [(8,)] * 6 + [(2, 3)] * 4 + [(4,)] * 3 + [(40, 30)]
STACK_BETAS = [(0.9, 0.99)] * 4 + [(0.5, 0.95)] * 2 + [(0.9, 0.99)] * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_stacks_match_tensor_by_tensor(dtype, monkeypatch):
    """Small tensors of one shape, dtypes and betas are stepped stacked as rows: counts, parameters and
    ``exp_avg`` equal those of the same tensors stepped one by one, bitwise, with a different step,
    decay and keep per row (two rows skipped for NaN and Inf). Giving every row the first row's
    ``keep`` is seen, so the comparison can fail."""
    gen = torch.Generator().manual_seed(5)
    ps = [torch.randn(s, generator=gen).to(dtype) for s in STACK_SHAPES]
    ms = [(torch.randn(s, generator=gen) * 0.1).to(dtype) for s in STACK_SHAPES]
    gs = [torch.randn(s, generator=gen).to(dtype) for s in STACK_SHAPES]
    gs[1][3] = float("nan")
    gs[7][1, 2] = float("inf")
    n = len(STACK_SHAPES)
    keep = torch.tensor([i not in (1, 7) for i in range(n)])
    step = torch.where(keep, -torch.linspace(1e-3, 2e-2, n), 0.0)
    decay = torch.where(keep, 1.0 - torch.linspace(1e-3, 1e-1, n), 1.0)
    beta1s, beta2s = [b for b, _ in STACK_BETAS], [b for _, b in STACK_BETAS]
    shapes: list[tuple] = []
    real_apply = kernel.update.apply_pieces

    def spy(pieces, *args):
        shapes.append(tuple(pieces[0][0].shape))
        return real_apply(pieces, *args)

    monkeypatch.setattr(kernel.update, "apply_pieces", spy)

    def run(stack_min: int, keep: torch.Tensor):
        monkeypatch.setattr(kernel.chunked, "STACK_MIN", stack_min)
        p2, m2 = [p.clone() for p in ps], [m.clone() for m in ms]
        kern = Kernel(False)
        rows = kern.count(m2, gs, beta1s)
        kern.apply(p2, m2, gs, step, decay, keep, beta1s, beta2s)
        return rows, p2, m2

    rows_s, ps_s, ms_s = run(4, keep)
    assert sorted(shapes[:2]) == [(4, 2, 3), (4, 8)] and len(shapes) == 2 + 2 + 3 + 1  # two stacks, 6 alone
    shapes.clear()
    rows_t, ps_t, ms_t = run(10**9, keep)
    assert len(shapes) == n
    assert torch.equal(rows_s, rows_t) and rows_s[:, 1].tolist() == [int(i in (1, 7)) for i in range(n)]
    for i in range(n):
        assert torch.equal(ps_s[i], ps_t[i]) and torch.equal(ms_s[i], ms_t[i]), f"tensor {i} differs"
    assert torch.equal(ps_s[7], ps[7]) and torch.equal(ms_s[7], ms[7])  # a skipped row keeps its values
    _, ps_w, ms_w = run(4, keep[:1].expand(n))
    assert not all(torch.equal(a, b) and torch.equal(c, d) for a, b, c, d in zip(ps_w, ps_s, ms_w, ms_s))


def test_chunked_without_scratch_matches_with_it():
    """The chunked path as the compiled and multi-tensor paths fall back to it (no scratch buffers, so
    the gradient's bit mask allocates its own result), on a stack with a skipped row: bitwise the same
    as with the buffers, and the skipped row keeps its ``exp_avg``."""
    gen = torch.Generator().manual_seed(0)
    ps, ms, gs = ([torch.randn(8, generator=gen) for _ in range(5)] for _ in range(3))
    gs[1][2] = float("nan")
    keep = torch.tensor([True, False, True, True, True])
    values = kernel.update.StepValues(
        torch.where(keep, -0.01, 0.0), torch.where(keep, 0.99, 1.0), keep, (0.9,) * 5, (0.99,) * 5
    )
    results = []
    for scratch in (None, kernel.update.Scratch(kernel.chunked.CHUNK)):
        p2, m2 = [p.clone() for p in ps], [m.clone() for m in ms]
        kernel.chunked.apply(p2, m2, gs, values, scratch=scratch)
        results.append(p2 + m2)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert torch.equal(results[0][5 + 1], ms[1]) and not torch.equal(results[0][5], ms[0])


def _meta_case(shapes, dtype=torch.float32):
    meta = torch.device("meta")
    ps = [torch.empty(s, device=meta, dtype=dtype) for s in shapes]
    return ps, [torch.empty_like(p) for p in ps], [torch.empty_like(p) for p in ps]


def _kernel_ops(kern: Kernel, shapes, dtype=torch.float32, steps: int = 2):
    """Ops of ``count`` + ``apply`` on meta tensors in the ``steps``-th call (earlier ones build caches)."""
    ps, ms, gs = _meta_case(shapes, dtype)
    n = len(ps)
    meta = torch.device("meta")
    args = (torch.empty(n, device=meta), torch.empty(n, device=meta), torch.empty(n, dtype=torch.bool, device=meta),
            (0.9,) * n, (0.99,) * n)

    def one() -> None:
        kern.count(ms, gs, (0.9,) * n)
        kern.apply(ps, ms, gs, *args)

    for _ in range(steps - 1):
        one()
    return count_ops(one, meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_ops_do_not_grow(dtype):
    """Stacks of GPT-2 small and Llama-7B shapes, more tensors or bigger ones: the same, small op count.

    (Small stacks keep the test quick: ``_foreach`` ops on meta tensors run Python
    reference code per tensor. ``launch/bench_step.py --count-ops`` counts the whole
    models: 148 and 291 tensors.)
    """
    small = _kernel_ops(Kernel(False, foreach=True), gpt2_small_shapes()[:14], dtype)
    more = _kernel_ops(Kernel(False, foreach=True), gpt2_small_shapes()[:38], dtype)
    bigger = _kernel_ops(Kernel(False, foreach=True), llama7b_shapes()[:14], dtype)
    assert small.total == more.total == bigger.total <= 60, (small.total, more.total, bigger.total)
    assert not bigger.host_inputs, bigger.host_inputs


def test_chunked_ops_grow_with_size():
    """The check above can fail: the chunked path's count grows with the elements (about 25 ops per 1 MiB chunk)."""
    small = _kernel_ops(Kernel(False), gpt2_small_shapes()[2:14])
    bigger = _kernel_ops(Kernel(False), gpt2_small_shapes()[2:26])
    assert bigger.total > 1.8 * small.total > 300


def test_foreach_rebuilds_constants_only_when_betas_change():
    """Per-segment beta2 lives on the device; a host tensor appears in the step where betas change, not after."""
    kern = Kernel(False, foreach=True)
    shapes = gpt2_small_shapes()[:12]
    ps, ms, gs = _meta_case(shapes)
    n = len(ps)
    meta = torch.device("meta")
    tensors = (torch.empty(n, device=meta), torch.empty(n, device=meta), torch.empty(n, dtype=torch.bool, device=meta))
    kern.apply(ps, ms, gs, *tensors, (0.9,) * n, (0.99,) * n)
    same = count_ops(lambda: kern.apply(ps, ms, gs, *tensors, (0.9,) * n, (0.99,) * n), meta)
    changed = count_ops(lambda: kern.apply(ps, ms, gs, *tensors, (0.9,) * n, (0.98,) * n), meta)
    assert not same.host_inputs and changed.host_inputs


def test_compiled_path_options_fit_the_device(monkeypatch):
    """``cpp.dynamic_threads`` is a CPU-only inductor option: it must not reach other devices."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw.get("options")) or fn)
    kernel.compiled._compile(kernel.compiled._compiled_count, torch.device("cpu"))
    kernel.compiled._compile(kernel.compiled._compiled_count, torch.device("meta"))
    assert seen == [{"cpp.dynamic_threads": True}, {}]


def test_foreach_views_survive_new_aliases():
    """``DTensor.to_local()`` hands a new alias of the same shard each step: no per-tensor ``view`` op follows."""
    ps, ms, gs = (list(t) for t in _case([torch.float32] * 6)[:3])
    n = len(ps)
    kern = Kernel(False, foreach=True)
    args = (torch.zeros(n), torch.ones(n), torch.ones(n, dtype=torch.bool), BETAS1, BETAS2)

    def aliased() -> None:
        kern.apply([p.view(p.shape) for p in ps], [m.view(m.shape) for m in ms], gs, *args)

    kern.apply(ps, ms, gs, *args)
    same = count_ops(lambda: kern.apply(ps, ms, gs, *args))  # warm: the views are remembered
    fresh = count_ops(aliased)
    assert fresh.ops["view"] - 2 * n == same.ops["view"], (fresh.ops["view"], same.ops["view"])  # the aliases only


class _FreshTensors(dispatch_mode()):  # type: ignore[misc]
    """Records ops that return a new tensor (no alias of an input: not in place, not ``out=``, not a view)
    of more than ``min_numel`` elements."""

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel = min_numel
        self.fresh: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if returns and all(r.alias_info is None for r in returns):
            outs = out if isinstance(out, (list, tuple)) else [out]
            if any(isinstance(t, torch.Tensor) and t.numel() > self.min_numel for t in outs):
                self.fresh.append(str(func))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_temporaries_reuse_scratch(dtype, monkeypatch):
    """A steady-state chunked step allocates no chunk-sized temporary: each goes to the kernel's scratch
    buffers (allocated chunk by chunk, they cost up to 300,000 page faults a step). The same step without
    scratch is seen allocating, so the check can fail."""
    monkeypatch.setattr(kernel.chunked, "CHUNK", 4096)  # 28 chunks: the per-step tables stay under 32 entries
    kern = Kernel(False)
    ps, ms, gs = _case([dtype] * len(SHAPES))
    n = len(ps)
    step, decay, keep = torch.full((n,), -1e-3), torch.full((n,), 0.999), torch.ones(n, dtype=torch.bool)

    def one_step() -> None:
        kern.count(ms, gs, BETAS1)
        kern.apply(ps, ms, gs, step, decay, keep, BETAS1, BETAS2)

    one_step()  # the first step allocates the buffers
    with _FreshTensors(min_numel=32) as seen:
        one_step()
    assert seen.fresh == [], seen.fresh
    monkeypatch.setattr(kern, "_scratch", None)
    with _FreshTensors(min_numel=32) as seen:
        one_step()
    assert any("mul" in name for name in seen.fresh), seen.fresh


def test_scratch_hands_out_one_buffer_per_role():
    """Whole-size requests get the role's buffer itself, smaller ones a view of it, larger ones a fresh
    tensor each time; roles never share memory (the eager stages hold several at once)."""
    scratch = kernel.update.Scratch(8)
    whole = torch.empty(8)
    a, b = scratch.take(0, whole), scratch.take(0, whole)
    assert a is b and a.dtype == torch.float32
    assert scratch.take(0, torch.empty(2, 3)).data_ptr() == a.data_ptr()
    assert scratch.take(0, torch.empty(2, 3)).shape == (2, 3)
    assert scratch.take(1, whole).data_ptr() != a.data_ptr()
    big = torch.empty(9, dtype=torch.bfloat16)
    first, second = scratch.take(0, big), scratch.take(0, big)
    assert first.dtype == torch.float32 and first.data_ptr() != second.data_ptr() != a.data_ptr()
    assert scratch.take(0, torch.empty(8, device="meta")).device.type == "meta"
    for like in (torch.empty(2, 3), big):  # the int32 view the gradient's bit mask writes through aliases the floats
        floats, bits = scratch.take_bits(2, like)
        bits.fill_(0x3F800000)  # the bits of 1.0
        assert bits.dtype == torch.int32 and bool((floats == 1.0).all()) and floats.shape == like.shape
