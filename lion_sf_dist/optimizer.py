"""LionSF: Lion whose step is scaled by the sign agreement of each unit (docs/CONTRACT.md).

A step is four stages over :class:`~lion_sf_dist.layouts.Segment` s (local pieces of
parameters) that the optimizer's layout hands it: count the agreement of each piece, sum
the counts per unit across ranks (one collective per process group), turn them into
per-unit scales, apply the update. The arithmetic lives in :mod:`lion_sf_dist.kernel`;
how parameters are spread over ranks lives in :mod:`lion_sf_dist.layouts`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lion_sf_dist.agreement_average import AgreementAverage
from lion_sf_dist.coordinator import Coordinator
from lion_sf_dist.devices import to_device
from lion_sf_dist.kernel import Kernel, scales_from_counts
from lion_sf_dist.layouts import Fragment, Layout, ParamLayout, Segment
from lion_sf_dist.options import (
    AGREEMENTS,
    NEGATIVES,
    Agreement,
    Negative,
    ParamsT,
    check_choice,
    check_group_values,
    check_optimizer_values,
)
from lion_sf_dist.reduce import reduce_counts
from lion_sf_dist.rounding import Rounding
from lion_sf_dist.units import Units, assign_units

# Hyper-parameters a checkpoint records; the first four may be copied from one (the others shape the optimizer).
HYPERPARAMETERS = ("initial_lr", "pow", "negative", "decoupled_wd", "agreement", "agreement_ema")
COPYABLE_HYPERPARAMETERS = ("initial_lr", "pow", "negative", "decoupled_wd")
GROUP_HYPERPARAMETERS = ("lr", "betas", "weight_decay")
# What a parameter's state may hold (``exp_avg`` always).
STATE_KEYS = ("exp_avg", "agreement_ema")


@dataclass
class _Plan:
    """Everything about a step's segments that does not change while their structure doesn't."""

    device: torch.device
    process_groups: list[Optional[dist.ProcessGroup]]
    row_index: Tensor  # slot * U + unit, per counted segment
    numel: Tensor  # [len(counted), 1] int64, local element count per counted segment


class LionSF(Optimizer):
    """Lion Schedule-Free, exact under sharding. A drop-in for ``lion_pytorch.LionSF``.

    Each step, the Lion update ``sign(m * beta1 + g * (1 - beta1))`` of every agreement unit
    is scaled by ``|2 * A / N - 1| ** pow``, where ``A`` of the unit's ``N`` elements have an
    update agreeing in sign with their gradient. ``A`` and ``N`` are counted over the whole
    logical unit, whatever the sharding, so every rank applies the same scale. The full
    contract is docs/CONTRACT.md.

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
        foreach: ``True`` runs each stage over all tensors of a step with multi-tensor
            (``torch._foreach_*``) ops, a constant number of dispatched ops per step;
            ``False`` tensor by tensor in cache-sized chunks; ``None`` (default) multi-tensor
            on every non-CPU device, chunked on CPU. Same maths (bitwise the same results).
        state_dtype: the dtype of ``exp_avg`` (``None``: the parameter's). Whatever the
            dtypes, the arithmetic runs in float32 and each result is rounded once when stored.
        stochastic_rounding: store bfloat16 results (parameters, bf16 ``exp_avg``) rounded
            up or down with probability proportional to the distance, with bits that depend
            only on ``rounding_seed``, the step count and the element's place in the logical
            parameter: the same at every world size and sharding.
        rounding_seed: the seed of those bits.
        coordinator: count this optimizer's units together with those of the other
            optimizers sharing the :class:`~lion_sf_dist.coordinator.Coordinator` (model
            parts, pipeline stages), as one LionSF over all their parameters would.

    A unit whose gradient holds a NaN or Inf anywhere (on any rank) is skipped that step:
    its parameters and ``exp_avg`` keep their values. ``last_skipped`` counts such units.
    After each step ``last_agreement`` and ``last_scale`` hold the per-unit values
    (``unit_names`` names them) as tensors, read without synchronising until used.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        use_triton: bool = False,
        decoupled_weight_decay: bool = False,
        pow: float = 1.0,
        *,
        agreement: Agreement = "tensor",
        negative: Negative = "abs",
        agreement_ema: bool = False,
        foreach: Optional[bool] = None,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        coordinator: Optional[Coordinator] = None,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        check_group_values(defaults)
        check_optimizer_values(pow)
        check_choice("agreement", agreement, AGREEMENTS)
        check_choice("negative", negative, NEGATIVES)
        self.initial_lr = lr
        self.pow = pow
        self.decoupled_wd = decoupled_weight_decay
        self.agreement = agreement
        self.negative = negative
        self.agreement_ema = agreement_ema
        self._kernel = Kernel(compiled=use_triton, foreach=foreach)
        self.state_dtype = state_dtype
        self.stochastic_rounding = stochastic_rounding
        self.rounding_seed = rounding_seed
        # Steps taken with stochastic rounding: part of the bits' key (host int, saved in state_dict).
        self.rounding_step = 0
        self._rounding: Optional[tuple[tuple, Rounding]] = None
        self._layout: Layout = ParamLayout()
        self._layout.state_dtype = state_dtype
        self._average = AgreementAverage()
        self._units: Optional[Units] = None
        self._plans: dict[tuple, _Plan] = {}
        self._hyper: Optional[tuple[tuple, Tensor]] = None
        self._unit_betas: Optional[tuple[tuple, tuple[Tensor, Tensor]]] = None
        # The tensors each group held when added, by position: units refer to these, and a
        # layout for a framework that swaps them for flat partitions (ZeRO) maps elements with them.
        self._origin: list[tuple[weakref.ref, ...]] = []
        # The group dicts as added: during a ZeRO step DeepSpeed shows only the stepped group
        # in ``param_groups``, but keeps these dicts (and their betas) alive.
        self._groups: list[dict[str, Any]] = []
        self.last_agreement: Optional[Tensor] = None
        self.last_scale: Optional[Tensor] = None
        self.last_skipped: Optional[Tensor] = None
        self._shared: Optional[Coordinator] = None
        super().__init__(params, defaults)
        _ = self.units  # fails here, not at the first step, when a unit needs names it was not given
        if coordinator is not None:
            coordinator.join(self)
            self._shared = coordinator

    # -- construction, units and layout ----------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, refusing invalid values before anything is added."""
        candidate = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        check_group_values(candidate)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        self._origin.append(tuple(weakref.ref(p) for p in group["params"]))
        self._groups.append(group)
        self._units = None
        try:
            self._layout.init_state(self.param_groups, self.state, self.original_params(), self.units)
        except (ValueError, TypeError, RuntimeError):  # refused (names, parameter kind): the group was never added
            self.param_groups.pop()
            self._origin.pop()
            self._groups.pop()
            self._units = None
            self._layout.forget()
            raise

    @property
    def units(self) -> Units:
        """The agreement unit of every parameter, by position in ``param_groups``."""
        if self._units is None:
            units = assign_units(self._groups, self.agreement)
            if self.agreement_ema:
                self._check_ema_betas(units)
            self._units = units
        return self._units

    @property
    def unit_names(self) -> tuple[str, ...]:
        """A readable name of each unit, in the order of ``last_agreement`` and ``last_scale``."""
        return self.units.names

    @property
    def layout(self) -> Layout:
        """How the tensors this optimizer steps map to logical parameters (see :mod:`lion_sf_dist.layouts`)."""
        return self._layout

    def use_layout(self, layout: Layout) -> None:
        """Step through ``layout`` from now on; its state is created at once (``exp_avg`` carried over).

        Called by :func:`lion_sf_dist.deepspeed.attach` with a ZeRO layout.
        """
        layout.state_dtype = self.state_dtype
        layout.init_state(self.param_groups, self.state, self.original_params(), self.units)
        self._layout = layout
        self._plans.clear()
        self._hyper = None

    def original_params(self) -> list[list[Optional[Tensor]]]:
        """The tensors each param group held when it was added, by position (``None`` once freed)."""
        return [[ref() for ref in refs] for refs in self._origin]

    def _check_ema_betas(self, units: Units) -> None:
        betas: dict[int, tuple] = {}
        for group, ids in zip(self._groups, units.ids):
            for u in ids:
                if betas.setdefault(u, tuple(group["betas"])) != tuple(group["betas"]):
                    raise ValueError(
                        f"agreement_ema: unit {units.names[u]!r} spans param groups with different betas; "
                        "its agreement average needs one pair"
                    )

    # -- state: torch's state_dict, and the logical view checkpoints use ---------------

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` after state has followed swapped parameters."""
        self._layout.init_state(self.param_groups, self.state, self.original_params(), self.units)
        out = super().state_dict()
        if self.stochastic_rounding:
            out["rounding_step"] = self.rounding_step
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``; also before :func:`~lion_sf_dist.deepspeed.attach`
        (the loaded partition state is then taken over when the ZeRO layout is attached).

        Refuses, before changing anything, a state without ``exp_avg`` (another optimizer's)
        and an ``exp_avg`` shaped unlike its parameter.
        """
        _check_loadable(state_dict, [p for group in self.param_groups for p in group["params"]])
        super().load_state_dict(state_dict)
        if self.state_dtype is not None:  # torch casts loaded state to the parameter's dtype
            for entry in self.state.values():
                if "exp_avg" in entry:
                    entry["exp_avg"] = entry["exp_avg"].to(self.state_dtype)
        self.rounding_step = int(state_dict.get("rounding_step", self.rounding_step))
        self._layout.forget()
        self._average.adopt(self.state, self.units.count)

    def logical_params(self) -> list[list[Tensor]]:
        """The model parameters each param group trains, as the model holds them (the bit16
        parameters under ZeRO, whose groups hold flat partitions)."""
        if isinstance(self._layout, ParamLayout):
            return [list(group["params"]) for group in self.param_groups]
        return [[p for p in ps if p is not None] for ps in self.original_params()]

    def fragments(self) -> list[Fragment]:
        """This rank's piece of every parameter it trains, with ``exp_avg``: what checkpoints save and load."""
        self._layout.init_state(self.param_groups, self.state, self.original_params(), self.units)
        return self._layout.fragments(self.param_groups, self.state, self.original_params(), self.units)

    def refresh(self) -> None:
        """Make the model compute with values just written into :meth:`fragments` (collective under ZeRO)."""
        self._layout.refresh()

    def reset_state(self) -> None:
        """Zero every ``exp_avg`` and the agreement averages: a fresh-state restart."""
        for fragment in self.fragments():
            fragment.exp_avg.zero_()
        self._average.load(None, self.state, torch.device("cpu"))

    def agreement_average(self) -> Optional[Tensor]:
        """The per-unit agreement averages (host float32, by unit), ``None`` before any step or load."""
        return self._average.values()

    def load_agreement_average(self, values: Optional[Tensor]) -> None:
        """Replace the per-unit agreement averages (``None``: start them afresh)."""
        if values is not None and tuple(values.shape) != (self.units.count,):
            raise ValueError(
                f"agreement averages for {self.units.count} units expected, got shape {tuple(values.shape)}"
            )
        fragments = self.fragments()
        device = fragments[0].exp_avg.device if fragments else torch.device("cpu")
        self._average.load(values, self.state, device)

    def hyperparameters(self) -> dict[str, Any]:
        """The values a checkpoint records: :data:`HYPERPARAMETERS` and each group's lr, betas, weight decay."""
        return {
            **{k: getattr(self, k) for k in HYPERPARAMETERS},
            "groups": [{k: group[k] for k in GROUP_HYPERPARAMETERS} for group in self._groups],
        }

    def set_hyperparameters(self, values: dict[str, Any]) -> None:
        """Set copyable optimizer values and per-group ones (``groups``: ``{index: {key: value}}``), checked first."""
        scalars = {k: v for k, v in values.items() if k in COPYABLE_HYPERPARAMETERS}
        unknown = set(values) - set(scalars) - {"groups"}
        if unknown:
            raise ValueError(f"set_hyperparameters: not settable: {sorted(unknown)}")
        groups = values.get("groups", {})
        merged = {i: {**self._groups[i], **changes} for i, changes in groups.items()}
        for group in merged.values():
            group["betas"] = tuple(group["betas"])
            check_group_values(group)
        check_optimizer_values(scalars.get("pow", self.pow))
        check_choice("negative", scalars.get("negative", self.negative), NEGATIVES)
        if not scalars.get("initial_lr", self.initial_lr) > 0:
            raise ValueError(f"initial_lr must be > 0, got {scalars['initial_lr']!r}")
        for k, v in scalars.items():
            setattr(self, k, v)
        for i, group in merged.items():
            for k in GROUP_HYPERPARAMETERS:
                self._groups[i][k] = group[k]
        if self.agreement_ema:
            self._check_ema_betas(self.units)

    # -- the step --------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One LionSF step of every parameter with a gradient; collective over the ranks sharing a unit."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        units = self.units
        self._layout.init_state(self.param_groups, self.state, self.original_params(), units)
        segments = self._layout.segments(self.param_groups, self.state, units, indexed=self.stochastic_rounding)
        if segments is None:
            return loss  # a ZeRO engine step is still being collected
        if self._shared is not None:
            self._shared.submit(self, segments)  # the last member of a step counts and applies for all
            return loss
        slotted, process_groups = self.local_counts(segments)
        self.finish_step(segments, reduce_counts(slotted, process_groups))
        return loss

    def local_counts(self, segments: list[Segment]) -> tuple[Tensor, list[Optional[dist.ProcessGroup]]]:
        """This rank's int64 ``[A, N, P]`` per unit of ``segments``, one slice per process group to sum over.

        Returns ``(slotted [len(groups), units, 3], groups)``: summing ``slotted[k]`` over
        ``groups[k]`` (``None``: this rank alone), then over ``k``, gives every unit's counts.
        """
        if not segments:
            return torch.zeros(1, self.units.count, 3, dtype=torch.int64), [None]
        plan = self._plan(segments)
        counted = [s for s in segments if s.counted and s.p.numel() > 0]
        slotted = torch.zeros(len(plan.process_groups), self.units.count, 3, dtype=torch.int64, device=plan.device)
        if counted:
            rows = self._kernel.count(
                [s.m for s in counted], [s.g for s in counted], tuple(s.param_group["betas"][0] for s in counted)
            )
            rows = torch.cat((rows[:, :1], plan.numel, rows[:, 1:]), dim=1)
            slotted.view(-1, 3).index_add_(0, plan.row_index, rows)
        return slotted, plan.process_groups

    def finish_step(self, segments: list[Segment], totals: Tensor) -> None:
        """Scale and apply the update of ``segments`` from every unit's reduced ``totals [units, 3]``.

        Stores ``last_agreement``, ``last_scale`` and ``last_skipped``; then the layout
        propagates the update (ZeRO's bit16 copies).
        """
        if segments:
            if self.agreement_ema:
                ema = self._average.vector(self.state, self.units.count, totals.device)
                agreement, scale, keep = scales_from_counts(
                    totals, self.pow, self.negative, ema, self._ema_betas(totals.device)
                )
            else:
                agreement, scale, keep = scales_from_counts(totals, self.pow, self.negative)
            self.last_agreement, self.last_scale = agreement, scale
            self.last_skipped = ((totals[:, 1] > 0) & ~keep).sum()
            self._apply(segments, scale, keep)
        self._layout.finish()

    def _apply(self, segments: list[Segment], scale: Tensor, keep: Tensor) -> None:
        """Apply the update to ``segments`` with per-unit ``scale`` and ``keep`` (see :meth:`finish_step`)."""
        live = [s for s in segments if s.p.numel() > 0]
        if not live:
            return
        table = self._hyper_table(live)
        unit = table[:, 2].long()
        keep_seg = keep[unit]
        step_size = table[:, 0].float() * scale[unit]
        decay = torch.where(keep_seg, table[:, 1].float(), 1.0)
        self._kernel.apply(
            [s.p for s in live],
            [s.m for s in live],
            [s.g for s in live],
            step_size,
            decay,
            keep_seg,
            tuple(s.param_group["betas"][0] for s in live),
            tuple(s.param_group["betas"][1] for s in live),
            rounding=self._rounding_for(live) if self.stochastic_rounding else None,
        )

    def _rounding_for(self, live: list[Segment]) -> Rounding:
        """This step's stochastic-rounding description of ``live`` (kept while the segments stay the same)."""
        key = tuple((s.param_id, s.index) for s in live)
        if self._rounding is None or self._rounding[0] != key:
            if any(s.index is None or s.param_id < 0 for s in live):
                raise ValueError(
                    "stochastic_rounding needs each element's place in its logical parameter; this "
                    "layout does not give it (a DTensor whose local shard is not one block of the "
                    "parameter, such as rows interleaved by a lone _StridedShard)"
                )
            rounding = Rounding(
                self.rounding_seed, 0, [s.param_id for s in live], [s.index for s in live if s.index is not None]
            )
            rounding.device = live[0].p.device
            self._rounding = (key, rounding)
        rounding = self._rounding[1]
        rounding.step = self.rounding_step
        self.rounding_step += 1
        return rounding

    def _hyper_table(self, live: list[Segment]) -> Tensor:
        """Per segment ``[-lr, 1 - lr * wd_eff, unit]`` on the device, rebuilt only when a value changes."""
        rows = []
        for s in live:
            lr, wd = s.param_group["lr"], s.param_group["weight_decay"]
            wd_eff = wd / self.initial_lr if self.decoupled_wd else wd
            rows.append((-lr, 1.0 - lr * wd_eff, s.unit))
        key = tuple(rows)
        if self._hyper is None or self._hyper[0] != key:
            self._hyper = (key, to_device(torch.tensor(rows, dtype=torch.float64), live[0].p.device))
        return self._hyper[1]

    def _ema_betas(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Each unit's ``(beta1, beta2)`` (those of its first parameter's group) on the device."""
        key = tuple(tuple(self._groups[g]["betas"]) for g in self.units.first_group)
        if self._unit_betas is None or self._unit_betas[0] != key:
            betas = to_device(torch.tensor(key, dtype=torch.float32).view(-1, 2), device)
            self._unit_betas = (key, (betas[:, 0], betas[:, 1]))
        return self._unit_betas[1]

    def _plan(self, segments: list[Segment]) -> _Plan:
        key = tuple((s.unit, id(s.process_group), s.counted, s.p.numel()) for s in segments)
        plan = self._plans.get(key)
        if plan is None:
            groups: dict[int, Optional[dist.ProcessGroup]] = {id(None): None}
            for s in segments:
                groups.setdefault(id(s.process_group), s.process_group)
            slot = {k: i for i, k in enumerate(groups)}
            counted = [s for s in segments if s.counted and s.p.numel() > 0]
            device = segments[0].p.device
            n_units = self.units.count
            plan = _Plan(
                device=device,
                process_groups=list(groups.values()),
                row_index=to_device(
                    torch.tensor([slot[id(s.process_group)] * n_units + s.unit for s in counted], dtype=torch.int64),
                    device,
                ),
                numel=to_device(torch.tensor([s.p.numel() for s in counted], dtype=torch.int64).view(-1, 1), device),
            )
            self._plans = {key: plan}
        return plan


def _check_loadable(state_dict: dict[str, Any], params: list[Tensor]) -> None:
    """Raise ``ValueError`` unless ``state_dict`` holds a LionSF state that fits ``params`` (by position)."""
    ids = [i for group in state_dict.get("param_groups", []) for i in group.get("params", [])]
    state = state_dict.get("state", {})
    for i, p in zip(ids, params):
        entry = state.get(i)
        if entry is None:
            continue
        if "exp_avg" not in entry or not set(entry) <= set(STATE_KEYS):
            raise ValueError(
                f"load_state_dict: the state of parameter {i} holds {sorted(entry)}, a LionSF state "
                f"holds {list(STATE_KEYS)}: another optimizer's state?"
            )
        if tuple(entry["exp_avg"].shape) != tuple(p.shape):
            raise ValueError(
                f"load_state_dict: exp_avg of parameter {i} has shape {tuple(entry['exp_avg'].shape)}, "
                f"the parameter {tuple(p.shape)}: a state of another model?"
            )
