"""LionSF: Lion whose step is scaled by the sign agreement of each unit (SPEC sections 1-8).

A step is four stages over :class:`~lion_sf_dist.layouts.Segment` s (local pieces of
parameters): count the agreement of each piece, sum the counts per unit across ranks
(one collective per process group), turn them into per-unit scales, apply the update.
The arithmetic lives in :mod:`lion_sf_dist.kernel`; how parameters are spread over ranks
lives in :mod:`lion_sf_dist.layouts`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer

from lion_sf_dist.kernel import Kernel, unit_scales
from lion_sf_dist.layouts.params import check_params, param_segments
from lion_sf_dist.layouts.segment import Segment
from lion_sf_dist.layouts.zero_internals import flattened_by_deepspeed
from lion_sf_dist.reduce import reduce_counts
from lion_sf_dist.units import AGREEMENTS, Units, assign_units

NEGATIVE = ("abs", "clamp")


@dataclass
class _Plan:
    """Everything about a step's segments that does not change while their structure doesn't."""

    device: torch.device
    groups: list[Optional[dist.ProcessGroup]]
    row_index: Tensor  # slot * U + unit, per counted segment
    numel: Tensor  # [len(counted), 1] int64, local element count per counted segment


class LionSF(Optimizer):
    """Lion Schedule-Free, exact under sharding. A drop-in for ``lion_pytorch.LionSF``.

    Each step, the Lion update ``sign(m * beta1 + g * (1 - beta1))`` of every agreement unit
    is scaled by ``|2 * A / N - 1| ** pow``, where ``A`` of the unit's ``N`` elements have an
    update agreeing in sign with their gradient. ``A`` and ``N`` are counted over the whole
    logical unit, whatever the sharding, so every rank applies the same scale.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts.
        lr: learning rate (per group); also the ``initial_lr`` that decoupled decay divides by.
        betas: ``(beta1, beta2)``: update interpolation and momentum decay (per group).
        weight_decay: per group; multiplied by ``lr`` (or ``lr / initial_lr`` when decoupled).
        use_triton: run the fused ``torch.compile`` kernel (Triton on GPU, C++ on CPU)
            instead of the eager one. Same maths; compiles once per process.
        decoupled_weight_decay: divide ``weight_decay`` by the constructor's ``lr``.
        pow: exponent of the scale; ``0`` gives plain Lion.
        agreement: unit of agreement: ``"tensor"``, ``"module"`` (needs names),
            ``"group"`` or ``"global"``.
        negative: ``"abs"`` scales by ``|a|``; ``"clamp"`` by ``max(a, 0)``.
        agreement_ema: smooth the agreement with Lion's two betas (per-unit state).

    A unit whose gradient holds a NaN or Inf anywhere (on any rank) is skipped that step:
    its parameters and ``exp_avg`` keep their values. ``last_skipped`` counts such units.
    After each step ``last_agreement`` and ``last_scale`` hold the per-unit values
    (``unit_names`` names them) as tensors, read without synchronising until used.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        use_triton: bool = False,
        decoupled_weight_decay: bool = False,
        pow: float = 1.0,
        *,
        agreement: str = "tensor",
        negative: str = "abs",
        agreement_ema: bool = False,
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"lr must be > 0, got {lr}")
        _check_group_values(betas, weight_decay)
        if not pow >= 0.0:
            raise ValueError(f"pow must be >= 0, got {pow}")
        if agreement not in AGREEMENTS:
            raise ValueError(f"agreement must be one of {AGREEMENTS}, got {agreement!r}")
        if negative not in NEGATIVE:
            raise ValueError(f"negative must be one of {NEGATIVE}, got {negative!r}")
        self.initial_lr = lr
        self.pow = pow
        self.decoupled_wd = decoupled_weight_decay
        self.agreement = agreement
        self.negative = negative
        self.agreement_ema = agreement_ema
        self._kernel = Kernel(compiled=use_triton)
        self._units: Optional[Units] = None
        self._params_seen: list[Tensor] = []
        self._plans: dict[tuple, _Plan] = {}
        self._ema: Optional[Tensor] = None
        # An adapter that owns the step when a framework replaced the parameters by flat
        # partitions (set by lion_sf_dist.deepspeed.attach); the tensors each group held when
        # added, by position, so such an adapter can still tell which unit an element is in.
        self._layout: Optional[Any] = None
        self._origin: list[tuple[weakref.ref, ...]] = []
        self.last_agreement: Optional[Tensor] = None
        self.last_scale: Optional[Tensor] = None
        self.last_skipped: Optional[Tensor] = None
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        _ = self.units  # fails here, not at the first step, when a unit needs names it was not given

    # -- construction and state ------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._origin.append(tuple(weakref.ref(p) for p in group["params"]))
        _check_group_values(group["betas"], group["weight_decay"])
        if not group["lr"] > 0.0:
            raise ValueError(f"lr must be > 0, got {group['lr']}")
        self._units = None
        self._sync_state()

    @property
    def units(self) -> Units:
        """The agreement unit of every parameter, by position in ``param_groups``."""
        if self._units is None:
            self._units = assign_units(self.param_groups, self.agreement)
            if self.agreement_ema:
                self._check_ema_betas(self._units)
        return self._units

    @property
    def unit_names(self) -> tuple[str, ...]:
        return self.units.names

    def _check_ema_betas(self, units: Units) -> None:
        betas: dict[int, tuple] = {}
        for group, ids in zip(self.param_groups, units.ids):
            for u in ids:
                if betas.setdefault(u, tuple(group["betas"])) != tuple(group["betas"]):
                    raise ValueError(
                        f"agreement_ema: unit {units.names[u]!r} spans param groups with different betas; "
                        "its agreement average needs one pair"
                    )

    def original_params(self) -> list[list[Optional[Tensor]]]:
        """The tensors each param group held when it was added, by position (``None`` once freed).

        ``units.ids`` refers to these positions; an adapter for a framework that swaps
        ``param_groups`` for flat partitions (DeepSpeed ZeRO) maps elements to units with it.
        """
        return [[ref() for ref in refs] for refs in self._origin]

    def _refuse_flattened(self) -> None:
        """Raise when DeepSpeed replaced our parameters by flat partitions and no adapter was attached."""
        held = set(map(id, self._current_params()))
        if any(p is not None and id(p) not in held and flattened_by_deepspeed(p)
               for ps in self.original_params() for p in ps):
            raise RuntimeError(
                "LionSF is being stepped by a DeepSpeed ZeRO engine it was not attached to: it would see flat "
                "per-rank partitions instead of parameters and count the sign agreement per partition, which "
                "differs across ranks. Build the engine with lion_sf_dist.deepspeed.initialize(...) instead of "
                "deepspeed.initialize(...), or call lion_sf_dist.deepspeed.attach(engine) on an engine built "
                "elsewhere (HF Accelerate, HF Trainer) before its first step."
            )

    def _current_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _sync_state(self) -> None:
        """Give every parameter its ``exp_avg``, following parameters swapped in ``param_groups``.

        A parameter that replaced another at the same position (HF Accelerate's FSDP2
        ``prepare`` swaps sharded DTensors in) inherits that one's state when the logical
        shape matches; state of parameters no longer held is dropped.
        """
        if self._layout is not None:
            return  # the adapter keys state by its partitions
        current = self._current_params()
        if len(current) == len(self._params_seen) and all(a is b for a, b in zip(current, self._params_seen)):
            return
        self._refuse_flattened()
        check_params(current)
        previous = dict(zip(range(len(self._params_seen)), self._params_seen))
        for i, p in enumerate(current):
            if "exp_avg" in self.state.get(p, {}):
                continue
            old = previous.get(i)
            old_state = self.state.get(old, {}) if old is not None else {}
            self.state[p] = {"exp_avg": _follow(old_state.get("exp_avg"), p)}
            if "agreement_ema" in old_state:
                self.state[p]["agreement_ema"] = old_state["agreement_ema"].clone()
        keep = set(map(id, current))
        for stale in [k for k in self.state if isinstance(k, Tensor) and id(k) not in keep]:
            del self.state[stale]
        self._params_seen = current
        self._ema = None

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` after state has followed swapped parameters (SPEC section 5)."""
        self._sync_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._params_seen = []
        self._sync_state()

    # -- the step --------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        if self._layout is not None:
            return self._layout.step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_state()
        segments = param_segments(self.param_groups, self.state, self.units)
        if segments:
            scale, keep = self.unit_scales(segments)
            self.apply(segments, scale, keep)
        return loss

    def unit_scales(self, segments: list[Segment]) -> tuple[Tensor, Tensor]:
        """Count, reduce and turn into per-unit ``(scale, keep)`` the agreement of ``segments``.

        Collective over every rank holding a piece of these segments' parameters; stores
        ``last_agreement``, ``last_scale`` and ``last_skipped``.
        """
        plan = self._plan(segments)
        counted = [s for s in segments if s.counted and s.p.numel() > 0]
        slotted = torch.zeros(len(plan.groups), self.units.count, 3, dtype=torch.int64, device=plan.device)
        if counted:
            rows = self._kernel.count([s.m for s in counted], [s.g for s in counted],
                                      tuple(s.group["betas"][0] for s in counted))
            rows = torch.cat((rows[:, :1], plan.numel, rows[:, 1:]), dim=1)
            slotted.view(-1, 3).index_add_(0, plan.row_index, rows)
        totals = reduce_counts(slotted, plan.groups)
        ema, ema_betas = self._ema_state(plan.device) if self.agreement_ema else (None, None)
        agreement, scale, keep = unit_scales(totals, self.pow, self.negative, ema, ema_betas)
        self.last_agreement, self.last_scale = agreement, scale
        self.last_skipped = ((totals[:, 1] > 0) & ~keep).sum()
        return scale, keep

    def apply(self, segments: list[Segment], scale: Tensor, keep: Tensor) -> None:
        """Apply the update to ``segments`` with per-unit ``scale`` and ``keep`` from :meth:`unit_scales`."""
        live = [s for s in segments if s.p.numel() > 0]
        if not live:
            return
        device = live[0].p.device
        host = []
        for s in live:
            lr, wd = s.group["lr"], s.group["weight_decay"]
            wd_eff = wd / self.initial_lr if self.decoupled_wd else wd
            host.append((-lr, 1.0 - lr * wd_eff, s.unit))
        table = torch.tensor(host, dtype=torch.float64).to(device)
        unit = table[:, 2].long()
        keep_seg = keep[unit]
        step_size = table[:, 0].float() * scale[unit]
        decay = torch.where(keep_seg, table[:, 1].float(), 1.0)
        self._kernel.apply([s.p for s in live], [s.m for s in live], [s.g for s in live], step_size, decay, keep_seg,
                           tuple(s.group["betas"][0] for s in live), tuple(s.group["betas"][1] for s in live))

    def _plan(self, segments: list[Segment]) -> _Plan:
        key = tuple((s.unit, id(s.reduce_group), s.counted, s.p.numel()) for s in segments)
        plan = self._plans.get(key)
        if plan is None:
            groups: dict[int, Optional[dist.ProcessGroup]] = {id(None): None}
            for s in segments:
                groups.setdefault(id(s.reduce_group), s.reduce_group)
            slot = {k: i for i, k in enumerate(groups)}
            counted = [s for s in segments if s.counted and s.p.numel() > 0]
            device = segments[0].p.device
            n_units = self.units.count
            plan = _Plan(
                device=device,
                groups=list(groups.values()),
                row_index=torch.tensor([slot[id(s.reduce_group)] * n_units + s.unit for s in counted],
                                       dtype=torch.int64, device=device),
                numel=torch.tensor([[s.p.numel()] for s in counted], dtype=torch.int64, device=device).view(-1, 1),
            )
            self._plans = {key: plan}
        return plan

    def _ema_state(self, device: torch.device) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The per-unit agreement average as one vector, mirrored in each parameter's state."""
        if self._layout is not None:
            return self._layout.ema_state(device)
        units = self.units
        first: dict[int, tuple[dict, dict]] = {}
        for group, ids in zip(self.param_groups, units.ids):
            for p, u in zip(group["params"], ids):
                first.setdefault(u, (self.state[p], group))
        fresh = self._ema is None or any(
            "agreement_ema" not in self.state[p] or self.state[p]["agreement_ema"]._base is not self._ema
            for p in self._current_params()
        )
        if fresh:
            values = [first[u][0].get("agreement_ema", torch.zeros(())).float().to(device) for u in range(units.count)]
            self._ema = torch.stack(values) if values else torch.zeros(0, device=device)
            for group, ids in zip(self.param_groups, units.ids):
                for p, u in zip(group["params"], ids):
                    self.state[p]["agreement_ema"] = self._ema[u]
        betas = torch.tensor([first[u][1]["betas"] for u in range(units.count)], dtype=torch.float32, device=device)
        return self._ema, (betas[:, 0], betas[:, 1])


def _check_group_values(betas: tuple[float, float], weight_decay: float) -> None:
    if len(betas) != 2 or not all(0.0 <= b <= 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1], got {betas}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _follow(old: Optional[Tensor], p: Tensor) -> Tensor:
    """``exp_avg`` for ``p``: ``old`` re-laid out like ``p`` when it has ``p``'s logical shape, else zeros."""
    if old is None or old.shape != p.shape:
        return torch.zeros_like(p, memory_format=torch.preserve_format)
    if isinstance(p, DTensor):
        full = old.full_tensor() if isinstance(old, DTensor) else old
        return distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
    full = old.full_tensor() if isinstance(old, DTensor) else old
    return full.to(dtype=p.dtype, device=p.device).clone()
