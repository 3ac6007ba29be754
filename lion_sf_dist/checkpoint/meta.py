"""The checkpoint's description (``meta.json``) and its comparison with the running job.

Stored: the logical name, shape and dtype of every parameter and buffer; the optimizer's
class, its LionSF hyper-parameters and param groups (by parameter name); which parameters
have optimizer state. Loading compares these with the running model and optimizer and
raises an error naming the first cause it finds.

Hyper-parameters: **the running optimizer wins** by default (``hparams="running"``): the
code that builds it is the newest intent (a lowered ``lr`` on restart is deliberate), and
each difference is reported in one warning. ``hparams="checkpoint"`` copies the saved
values (``lr``, ``betas``, ``weight_decay`` per group; ``pow``, ``negative``,
``decoupled_weight_decay``, ``initial_lr``) into the running optimizer once the load has succeeded; ``hparams="error"``
raises on any difference. ``agreement`` and ``agreement_ema`` decide the optimizer's
structure and are never copied: the running values apply (a changed ``agreement`` with
``agreement_ema`` takes each new unit's average from its first parameter).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

import torch

from lion_sf_dist.checkpoint.collect import Snapshot
from lion_sf_dist.checkpoint.errors import CheckpointError, ModelMismatchError, OptimizerMismatchError
from lion_sf_dist.optimizer import COPYABLE_HYPERPARAMETERS, GROUP_HYPERPARAMETERS, HYPERPARAMETERS, LionSF

FORMAT = "lion_sf_dist.checkpoint"
VERSION = 1
HparamPolicy = Literal["running", "checkpoint", "error"]
HPARAM_POLICIES: tuple[HparamPolicy, ...] = ("running", "checkpoint", "error")


def _plain(v: Any) -> Any:
    """``v`` as JSON stores it (tuples become lists), so saved and running values compare equal."""
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def describe_optimizer(snap: Snapshot, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Class, LionSF hyper-parameters and param groups (by name) of ``optimizer``."""
    if not isinstance(optimizer, LionSF):
        raise TypeError(
            f"checkpoint: saves the state of a LionSF, not {type(optimizer).__name__}; "
            "pass optimizer=None to save the model only"
        )
    hyper = optimizer.hyperparameters()
    return {
        "class": type(optimizer).__name__,
        **{k: _plain(hyper[k]) for k in HYPERPARAMETERS},
        "groups": [
            {"params": names, **{k: _plain(g[k]) for k in GROUP_HYPERPARAMETERS}}
            for names, g in zip(snap.optimizer_names, hyper["groups"])
        ],
        "state": sorted(snap.exp_avg),
        "state_dtypes": dict(sorted(snap.state_dtypes.items())),
        "agreement_ema_state": sorted(snap.ema),
        "rounding_step": optimizer.rounding_step,  # keys stochastic rounding: a hot restart draws the same bits
    }


def describe(
    snap: Snapshot,
    optimizer: Optional[torch.optim.Optimizer],
    world_size: int,
    extra: bool,
    user: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint of ``snap``."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "layout": snap.kind,
        "world_size": world_size,
        "params": {n: {"shape": list(snap.shapes[n]), "dtype": snap.dtypes[n]} for n in snap.params},
        "buffers": {n: {"shape": list(snap.shapes[n]), "dtype": snap.dtypes[n]} for n in snap.buffers},
        "optimizer": describe_optimizer(snap, optimizer) if optimizer is not None else None,
        "extra": extra,
        **(user or {}),
    }


def check_format(meta: dict[str, Any], where: str) -> None:
    """Raise unless ``meta`` describes a checkpoint of this format and a version this code reads."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{where}: written by a newer version ({meta['version']}) than this one ({VERSION})")


def check_model(meta: dict[str, Any], snap: Snapshot, where: str) -> None:
    """Raise :class:`ModelMismatchError` naming missing, extra or reshaped parameters and buffers."""
    problems = []
    for kind, saved, running in (("parameter", meta["params"], snap.params), ("buffer", meta["buffers"], snap.buffers)):
        missing = [n for n in running if n not in saved]
        extra = [n for n in saved if n not in running]
        if missing:
            problems.append(f"model {kind}(s) missing from the checkpoint: {missing}")
        if extra:
            problems.append(f"checkpoint {kind}(s) the model does not have: {extra}")
        for n in running:
            if n in saved and tuple(saved[n]["shape"]) != snap.shapes[n]:
                problems.append(
                    f"{kind} {n!r} has shape {tuple(saved[n]['shape'])} in the checkpoint "
                    f"but {snap.shapes[n]} in the model"
                )
    if problems:
        raise ModelMismatchError(f"{where} was written for a different model: " + "; ".join(problems))


def check_optimizer(meta: dict[str, Any], snap: Snapshot, optimizer: torch.optim.Optimizer, where: str) -> None:
    """Raise :class:`OptimizerMismatchError` unless the saved state fits ``optimizer`` (hot restart)."""
    saved = meta["optimizer"]
    fix = "; load with optimizer_state=False to restore the parameters only (fresh optimizer state)"
    if saved is None:
        raise OptimizerMismatchError(f"{where} holds no optimizer state (saved with optimizer=None){fix}")
    if saved["class"] != type(optimizer).__name__:
        raise OptimizerMismatchError(
            f"{where} holds {saved['class']} state but the running optimizer is {type(optimizer).__name__}{fix}"
        )
    held = [n for names in snap.optimizer_names for n in names]
    lacking = [n for n in held if n not in set(saved["state"])]
    if lacking:
        raise OptimizerMismatchError(f"{where} has no exp_avg for parameter(s) the optimizer holds: {lacking}{fix}")


def warn_state_dtypes(meta: dict[str, Any], snap: Snapshot, where: str) -> None:
    """One warning when ``exp_avg`` is loaded into another dtype than it was saved in (it is converted).

    Checkpoints written before dtypes were recorded are taken to hold the parameter's dtype.
    """
    saved = meta["optimizer"].get("state_dtypes", {})
    changed = {
        n: (saved.get(n, meta["params"].get(n, {}).get("dtype")), dtype)
        for n, dtype in snap.state_dtypes.items()
        if saved.get(n, meta["params"].get(n, {}).get("dtype")) not in (None, dtype)
    }
    if changed:
        pairs = sorted({f"{a} -> {b}" for a, b in changed.values()})
        warnings.warn(
            f"{where}: exp_avg of {len(changed)} parameter(s) converted on load ({', '.join(pairs)}; "
            f"e.g. {sorted(changed)[:3]}): the running optimizer's state_dtype differs from the saved one",
            stacklevel=4,
        )


def reconcile(
    meta: dict[str, Any], snap: Snapshot, optimizer: LionSF, policy: HparamPolicy, where: str
) -> dict[str, Any]:
    """Compare saved and running hyper-parameters under ``policy`` (see the module docstring).

    Returns the values to hand to ``optimizer.set_hyperparameters`` once the load has
    succeeded (empty unless ``policy="checkpoint"``); warns or raises for differences.
    """
    if policy not in HPARAM_POLICIES:
        raise ValueError(f"hparams must be one of {HPARAM_POLICIES}, got {policy!r}")
    saved = meta["optimizer"]
    running = optimizer.hyperparameters()
    diffs: list[str] = []
    changes: dict[str, Any] = {"groups": {}}
    for k in HYPERPARAMETERS:
        value = _plain(running[k])
        if saved.get(k) != value:
            kept = "" if k in COPYABLE_HYPERPARAMETERS else " (structural: the running value stays)"
            diffs.append(f"{k}: checkpoint {saved.get(k)!r}, running {value!r}{kept}")
            if k in COPYABLE_HYPERPARAMETERS:
                changes[k] = saved[k]
    saved_group = {n: g for g in saved["groups"] for n in g["params"]}
    for i, (names, group) in enumerate(zip(snap.optimizer_names, running["groups"])):
        src = next((saved_group[n] for n in names if n in saved_group), None)
        if src is None:
            continue
        for k in GROUP_HYPERPARAMETERS:
            if k in src and _plain(group[k]) != src[k]:
                diffs.append(f"group {i} {k}: checkpoint {src[k]!r}, running {_plain(group[k])!r}")
                changes["groups"].setdefault(i, {})[k] = tuple(src[k]) if k == "betas" else src[k]
    if not diffs:
        return {}
    if policy == "error":
        raise OptimizerMismatchError(
            f"{where}: hyper-parameters differ from the running optimizer: " + "; ".join(diffs)
        )
    winner = (
        "the checkpoint's values apply once the load succeeds"
        if policy == "checkpoint"
        else "the running optimizer's values apply"
    )
    warnings.warn(f"{where}: hyper-parameters differ ({winner}): " + "; ".join(diffs), stacklevel=3)
    return changes if policy == "checkpoint" else {}
