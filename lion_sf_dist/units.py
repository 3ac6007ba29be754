"""Agreement units: which elements share one sign-agreement scale (docs/CONTRACT.md section 3).

A unit assignment is made from the optimizer's param groups by position (group index,
index in the group), so it survives frameworks that swap the parameter tensors in
``param_groups`` after construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from lion_sf_dist.options import AGREEMENTS, Agreement, check_choice


@dataclass(frozen=True)
class Units:
    """``ids[i][j]``: unit of parameter ``j`` of group ``i``; ``names[u]``: a readable name of unit ``u``;
    ``first_group[u]``: the param group of the unit's first parameter (whose betas its agreement average uses)."""

    ids: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]
    first_group: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.names)


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def assign_units(param_groups: Sequence[dict[str, Any]], agreement: Agreement) -> Units:
    """Assign every parameter of ``param_groups`` to a unit, in parameter order.

    ``"module"`` pools parameters whose names share the prefix before the last ``.``
    (across param groups) and so needs ``param_names`` in every group, which
    ``torch.optim.Optimizer`` records when given ``model.named_parameters()``.
    """
    check_choice("agreement", agreement, AGREEMENTS)
    if agreement == "module":
        missing = [i for i, g in enumerate(param_groups) if g["params"] and "param_names" not in g]
        if missing:
            raise ValueError(
                f'agreement="module" needs parameter names, but param group(s) {missing} have none: '
                "pass model.named_parameters() (or (name, tensor) pairs) instead of model.parameters()"
            )
    names: dict[str, int] = {}
    first_group: list[int] = []
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
            if key not in names:
                names[key] = len(names)
                first_group.append(gi)
            row.append(names[key])
        ids.append(tuple(row))
    return Units(ids=tuple(ids), names=tuple(names), first_group=tuple(first_group))
