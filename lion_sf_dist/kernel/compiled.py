"""The compiled path (``use_triton=True``): batches of tensors through ``torch.compile``-d graphs.

One fused loop per tensor (Triton on GPU, C++ on CPU) with no temporaries: the maths of
:mod:`lion_sf_dist.kernel.update`, traced. Betas come as tensors and sizes are dynamic, so a
change of betas or of the set of tensors does not recompile; a new kind of batch past
:data:`MAX_COMPILED_VARIANTS` runs on the eager path instead, with one warning. Small
tensors of equal size (biases, norms) are stacked and stepped together by the same maths
run eagerly, a few ops per stack instead of a compiled call each
(:data:`~lion_sf_dist.kernel.tensors.STACK_NUMEL`).

Each graph is traced once, for its kind of batch, and called without dynamo's guards: the
batch plan below keeps what the guards would check (device, dtypes, flat contiguous
tensors, size classes, equal sizes within a tensor's triple), and the guards cost more
than a loop over a bias.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from lion_sf_dist._torch_private import compile_unguarded
from lion_sf_dist.devices import to_device
from lion_sf_dist.kernel import chunked, update
from lion_sf_dist.kernel.tensors import STACK_MIN, STACK_NUMEL, Views, by_key, detached_flat, pick
from lion_sf_dist.kernel.update import F32, StepValues
from lion_sf_dist.rounding import IndexMap, Rounding, random16, stochastic_bf16

# Tensors per compiled call, by device type. Sizes are dynamic and tensors flat, so one
# graph serves every batch of one dtype pattern: compile time is that of one batch, whatever
# the model, and a model whose set of tensors changes (frozen layers, MoE) keeps its graphs.
# On CPU four per call: side by side on the 144-tensor bench model, 1.47-1.56x AdamW fused
# against 1.51-1.63x for one per call (19 s cold compile against 17 s); eight compiled in
# 27 s for no further gain. On GPUs a call's host time is not hidden by small kernels, so
# calls carry 8 tensors (not measured on a GPU yet).
COMPILE_BATCH = {"cpu": 4}
DEFAULT_COMPILE_BATCH = 8


def compile_batch(device: torch.device) -> int:
    """Tensors per compiled call on ``device``."""
    return COMPILE_BATCH.get(device.type, DEFAULT_COMPILE_BATCH)


# Distinct compiled graphs per function and process (devices, dtype patterns, size classes,
# tensors per call, with/without rounding): each costs a cold compile (seconds), so a model whose kinds keep
# changing steps eagerly past this many instead of compiling without end.
MAX_COMPILED_VARIANTS = 4
_PLANS_KEPT = 4  # a step's count and apply plans (two and three lists of tensors), and the last step's
_graphs: dict[str, dict[tuple, Callable]] = {"count": {}, "apply": {}}


def _compiled_count(ms: list[Tensor], gs: list[Tensor], coefs: Tensor, take: Tensor) -> Tensor:
    """``[K, 2]`` counts of every flat ``(m, g)``; ``coefs[take[i]] = (b1, 1 - b1, b2, 1 - b2)`` in float32.

    (The per-segment tables come whole with the batch's rows ``take``: indexing inside the
    graph costs nothing, outside it an op per call.)
    """
    coefs = coefs[take]
    return torch.stack(
        [update.count_agreement(m, g, (coefs[i, 0], coefs[i, 1])) for i, (m, g) in enumerate(zip(ms, gs))]
    )


def _compiled_apply(
    ps: list[Tensor],
    ms: list[Tensor],
    gs: list[Tensor],
    step_size: Tensor,
    decay: Tensor,
    keep: Tensor,
    coefs: Tensor,
    keys: Optional[Tensor],
    where: Optional[Tensor],
    take: Tensor,
) -> None:
    """``update.apply_update`` of every flat tensor; with ``keys`` (``[K, 2]``) stochastic rounding. All
    tables come whole, with the batch's rows ``take``.

    ``where[i] = (base, outer stride, inner stride, inner size)``: local flat position ``j``
    is logical element ``base + (j // inner size) * outer stride + (j % inner size) * inner stride``
    (an :class:`IndexMap` of at most two merged dims, as tensors so that no offset is compiled in).
    """
    step_size, decay, keep, coefs = step_size[take], decay[take], keep[take], coefs[take]
    keys = None if keys is None else keys[take]
    where = None if where is None else where[take]
    for i, (p, m, g) in enumerate(zip(ps, ms, gs)):
        draws = None
        if keys is not None and where is not None:
            j = torch.arange(p.numel(), device=p.device)
            base, outer, inner, size = where[i].unbind()
            positions = base + (j // size) * outer + (j % size) * inner
            draws = (_bits_draw(keys[i, 0], positions), _bits_draw(keys[i, 1], positions))
        update.apply_update(
            p,
            m,
            g,
            step_size[i],
            decay[i],
            keep[i],
            (coefs[i, 0], coefs[i, 1]),
            (coefs[i, 2], coefs[i, 3]),
            draws=draws,
        )


def _bits_draw(key: Tensor, positions: Tensor) -> Callable[[Tensor], Tensor]:
    def draw(value: Tensor) -> Tensor:
        return stochastic_bf16(value, random16(key, positions))

    return draw


def _compile(fn: Callable, device: torch.device) -> Callable:
    """``torch.compile`` of a batch function, with options that fit ``device``.

    ``cpp.dynamic_threads`` (CPU only: inductor's C++ backend) keeps every CPU loop
    parallel; inductor otherwise left small ones on one thread.
    """
    options: dict[str, str | int | bool | Callable[..., Any]] = {}
    if device.type == "cpu":
        options["cpp.dynamic_threads"] = True
    return torch.compile(fn, dynamic=True, fullgraph=True, options=options)


def _index_rows(index: Sequence[IndexMap]) -> Optional[list[tuple[int, int, int, int]]]:
    """``where`` rows for :func:`_compiled_apply`, or ``None`` when a map has more than two merged dims."""
    rows = []
    for imap in index:
        if len(imap.sizes) == 1:
            rows.append((imap.base, 0, imap.strides[0], max(imap.sizes[0], 1)))
        elif len(imap.sizes) == 2:
            rows.append((imap.base, imap.strides[0], imap.strides[1], imap.sizes[1]))
        else:
            return None
    return rows


class _Batches:
    """How one step's tensors are cut into compiled calls and eager stacks, from their :func:`_signature`.

    ``eager``: tensors that are not all contiguous (a compiled call takes its tensors flat;
    a transposed parameter, or its contiguous gradient from a DDP bucket) and, when
    ``counting``, tensors too large for a compiled count's int32 sums
    (:data:`~lion_sf_dist.kernel.update.EXACT_INT32_COUNT`): these run on the chunked eager
    path. ``stacks``: small tensors of one size and dtypes, :data:`STACK_MIN` or more (when
    ``stacking``). The others, by dtypes and size class (0, 1, more elements: dynamo
    specialises sizes 0 and 1), in batches of :func:`compile_batch`, the last one padded
    with small dummy tensors (step 0, kept unchanged). Rows come back batches first, then
    stacks, then eager segments; ``inverse`` puts them in the tensors' order. Index tensors
    live on the device.
    """

    def __init__(
        self, signatures: Sequence[tuple], lists: int, device: torch.device, stacking: bool, counting: bool
    ) -> None:
        n = len(signatures)
        size = compile_batch(device)
        for sig in signatures:
            if len(set(sig[:lists])) > 1:  # the graphs run unguarded: a mismatch would read past a tensor
                raise ValueError(
                    f"LionSF's compiled kernel got one parameter's tensors with different sizes {sig[:lists]}"
                )
        self.eager = [
            i for i, sig in enumerate(signatures) if not sig[lists] or (counting and sig[0] >= update.EXACT_INT32_COUNT)
        ]
        by_size = by_key([_stack_kind(sig, lists) if stacking else None for sig in signatures])
        self.stacks = [idx for kind, idx in by_size.items() if kind is not None and len(idx) >= STACK_MIN]
        elsewhere = {i for idx in self.stacks for i in idx} | set(self.eager)
        rest = [i for i in range(n) if i not in elsewhere]
        kinds = by_key([(*signatures[i][lists + 1 :], min(signatures[i][0], 2)) for i in rest])
        self.batches: list[tuple[tuple, list[int]]] = []
        for kind, among_rest in kinds.items():
            idx = pick(rest, among_rest)
            for start in range(0, len(idx), size):
                part = idx[start : start + size]
                self.batches.append((kind, part + [n] * (size - len(part))))
        order = [i for _, part in self.batches for i in part] + [i for idx in self.stacks for i in idx] + self.eager
        inverse = [0] * n
        for pos, i in enumerate(order):
            if i < n:  # not a dummy's row
                inverse[i] = pos
        self.take = [to_device(torch.tensor(part, dtype=torch.int64), device) for _, part in self.batches]
        self.stack_take = [to_device(torch.tensor(idx, dtype=torch.int64), device) for idx in self.stacks]
        self.inverse = to_device(torch.tensor(inverse, dtype=torch.int64), device)
        # distinct dummies per slot: a graph traced on a batch of dummies must not assume its inputs alias
        self.dummies = {
            kind: [[torch.zeros(kind[-1], dtype=dtype, device=device) for _ in range(size)] for dtype in kind[:-1]]
            for kind, _ in self.batches
        }

    def lists(self, b: int, *tensor_lists: Sequence[Tensor]) -> list[list[Tensor]]:
        """The ``b``-th batch of each (already flat and detached) list, padded with the batch's dummies."""
        kind, part = self.batches[b]
        dummies = self.dummies[kind]
        return [
            [ts[i] if i < len(ts) else dummies[k][slot] for slot, i in enumerate(part)]
            for k, ts in enumerate(tensor_lists)
        ]


def _signature(ts: Sequence[Tensor]) -> tuple:
    """What a step's plan depends on, for one tensor's ``(p, m, g)`` or ``(m, g)``: their sizes,
    whether all are contiguous, their dtypes."""
    return (*(t.numel() for t in ts), all(t.is_contiguous() for t in ts), *(t.dtype for t in ts))


def _stack_kind(sig: tuple, lists: int) -> Optional[tuple]:
    """What tensors must share to be stacked (size and dtypes), or ``None`` when they cannot be."""
    if sig[0] > STACK_NUMEL or not sig[lists]:
        return None
    return (sig[0], *sig[lists + 1 :])


def _stacked_count(ms: list[Tensor], gs: list[Tensor], coefs: Tensor) -> Tensor:
    """``[K, 2]`` counts of flat tensors of one size, stacked as rows; ``coefs`` their ``[K, 4]`` rows."""
    return update.count_agreement(torch.stack(ms), torch.stack(gs), (coefs[:, 0:1], coefs[:, 1:2]), rows=True)


def _stacked_apply(
    ps: list[Tensor], ms: list[Tensor], gs: list[Tensor], step_size: Tensor, decay: Tensor, keep: Tensor, coefs: Tensor
) -> None:
    """:func:`~lion_sf_dist.kernel.chunked.apply_stacked` of flat tensors of one size, with betas as tensors.

    ``step_size``, ``decay``, ``keep`` (``[K]``) and ``coefs`` (``[K, 4]``): the stack's rows of the step's tables.
    """
    betas = (coefs[:, 0:1], coefs[:, 1:2]), (coefs[:, 2:3], coefs[:, 3:4])
    chunked.apply_stacked((ps, ms, gs), (step_size, decay, keep), betas)


def _padded(values: Tensor, fill: float | bool) -> Tensor:
    """``values`` with one more row (``fill``) for the dummies to index."""
    return torch.cat((values, torch.full((1, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)))


class CompiledKernel:
    """The compiled path's state: its batch plans, per-segment tables and flat views (the graphs are the process's).

    :meth:`count` and :meth:`apply` return ``None`` / ``False`` when they did nothing (a new
    kind of batch past :data:`MAX_COMPILED_VARIANTS`, or inductor unable to compile ahead
    of time), and the caller runs an eager path instead.
    """

    def __init__(self) -> None:
        self._coefs: Optional[tuple[tuple, Tensor]] = None
        self._batches: dict[tuple, _Batches] = {}  # by device and tensor signatures, oldest first
        self._where: Optional[tuple[tuple, Optional[Tensor]]] = None
        self._views = Views()
        self._warned = False

    def count(self, ms: Sequence[Tensor], gs: Sequence[Tensor], beta1s: Sequence[float]) -> Optional[Tensor]:
        """``[S, 2]`` counts as the eager paths give them, or ``None`` (nothing ran) when a batch cannot be compiled."""
        device = ms[0].device
        plan = self._plan((ms, gs), device, stacking=True, counting=True)
        coefs = self._coef_tensor(beta1s, beta1s, device, padded=True)
        flat_ms, flat_gs = self._views.persistent(ms), detached_flat(gs)
        calls = [(*plan.lists(b, flat_ms, flat_gs), coefs, take) for b, take in enumerate(plan.take)]
        graphs = self._compiled_graphs("count", _compiled_count, plan, False, device, calls)
        if graphs is None:
            return None
        parts = [graph(*args) for graph, args in zip(graphs, calls)]
        for idx, take in zip(plan.stacks, plan.stack_take):
            parts.append(_stacked_count(pick(flat_ms, idx), pick(flat_gs, idx), coefs[take]))
        if plan.eager:
            parts.append(chunked.count(pick(ms, plan.eager), pick(gs, plan.eager), pick(beta1s, plan.eager)))
        return torch.cat(parts)[plan.inverse]

    def apply(
        self,
        ps: Sequence[Tensor],
        ms: Sequence[Tensor],
        gs: Sequence[Tensor],
        values: StepValues,
    ) -> bool:
        """Run the compiled apply; ``False`` (nothing done) when a batch cannot be compiled."""
        rounding = values.rounding
        device = ps[0].device
        plan = self._plan((ps, ms, gs), device, stacking=rounding is None, counting=False)
        where = self._where_tensor(rounding, device) if rounding is not None else None
        if rounding is not None and where is None:
            return False  # a shard layout of more than two merged dims: the eager paths handle any
        coefs = self._coef_tensor(values.beta1s, values.beta2s, device, padded=True)
        step_size, decay, keep = _padded(values.step_size, 0.0), _padded(values.decay, 1.0), _padded(values.keep, False)
        keys = _padded(rounding.keys(), 0) if rounding is not None else None
        lists = (*self._views.refresh(ps, ms), detached_flat(gs))
        tables = (step_size, decay, keep, coefs, keys, where)
        calls = [(*plan.lists(b, *lists), *tables, take) for b, take in enumerate(plan.take)]
        graphs = self._compiled_graphs("apply", _compiled_apply, plan, rounding is not None, device, calls)
        if graphs is None:
            return False
        for graph, args in zip(graphs, calls):
            graph(*args)
        for idx, take in zip(plan.stacks, plan.stack_take):
            rows = (step_size[take], decay[take], keep[take], coefs[take])
            _stacked_apply(pick(lists[0], idx), pick(lists[1], idx), pick(lists[2], idx), *rows)
        if plan.eager:
            chunked.apply(ps, ms, gs, values, only=plan.eager)
        return True

    def _plan(
        self, lists: tuple[Sequence[Tensor], ...], device: torch.device, stacking: bool, counting: bool
    ) -> _Batches:
        """The batch plan of these tensors, kept for the next steps (count's and apply's alike)."""
        signatures = tuple(_signature(ts) for ts in zip(*lists))
        key = (device, stacking, counting, signatures)
        if key not in self._batches:
            if len(self._batches) >= _PLANS_KEPT:
                del self._batches[next(iter(self._batches))]
            self._batches[key] = _Batches(signatures, len(lists), device, stacking, counting)
        return self._batches[key]

    def _compiled_graphs(
        self, name: str, fn: Callable, plan: _Batches, rounding: bool, device: torch.device, calls: list[tuple]
    ) -> Optional[list[Callable]]:
        """The compiled graph of each batch of ``plan`` (``calls``: its arguments), compiling new kinds now
        (without running them), or ``None`` when one cannot be: then nothing has run."""
        graphs = _graphs[name]
        out = []
        for (kind, part), args in zip(plan.batches, calls):
            key = (device, kind, len(part), rounding)
            if key not in graphs:
                if len(graphs) >= MAX_COMPILED_VARIANTS:
                    self._warn_fallback(
                        f"more than {MAX_COMPILED_VARIANTS} kinds of tensor batches (devices, dtypes, size classes, "
                        "rounding) were compiled in this process"
                    )
                    return None
                graph = compile_unguarded(_compile(fn, device), args)
                if graph is None:
                    self._warn_fallback(
                        "inductor's caches are disabled (TORCHINDUCTOR_FORCE_DISABLE_CACHES), and compiling "
                        "a graph ahead of its calls needs them"
                    )
                    return None
                graphs[key] = graph
            out.append(graphs[key])
        return out

    def _where_tensor(self, rounding: Rounding, device: torch.device) -> Optional[Tensor]:
        key = (rounding.index, device)
        if self._where is None or self._where[0] != key:
            rows = _index_rows(rounding.index)
            where = None if rows is None else _padded(to_device(torch.tensor(rows, dtype=torch.int64), device), 1)
            self._where = (key, where)
        return self._where[1]

    def _coef_tensor(
        self, beta1s: Sequence[float], beta2s: Sequence[float], device: torch.device, padded: bool = False
    ) -> Tensor:
        """``[S, 4]`` float32 ``(b1, 1 - b1, b2, 1 - b2)`` on ``device`` (``padded``: and a zero row for dummies),
        rebuilt only when the betas change."""
        key = (tuple(beta1s), tuple(beta2s), device, padded)
        if self._coefs is None or self._coefs[0] != key:
            rows = [(b1, 1.0 - b1, b2, 1.0 - b2) for b1, b2 in zip(beta1s, beta2s)] + ([(0.0,) * 4] if padded else [])
            host = torch.tensor(rows, dtype=torch.float64).to(F32)
            self._coefs = (key, to_device(host, device))
        return self._coefs[1]

    def _warn_fallback(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"LionSF(use_triton=True): {reason}; such tensors now run on the eager path, with the same maths",
                RuntimeWarning,
                stacklevel=4,
            )
