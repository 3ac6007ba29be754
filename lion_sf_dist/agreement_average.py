"""The per-unit agreement average of ``agreement_ema=True``: its one owner.

The average ``sa_U`` is one float32 vector over the units, identical on every rank. Its
single representation in the optimizer's state is that same vector, referenced under
``"agreement_ema"`` from every state entry (each parameter, or each ZeRO partition), so
``state_dict()``, DeepSpeed's engine checkpoints and DCP all carry it without special
cases; after a load gave the entries separate copies, :meth:`AgreementAverage.adopt` takes
the first entry's again. Checkpoints read and write it through :meth:`values` and
:meth:`load` (docs/CONTRACT.md section 10).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

KEY = "agreement_ema"


class AgreementAverage:
    """Holds ``sa_U`` for ``count`` units and keeps every state entry pointing at it."""

    def __init__(self) -> None:
        self._vector: Optional[Tensor] = None

    def adopt(self, state: dict[Any, dict[str, Any]], count: int) -> None:
        """Take the vector a load put into ``state`` (the first entry holding one of ``count`` units), if any."""
        loaded = next((st[KEY] for st in state.values() if KEY in st and tuple(st[KEY].shape) == (count,)), None)
        self._vector = loaded.detach().float().clone() if loaded is not None else None

    def vector(self, state: dict[Any, dict[str, Any]], count: int, device: torch.device) -> Tensor:
        """The vector on ``device`` (zeros at first use), referenced from every entry of ``state``."""
        old = self._vector
        fits = old is not None and old.shape == (count,)
        v = old.to(device) if old is not None and fits else torch.zeros(count, dtype=torch.float32, device=device)
        self._vector = v
        for st in state.values():
            if st.get(KEY) is not v:
                st[KEY] = v
        return v

    def values(self) -> Optional[Tensor]:
        """A host copy of the per-unit averages, ``None`` before the first step or load."""
        return None if self._vector is None else self._vector.detach().float().cpu().clone()

    def load(self, values: Optional[Tensor], state: dict[Any, dict[str, Any]], device: torch.device) -> None:
        """Replace the averages, on ``device``, in every entry of ``state`` (``None``: afresh, entries dropped)."""
        if values is None:
            self._vector = None
            for st in state.values():
                st.pop(KEY, None)
            return
        self._vector = values.detach().float().to(device).clone()
        self.vector(state, len(values), device)
