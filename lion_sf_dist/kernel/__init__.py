"""The LionSF update rule and the three paths that run it over all tensors of a step.

The arithmetic is written once, in :mod:`lion_sf_dist.kernel.update` (``count_agreement``,
``scales_from_counts``, ``apply_update``). :class:`Kernel` runs its stages over lists of
local tensors on one of three paths, with the same maths:

* :mod:`~lion_sf_dist.kernel.chunked` (eager, tensor by tensor in cache-sized chunks:
  temporaries stay small; the CPU default);
* :mod:`~lion_sf_dist.kernel.multi_tensor` (eager ``torch._foreach_*`` ops: a constant
  number of dispatched ops per step whatever the sizes and number of tensors; the GPU default);
* :mod:`~lion_sf_dist.kernel.compiled` (``torch.compile``: one fused loop per tensor).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lion_sf_dist.kernel import chunked
from lion_sf_dist.kernel.compiled import CompiledKernel
from lion_sf_dist.kernel.multi_tensor import MultiTensorKernel
from lion_sf_dist.kernel.update import Scratch, StepValues, apply_update, count_agreement, scales_from_counts
from lion_sf_dist.rounding import Rounding

__all__ = ["Kernel", "apply_update", "count_agreement", "scales_from_counts"]


class Kernel:
    """Runs :func:`count_agreement` and :func:`apply_update` over lists of tensors.

    ``compiled``: batches of tensors through ``torch.compile``-d calls (no temporaries at
    all); a new kind of batch past the compiled path's variant budget runs on the eager path
    instead, with one warning. ``foreach``: ``True`` the eager multi-tensor path, ``False``
    the eager chunked path (cache-sized chunks, tensor by tensor), ``None`` multi-tensor on
    every non-CPU device and chunked on CPU. The compiled path's eager fallback is that
    eager path.
    """

    def __init__(self, compiled: bool, foreach: Optional[bool] = False) -> None:
        self.compiled = compiled
        self.foreach = foreach
        self._multi = MultiTensorKernel()
        self._compiled = CompiledKernel() if compiled else None
        self._scratch = Scratch(chunked.CHUNK)
        self._signs = chunked.Signs()

    def _multi_tensor(self, device: torch.device) -> Optional[MultiTensorKernel]:
        """The multi-tensor kernel when it is the eager path for ``device`` (``foreach=None``: on every non-CPU one)."""
        use = self.foreach if self.foreach is not None else device.type != "cpu"
        return self._multi if use else None

    def count(self, ms: Sequence[Tensor], gs: Sequence[Tensor], beta1s: Sequence[float]) -> Tensor:
        """``[S, 2]`` int64: :func:`count_agreement` of each ``(m, g)``; ``A`` is 0 where ``P > 0``.

        (A tensor with a non-finite gradient skips its unit; the paths' raw counts differ
        there, so its ``A`` is set to 0 on all of them and ``last_agreement`` does not
        depend on the path.)
        """
        rows = self._compiled.count(ms, gs, beta1s) if self._compiled is not None else None
        if rows is None:
            multi = self._multi_tensor(ms[0].device)
            rows = (
                multi.count(ms, gs, beta1s)
                if multi is not None
                else chunked.count(ms, gs, beta1s, self._scratch, self._signs)
            )
        return torch.stack((rows[:, 0] * (rows[:, 1] == 0), rows[:, 1]), dim=1)

    def apply(
        self,
        ps: Sequence[Tensor],
        ms: Sequence[Tensor],
        gs: Sequence[Tensor],
        step_size: Tensor,
        decay: Tensor,
        keep: Tensor,
        beta1s: Sequence[float],
        beta2s: Sequence[float],
        rounding: Optional[Rounding] = None,
    ) -> None:
        """:func:`apply_update` on each ``(p, m, g)`` with the ``i``-th entry of ``step_size``, ``decay``, ``keep``.

        ``rounding``: stochastic rounding of bfloat16 ``p`` and ``exp_avg`` (else to nearest).
        """
        values = StepValues(step_size, decay, keep, beta1s, beta2s, rounding)
        if self._compiled is not None and self._compiled.apply(ps, ms, gs, values):
            return
        multi = self._multi_tensor(ps[0].device)
        if multi is not None:
            multi.apply(ps, ms, gs, values)
            return
        chunked.apply(ps, ms, gs, values, scratch=self._scratch, signs=self._signs)

    # -- compiled ---------------------------------------------------------------------
