"""Agreement units: which elements share one sign-agreement scale (SPEC section 2).

A unit assignment is made from the optimizer's param groups by position (group index,
index in the group), so it survives frameworks that swap the parameter tensors in
``param_groups`` after construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

AGREEMENTS = ("tensor", "module", "group", "global")


@dataclass(frozen=True)
class Units:
    """``ids[i][j]``: unit of parameter ``j`` of group ``i``; ``names[u]``: a readable name of unit ``u``."""

    ids: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.names)


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def assign_units(param_groups: Sequence[dict[str, Any]], agreement: str) -> Units:
    """Assign every parameter of ``param_groups`` to a unit, in parameter order.

    ``"module"`` pools parameters whose names share the prefix before the last ``.``
    (across param groups) and so needs ``param_names`` in every group, which
    ``torch.optim.Optimizer`` records when given ``model.named_parameters()``.
    """
    if agreement not in AGREEMENTS:
        raise ValueError(f"agreement must be one of {AGREEMENTS}, got {agreement!r}")
    if agreement == "module":
        missing = [i for i, g in enumerate(param_groups) if g["params"] and "param_names" not in g]
        if missing:
            raise ValueError(
                f'agreement="module" needs parameter names, but param group(s) {missing} have none: '
                "pass model.named_parameters() (or (name, tensor) pairs) instead of model.parameters()"
            )
    names: dict[str, int] = {}
    ids = []
    for gi, group in enumerate(param_groups):
        row = []
        for pi in range(len(group["params"])):
            pname = group.get("param_names", [None] * len(group["params"]))[pi]
            if agreement == "tensor":
                key = pname if pname is not None else f"group{gi}.param{pi}"
                key = f"{key}#{gi}.{pi}" if key in names else key
            elif agreement == "module":
                key = _module_of(pname) or "<root>"
            elif agreement == "group":
                key = f"group{gi}"
            else:
                key = "global"
            row.append(names.setdefault(key, len(names)))
        ids.append(tuple(row))
    return Units(ids=tuple(ids), names=tuple(names))
