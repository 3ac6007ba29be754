"""Stochastic rounding to bfloat16 that is the same at every world size and sharding.

A float32 result ``x`` lies between two neighbouring bfloat16 values ``lo <= x <= hi``; it
is stored as ``hi`` with probability ``(x - lo) / (hi - lo)``, so the stored value is ``x``
on average and updates smaller than a bfloat16 ulp still move a weight. The 16 random
bits come from a counter-based hash (SplitMix64's finaliser) of

* a seed fixed when the optimizer is built,
* the step count (a device tensor: no host traffic, no recompilation),
* which logical parameter (an id every rank agrees on) and which stream (``p`` or ``exp_avg``),
* the element's flat index in the logical, unsharded parameter (:class:`IndexMap`),

and of nothing else: not the rank, the world size, the shard or the chunking. The hash is
int64 tensor arithmetic (wrapping multiplies, masked shifts), so it runs eager, under
``torch.compile``, on CPU and CUDA alike and never synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from lion_sf_dist._torch_private import version as tensor_version
from lion_sf_dist.devices import to_device

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(x: int) -> int:
    """The int64 with the two's-complement bits of ``x mod 2**64``."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _srl(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 ``z`` (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors: a bijection whose every output bit depends on every input bit."""
    z = (z ^ _srl(z, 30)) * _signed(_MIX1)
    z = (z ^ _srl(z, 27)) * _signed(_MIX2)
    return z ^ _srl(z, 31)


def mix64_int(z: int) -> int:
    """:func:`mix64` on a Python int (for host-side key derivation); returns the signed int64."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return _signed(z ^ (z >> 31))


@dataclass(frozen=True)
class IndexMap:
    """Where a local tensor's elements sit in the flat (row-major) logical parameter.

    The local element at multi-index ``(i_0, ..., i_k)`` (local row-major order) is element
    ``base + sum(i_d * strides[d])`` of the logical parameter.
    """

    base: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]

    @classmethod
    def slice(cls, base: int, numel: int) -> "IndexMap":
        """A contiguous run of ``numel`` logical elements from ``base`` (a ZeRO partition's piece, a whole tensor)."""
        return cls(base, (numel,), (1,))

    @classmethod
    def shard(cls, logical_shape: Sequence[int], local_shape: Sequence[int], offsets: Sequence[int]) -> "IndexMap":
        """The block of shape ``local_shape`` starting at ``offsets`` of a row-major tensor of ``logical_shape``.

        Covers a DTensor shard along any dim (and nested shards): ``offsets`` is the local
        block's global offset per dim, as ``compute_local_shape_and_global_offset`` gives.
        """
        strides, acc = [], 1
        for size in reversed(list(logical_shape)):
            strides.append(acc)
            acc *= size
        strides.reverse()
        base = sum(o * s for o, s in zip(offsets, strides))
        return cls(base, tuple(local_shape), tuple(strides)).merged()

    def merged(self) -> "IndexMap":
        """The same map with size-1 dims dropped and dims that continue each other merged."""
        dims = [(n, s) for n, s in zip(self.sizes, self.strides) if n != 1]
        out: list[tuple[int, int]] = []
        for n, s in dims:
            if out and out[-1][1] == s * n:
                out[-1] = (out[-1][0] * n, s)
            else:
                out.append((n, s))
        if not out:
            out = [(1, 1)]
        return IndexMap(self.base, tuple(n for n, _ in out), tuple(s for _, s in out))

    def positions(self, start: int, n: int, device: torch.device) -> Tensor:
        """Logical flat indices (int64) of local flat positions ``start .. start + n - 1``."""
        sizes, strides = self.sizes, self.strides
        if len(sizes) == 1:
            if strides[0] == 1:
                return torch.arange(self.base + start, self.base + start + n, dtype=torch.int64, device=device)
            return torch.arange(start, start + n, dtype=torch.int64, device=device) * strides[0] + self.base
        j = torch.arange(start, start + n, dtype=torch.int64, device=device)
        idx = j % sizes[-1] * strides[-1] + self.base
        inner = sizes[-1]
        for size, stride in reversed(list(zip(sizes[:-1], strides[:-1]))):
            idx = idx + (j // inner) % size * stride
            inner *= size
        return idx


class Rounding:
    """What stochastic rounding needs for the segments of one step, in segment order.

    ``ids[i]``: the logical parameter segment ``i`` belongs to (the same on every rank,
    e.g. its position in the model's parameter list); ``index[i]``: where its local
    elements sit in that parameter. ``step``: the step count, a Python int (set it before
    each step; it enters the keys as a kernel scalar, no host-to-device copy) or a 0-d
    int64 device tensor advanced in place. A ``Rounding`` may be kept and reused while the
    segments stay the same; its per-segment keys then stay on the device.
    """

    def __init__(self, seed: int, step: int | Tensor, ids: Sequence[int], index: Sequence[IndexMap]) -> None:
        if len(ids) != len(index):
            raise ValueError(f"Rounding: {len(ids)} ids for {len(index)} index maps")
        self.seed = seed
        self.step = step
        self.ids = tuple(ids)
        self.index = tuple(index)
        self._base_keys: Optional[Tensor] = None
        self._keys: Optional[tuple[tuple, Tensor]] = None
        self.device: Optional[torch.device] = None

    def base_keys(self) -> Tensor:
        """``[S, 2]`` int64 on the step's device: a key per segment and stream (0: ``p``, 1: ``exp_avg``)."""
        if self._base_keys is None:
            host = [
                [mix64_int(mix64_int(self.seed * 4 + stream) ^ (tid * _GOLDEN)) for stream in (0, 1)]
                for tid in self.ids
            ]
            cpu = torch.tensor(host, dtype=torch.int64).view(len(self.ids), 2)
            self._base_keys = to_device(cpu, self._device())
        return self._base_keys

    def keys(self) -> Tensor:
        """``[S, 2]`` int64: this step's keys (mixed with ``step``), computed once per step value."""
        step = self.step
        stamp = ("int", step) if isinstance(step, int) else ("tensor", id(step), tensor_version(step))
        if self._keys is None or self._keys[0] != stamp:
            self._keys = (stamp, step_keys(self.base_keys(), step))
        return self._keys[1]

    def _device(self) -> torch.device:
        if isinstance(self.step, Tensor):
            return self.step.device
        if self.device is None:
            raise ValueError("Rounding with an int step needs its device: set Rounding.device")
        return self.device

    def bits(self, seg: int, stream: int, start: int, shape: torch.Size, device: torch.device) -> Tensor:
        """16 random bits (int64 in ``[0, 2**16)``) shaped ``shape``, for local positions ``start ..`` of ``seg``."""
        n = 1
        for s in shape:
            n *= s
        return random16(self.keys()[seg, stream], self.index[seg].positions(start, n, device)).view(shape)


def step_keys(base: Tensor, step: int | Tensor) -> Tensor:
    """Per-step keys from per-segment base keys (int64 tensor) and the step count (int or int64 tensor)."""
    if isinstance(step, Tensor):
        return mix64(base + step * _signed(_GOLDEN))
    return mix64(base + _signed(step * _GOLDEN))


def random16(key: Tensor, index: Tensor) -> Tensor:
    """16 bits per element: SplitMix64 output number ``index + 1`` of the stream ``key``."""
    return _srl(mix64(key + (index + 1) * _signed(_GOLDEN)), 48)


def stochastic_bf16(x: Tensor, r: Tensor) -> Tensor:
    """float32 ``x`` rounded to a bfloat16 value (returned as float32, exactly representable) with bits ``r``.

    Adding ``r`` in ``[0, 2**16)`` to the 16 bits bfloat16 drops and truncating carries
    into the kept bits with probability (dropped bits) / 2**16: rounding away from zero in
    proportion to the distance. Works for both signs (the magnitude is what the bits hold),
    subnormals and the largest finite values (which may round up to Inf, as nearest does);
    NaN stays NaN.
    """
    bits = x.view(torch.int32)
    y = ((bits + r.to(torch.int32)) & -65536).view(torch.float32)
    return torch.where(x.isnan(), x, y)
