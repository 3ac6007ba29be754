"""Helpers the kernel's paths share: grouping by key, stacking small tensors, and flat views that last across steps."""

from __future__ import annotations

from typing import Any, Hashable, Sequence

from torch import Tensor

# Tensors of at most this many elements, STACK_MIN or more of one size and dtypes, are stacked as
# rows and stepped together by update's functions run eagerly on the stack: a constant number of
# ops per stack. Per tensor, a compiled call's fixed cost (~50 us of dynamo guards and wrappers on
# CPU) or the chunked path's 15 eager ops (~40 us) are many times the work on so few elements;
# GPT-2 small has 98 such tensors of 148, Llama-7B 65 of 291.
STACK_NUMEL = 1 << 14
STACK_MIN = 4


def flat(t: Tensor) -> Tensor:
    """A 1-D view when ``t`` is contiguous (every tensor then shares one generated loop), else ``t``."""
    return t.view(-1) if t.is_contiguous() else t


def by_key(keys: Sequence[Hashable]) -> dict[Any, list[int]]:
    """Positions sharing a key, in order of first appearance."""
    out: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


def pick(xs: Sequence, idx: Sequence[int]) -> list:
    return [xs[i] for i in idx]


class Views:
    """Flat, detached views of tensors that persist from step to step (parameters, ``exp_avg``).

    Keyed by where the elements live, not by the tensor object: ``DTensor.to_local()``
    returns a new alias each step. A remembered view keeps its storage alive, so no other
    tensor can later appear at the same address. Non-contiguous tensors are only detached.
    """

    def __init__(self) -> None:
        self._views: dict[tuple, tuple[Tensor, Tensor]] = {}

    def flat(self, t: Tensor) -> Tensor:
        key = _where_in_memory(t)
        hit = self._views.get(key)
        if hit is not None:
            return hit[1]
        view = flat(t).detach()
        self._views[key] = (t, view)
        return view

    def persistent(self, ts: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`flat` of each of ``ts``."""
        return [self.flat(t) for t in ts]

    def refresh(self, *lists: Sequence[Tensor]) -> list[list[Tensor]]:
        """:meth:`flat` of each tensor of ``lists``, forgetting the views of every other tensor (a step's
        persistent tensors, once a step: each tensor's key is computed once)."""
        old, self._views = self._views, {}
        out = []
        for ts in lists:
            views = []
            for t in ts:
                key = _where_in_memory(t)
                hit = old.get(key) or self._views.get(key) or (t, flat(t).detach())
                self._views[key] = hit
                views.append(hit[1])
            out.append(views)
        return out


def detached_flat(ts: Sequence[Tensor]) -> list[Tensor]:
    """Flat (when contiguous) detached views of tensors that change every step (gradients).

    Compiled calls take tensors flat and detached (same storage, no ``_base``): a graph
    traced on views would take its inputs for aliases of their bases, and views of
    differently shaped parameters, and the dummies, would not fit one graph.
    """
    return [flat(t).detach() for t in ts]


def _where_in_memory(t: Tensor) -> tuple:
    """Identifies the elements ``t`` views: address, layout, dtype (meta tensors have no address: their identity)."""
    address = id(t) if t.device.type == "meta" else t.data_ptr()
    return (t.device, t.dtype, address, tuple(t.shape), t.stride())
