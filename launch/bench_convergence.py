"""Convergence studies of LionSF on the char-LM of launch/train.py, single process per run.

``--study`` picks one; every configuration runs at several learning rates a factor 2 apart
and several seeds, on the same data order:

- ``convergence``: LionSF (constant lr, no schedule), Lion (lion-pytorch, constant lr),
  AdamW with linear warm-up and cosine decay, and schedule-free AdamW
  (``schedulefree.AdamWScheduleFree``); then a hot-restart experiment: stop at half way and
  continue with the saved LionSF state, with a fresh ``exp_avg``, and, for comparison,
  extend a finished cosine AdamW run by the same number of steps with a new schedule.
- ``ablation``: LionSF's options one at a time against ``agreement="module", pow=1``:
  agreement tensor / module / group / global, ``pow`` 0.5 / 1 / 2, ``negative="clamp"``,
  ``agreement_ema=True``, and ``pow=0`` (plain Lion, the control). Also plots the per-step
  mean scale of each agreement unit type.
- ``anytime``: budgets of 1/4, 1/2 and all of ``--steps``. AdamW warm-up + cosine and
  schedule-free AdamW are tuned and run for each budget; one constant-lr LionSF sweep at the
  full length is read at every budget. Which wins at each budget, and at what total cost.
- ``large``: LionSF and AdamW cosine on a model of 4x the parameters (twice the layers, 1.5x
  the width), ``--seeds`` 1 unless given.
- ``precision``: LionSF with fp32 parameters and state; fp32 parameters and bf16 state
  (``state_dtype``); bf16 parameters and state (no fp32 master copy), rounded to nearest and
  with ``stochastic_rounding``; all at the fp32 best lr (no sweep). Reports bytes per parameter
  of parameters + state for each.

LionSF's parameters are in two param groups (matrices, and biases / norm weights), so
``agreement="group"`` differs from ``"global"``; the other unit types do not depend on it.
A sweep is widened by one lr a factor 2 beyond its edge while its best lr is at an edge
(at most ``--max-widen`` times), so every reported best lies inside its sweep or is marked.

Writes ``OUT/STUDY.csv`` (every evaluation), ``OUT/STUDY-scale.csv`` (LionSF's mean scale
after every step), ``OUT/STUDY.md`` (tables, wall time), ``OUT/STUDY.png`` and
``OUT/STUDY.json`` (the settings and wall time)::

    python launch/bench_convergence.py --study ablation --workers 2 --out runs/ablation

Every configuration is independent and deterministic, so ``--workers`` runs them in
parallel processes (``--threads`` each); the losses do not depend on it. ``--replot``
rebuilds tables and plot from an existing ``OUT/STUDY.csv`` without training. ``--smoke``
shrinks everything (model, steps, seeds, data) to check the script runs in seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import GPT, batch, stdlib_text  # noqa: E402  (the training script's model and data)

from lion_sf_dist import LionSF  # noqa: E402

STUDIES = ("convergence", "ablation", "anytime", "large", "precision")
CONTROL = "plain Lion (pow 0)"  # the ablation's control, LionSF with pow=0


@dataclass(frozen=True)
class Config:
    """One optimizer setting: how to build it, the lrs its sweep starts with, its run length."""

    name: str
    optimizer: str  # "LionSF", "Lion", "AdamW cosine" or "schedule-free AdamW"
    lrs: tuple[float, ...]
    options: tuple[tuple[str, Any], ...] = ()  # LionSF keyword arguments over LIONSF_BASE
    steps: Optional[int] = None  # run length, and AdamW cosine's schedule length; None: --steps
    dtype: torch.dtype = torch.float32  # the model's parameters (the loss is computed in fp32 either way)


LIONSF_BASE = dict(betas=(0.9, 0.99), weight_decay=0.0, agreement="module", pow=1.0)


LIONSF_TYPES: dict[str, Callable[[str], Any]] = {  # the options --lionsf may set, each with its parser
    "agreement": str, "pow": float, "negative": str,
    "agreement_ema": lambda v: {"true": True, "false": False}[v.lower()],
}


def lionsf_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["pow=2", "agreement=tensor"]`` as LionSF keyword arguments; ValueError names a bad pair."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in LIONSF_TYPES or not value:
            raise ValueError(f"{pair!r}: expected KEY=VALUE with KEY one of {', '.join(LIONSF_TYPES)}")
        try:
            out[key] = LIONSF_TYPES[key](value)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{pair!r}: {key} cannot be {value!r}") from e
    LionSF([("probe.w", torch.zeros(1))], lr=1e-3, **{**LIONSF_BASE, **out})  # LionSF's own checks of the values
    return out


def study_configs(study: str, steps: int, lionsf_options: Optional[dict[str, Any]] = None) -> list[Config]:
    """The configurations of ``study`` for runs of ``steps`` steps.

    ``lionsf_options`` (from ``--lionsf``) apply to the configuration named "LionSF" of the
    convergence, anytime and large studies, e.g. the ablation's best setting.
    """
    options = tuple((lionsf_options or {}).items())
    lionsf = Config("LionSF", "LionSF", (1e-3, 2e-3, 4e-3, 8e-3), options)
    adamw = Config("AdamW cosine", "AdamW cosine", (1.5e-3, 3e-3, 6e-3, 1.2e-2))
    schedule_free = Config("schedule-free AdamW", "schedule-free AdamW", (3e-3, 6e-3, 1.2e-2, 2.4e-2))
    if study == "convergence":
        return [lionsf, Config("Lion", "Lion", (2.5e-4, 5e-4, 1e-3, 2e-3)), adamw, schedule_free]
    if study == "ablation":
        variants = {  # name: (LionSF options, first lrs: a factor 2 each side of a guess at the best)
            "agreement tensor": ({"agreement": "tensor"}, 2e-3),
            "agreement module, pow 1": ({}, 2e-3),
            "agreement group": ({"agreement": "group"}, 2e-3),
            "agreement global": ({"agreement": "global"}, 2e-3),
            "pow 0.5": ({"pow": 0.5}, 2e-3),
            "pow 2": ({"pow": 2.0}, 4e-3),
            'negative "clamp"': ({"negative": "clamp"}, 2e-3),
            "agreement_ema": ({"agreement_ema": True}, 2e-3),
            CONTROL: ({"pow": 0.0}, 1e-3),
        }
        return [Config(name, "LionSF", (lr / 2, lr, 2 * lr), tuple(opts.items()))
                for name, (opts, lr) in variants.items()]
    if study == "anytime":
        out = [Config("LionSF", "LionSF", (1e-3, 2e-3, 4e-3), options)]
        for budget in budgets(steps):
            out += [Config(f"AdamW cosine {budget}", "AdamW cosine", (3e-3, 6e-3, 1.2e-2), steps=budget),
                    Config(f"schedule-free AdamW {budget}", "schedule-free AdamW", (3e-3, 6e-3, 1.2e-2),
                           steps=budget)]
        return out
    if study == "large":
        return [Config("LionSF", "LionSF", (1e-3, 2e-3, 4e-3), options),
                Config("AdamW cosine", "AdamW cosine", (3e-3, 6e-3, 1.2e-2))]
    if study == "precision":
        lrs, bf16 = (2e-3,), torch.bfloat16  # LionSF's best in fp32 (convergence study): only precision changes
        return [Config("fp32 params, fp32 state", "LionSF", lrs, options),
                Config("fp32 params, bf16 state", "LionSF", lrs, options + (("state_dtype", bf16),)),
                Config("bf16 params, bf16 state, nearest", "LionSF", lrs, options, dtype=bf16),
                Config("bf16 params, bf16 state, stochastic", "LionSF", lrs,
                       options + (("stochastic_rounding", True),), dtype=bf16)]
    raise ValueError(study)


def budgets(steps: int) -> list[int]:
    """The anytime study's budgets: a quarter, a half and all of ``steps``."""
    return [steps // 4, steps // 2, steps]


def cosine(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak, as a multiplier."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def lionsf_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Named parameters in two groups, matrices and the rest, so ``agreement="group"`` means something."""
    named = list(model.named_parameters())
    return [{"params": [(n, p) for n, p in named if p.dim() >= 2]},
            {"params": [(n, p) for n, p in named if p.dim() < 2]}]


def make_optimizer(config: Config, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "LionSF":
        return LionSF(lionsf_groups(model), lr=lr, **{**LIONSF_BASE, **dict(config.options)})
    if config.optimizer == "Lion":
        from lion_pytorch import Lion

        return Lion(model.parameters(), lr=lr, betas=(0.9, 0.99))
    if config.optimizer == "AdamW cosine":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if config.optimizer == "schedule-free AdamW":
        import schedulefree

        opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=lr, warmup_steps=0, weight_decay=0.0)
        opt.train()
        return opt
    raise ValueError(config.optimizer)


Curve = list[tuple[int, float]]  # (step, validation loss) at each evaluation


@dataclass
class Result:
    """One run: its validation curve and, for LionSF, the mean scale over units after each step."""

    curve: Curve
    scale: list[float] = field(default_factory=list)


Curves = dict[tuple[str, float], list[Result]]  # (config name, lr) -> one result per seed


class Run:
    """One optimizer on one model: ``train(steps)`` yields ``(step, val_loss)`` at each evaluation."""

    def __init__(self, config: Config, lr: float, seed: int, args: argparse.Namespace, data) -> None:
        self.config, self.lr, self.seed, self.args = config, lr, seed, args
        self.length = config.steps or args.steps
        self.train_data, self.val_data = data
        torch.manual_seed(seed)
        self.model = GPT(args.layers, args.width, args.heads, args.block).to(config.dtype)
        self.opt = make_optimizer(config, self.model, lr)
        self.schedule: Callable[[int], float] = lambda s: 1.0
        if config.optimizer == "AdamW cosine":
            self.schedule = lambda s: cosine(s, self.length, max(1, self.length // 20))
        self.step = 0
        self.scale: list[float] = []

    def val_loss(self) -> float:
        if hasattr(self.opt, "eval"):
            self.opt.eval()  # schedule-free AdamW evaluates at its averaged point
        self.model.eval()
        with torch.no_grad():
            losses = [self.model(*batch(self.val_data, self.args.batch_size, self.args.block, seed=10**9 + i)).item()
                      for i in range(self.args.eval_batches)]
        self.model.train()
        if hasattr(self.opt, "train"):
            self.opt.train()
        return statistics.mean(losses)

    def train(self, steps: int, schedule_offset: int = 0) -> Iterator[tuple[int, float]]:
        for _ in range(steps):
            for group in self.opt.param_groups:
                group["lr"] = self.lr * self.schedule(self.step - schedule_offset)
            x, y = batch(self.train_data, self.args.batch_size, self.args.block, seed=self.seed * 10**7 + self.step)
            loss = self.model(x, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            if isinstance(self.opt, LionSF):
                self.scale.append(self.opt.last_scale.mean().item())
            if self.step % self.args.eval_every == 0:
                yield self.step, self.val_loss()


_ARGS: argparse.Namespace
_DATA: tuple[torch.Tensor, torch.Tensor]


def init_worker(args: argparse.Namespace) -> None:
    """Per worker process: its thread count, the arguments and the data, loaded once."""
    global _ARGS, _DATA
    torch.set_num_threads(args.threads)
    _ARGS, _DATA = args, stdlib_text(args.data_bytes)


def sweep_run(config: Config, lr: float, seed: int) -> Result:
    """One sweep configuration, trained for its full length."""
    run = Run(config, lr, seed, _ARGS, _DATA)
    curve = list(run.train(run.length))
    return Result(curve, run.scale)


def lionsf_restarts(config: Config, lr: float) -> dict[str, Curve]:
    """Stop LionSF at half way and restart it from a checkpoint, hot and with a fresh state.

    Goes through ``lion_sf_dist.checkpoint``: a hot restart loads parameters and
    ``exp_avg``; a fresh-state restart loads the parameters only.
    """
    import tempfile

    from lion_sf_dist import checkpoint

    half = _ARGS.steps // 2
    base = Run(config, lr, 0, _ARGS, _DATA)
    before = list(base.train(half))
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(tmp, base.model, base.opt, extra={"step": half})
        for mode, hot in (("hot restart (saved state)", True), ("fresh-state restart", False)):
            run = Run(config, lr, 0, _ARGS, _DATA)
            run.step = checkpoint.load(tmp, run.model, run.opt, optimizer_state=hot)["step"]
            curves[f"LionSF {mode}"] = before + list(run.train(_ARGS.steps - half))
    return curves


def adamw_extended(config: Config, lr: float) -> dict[str, Curve]:
    """A cosine AdamW run scheduled to end at half way, then extended with a new warm-up + cosine."""
    half = _ARGS.steps // 2
    adam = Run(config, lr, 0, _ARGS, _DATA)
    adam.schedule = lambda s: cosine(s, half, max(1, half // 20))
    first = list(adam.train(half))
    return {"AdamW cosine done at half, extended with a new schedule":
            first + list(adam.train(_ARGS.steps - half, schedule_offset=half))}


# -- driver -------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", choices=STUDIES, default="convergence")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, help="default 3, 1 for --study large")
    ap.add_argument("--layers", type=int, default=2, help="--study large doubles it")
    ap.add_argument("--width", type=int, default=128, help="--study large multiplies it by 1.5")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, help="default 50; 25 for --study anytime (it must divide --steps / 4)")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--data-bytes", type=int, default=4_000_000, help="how much standard-library text to read")
    ap.add_argument("--lionsf", nargs="+", default=[], metavar="KEY=VALUE",
                    help="LionSF options of the LionSF runs of convergence / anytime / large (default: "
                         "agreement=module pow=1), e.g. the ablation's best: --lionsf agreement=tensor pow=2")
    ap.add_argument("--max-widen", type=int,
                    help="lrs a sweep may add past an edge while its best is there, before reporting it at the edge "
                         "(default 3; 0 for --study precision, which runs one lr)")
    ap.add_argument("--workers", type=int, default=2, help="configurations trained at once, one process each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--out", type=Path, help="default runs/STUDY")
    ap.add_argument("--replot", action="store_true", help="only rebuild the tables and plot from OUT/STUDY.csv")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny model, 8 steps, 2 seeds and 300 kB of text: checks the script runs, measures nothing")
    args = ap.parse_args(argv)
    def default(value, fallback):
        return fallback if value is None else value  # an explicit 0 is an error below
    if args.smoke:
        args.steps, args.layers, args.width, args.heads, args.block, args.batch_size = 8, 1, 32, 2, 16, 4
        args.eval_batches, args.data_bytes, args.max_widen = 1, 300_000, 1
        args.seeds, args.eval_every = default(args.seeds, 2), default(args.eval_every, 2)
    args.seeds = default(args.seeds, 1 if args.study == "large" else 3)
    args.max_widen = default(args.max_widen, 0 if args.study == "precision" else 3)
    args.eval_every = default(args.eval_every, 25 if args.study == "anytime" else 50)
    args.out = default(args.out, Path("runs") / args.study)
    if args.study == "large":
        args.layers, args.width = 2 * args.layers, args.width * 3 // 2
    for name in ("steps", "seeds", "layers", "width", "heads", "block", "batch_size", "eval_every", "eval_batches",
                 "workers", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.lionsf = lionsf_overrides(args.lionsf)
    except ValueError as e:
        ap.error(f"--lionsf {e}")
    if args.lionsf and args.study == "ablation":
        ap.error("--lionsf sets the LionSF runs of the other studies; the ablation sets its own options")
    if args.max_widen < 0:
        ap.error("--max-widen must be >= 0")
    if args.width % args.heads:
        ap.error(f"the width ({args.width}) must be a multiple of --heads")
    if args.steps % args.eval_every:
        ap.error("--eval-every must divide --steps")
    if args.study == "anytime" and (args.steps % 4 or (args.steps // 4) % args.eval_every):
        ap.error("--study anytime reads every run at --steps / 4 and / 2: --steps must be a multiple of 4 "
                 "and --eval-every divide --steps / 4")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    configs = study_configs(args.study, args.steps, args.lionsf)
    if args.replot:
        curves, extras = read_csv(args)
        saved = args.out / f"{args.study}.json"
        meta = json.loads(saved.read_text()) if saved.exists() else {}  # older results: no wall time recorded
    else:
        t0 = time.time()
        curves, extras = train_all(args, configs)
        meta = dict(wall_s=round(time.time() - t0), workers=args.workers, threads=args.threads, steps=args.steps,
                    seeds=args.seeds, layers=args.layers, width=args.width,
                    lionsf={**LIONSF_BASE, **args.lionsf, "betas": list(LIONSF_BASE["betas"])})
        (args.out / f"{args.study}.json").write_text(json.dumps(meta, indent=1) + "\n")
    REPORTS[args.study](args, configs, curves, extras, meta)


def train_all(args: argparse.Namespace, configs: list[Config]) -> tuple[Curves, dict[str, Curve]]:
    """The study's sweeps (and, for ``convergence``, the restarts); writes the CSVs as it goes."""
    with ProcessPoolExecutor(args.workers, get_context("spawn"), init_worker, (args,)) as pool, \
            open(args.out / f"{args.study}.csv", "w", newline="") as f, \
            open(args.out / f"{args.study}-scale.csv", "w", newline="") as g:
        writer, scale_writer = csv.writer(f), csv.writer(g)
        writer.writerow(["experiment", "optimizer", "lr", "seed", "step", "val_loss"])
        scale_writer.writerow(["optimizer", "lr", "seed", "step", "scale_mean"])
        curves = sweep(pool, configs, args, writer, scale_writer)
        restarts: dict[str, Curve] = {}
        if args.study == "convergence":
            best = best_lrs(curves, configs)
            by_name = {c.name: c for c in configs}
            jobs = [pool.submit(lionsf_restarts, by_name["LionSF"], best["LionSF"]),
                    pool.submit(adamw_extended, by_name["AdamW cosine"], best["AdamW cosine"])]
            restarts = {"LionSF uninterrupted": curves[("LionSF", best["LionSF"])][0].curve}
            restarts |= {name: curve for job in jobs for name, curve in job.result().items()}
            for name, curve in restarts.items():
                for step, loss in curve:
                    writer.writerow(["restart", name, "", 0, step, f"{loss:.5f}"])
    return curves, restarts


def sweep(pool: Executor, configs: list[Config], args: argparse.Namespace, writer, scale_writer) -> Curves:
    """Every config at its lrs and ``args.seeds`` seeds, in parallel; widened while a best lr is at an edge.

    After each round, a config whose best lr (lowest mean final loss) is the lowest or
    highest it ran gets one more lr a factor 2 beyond it, up to ``args.max_widen`` times.
    """
    curves: Curves = {}
    todo = {c: list(c.lrs) for c in configs}
    t0 = time.time()
    for _ in range(args.max_widen + 1):
        jobs = [(c, lr, seed) for c, lrs in todo.items() for lr in lrs for seed in range(args.seeds)]
        for (c, lr, seed), result in zip(jobs, pool.map(sweep_run, *zip(*jobs))):
            for step, loss in result.curve:
                writer.writerow(["sweep", c.name, lr, seed, step, f"{loss:.5f}"])
            scale_writer.writerows([c.name, lr, seed, i + 1, f"{v:.5f}"] for i, v in enumerate(result.scale))
            curves.setdefault((c.name, lr), []).append(result)
            print(f"{time.time() - t0:7.0f}s {c.name:28s} lr={lr:g} seed={seed} final val {result.curve[-1][1]:.4f}",
                  flush=True)
        todo = {c: [lr] for c in configs if (lr := beyond_edge(curves, c.name)) is not None}
        if not todo:
            break
    return curves


def lrs_of(curves: Curves, name: str) -> list[float]:
    return sorted(lr for n, lr in curves if n == name)


def final(results: list[Result], at: Optional[int] = None) -> list[float]:
    """Each seed's validation loss at step ``at`` (default: its last evaluation)."""
    return [r.curve[-1][1] if at is None else next(v for s, v in r.curve if s == at) for r in results]


def best_lr(curves: Curves, name: str, at: Optional[int] = None) -> float:
    """The lr of config ``name`` with the lowest mean validation loss at ``at`` (default: the end)."""
    return min(lrs_of(curves, name), key=lambda lr: statistics.mean(final(curves[(name, lr)], at)))


def best_lrs(curves: Curves, configs: list[Config]) -> dict[str, float]:
    return {c.name: best_lr(curves, c.name) for c in configs}


def beyond_edge(curves: Curves, name: str) -> Optional[float]:
    """The next lr to try for ``name``: a factor 2 past its best when that is an edge of its sweep, else None."""
    lrs, best = lrs_of(curves, name), best_lr(curves, name)
    return best / 2 if best == lrs[0] else best * 2 if best == lrs[-1] else None


def read_csv(args: argparse.Namespace) -> tuple[Curves, dict[str, Curve]]:
    """What :func:`train_all` wrote, read back (with the scales); ``args.steps`` and ``args.seeds`` taken from it.

    A CSV written before the scales were recorded (no ``STUDY-scale.csv``) reads with empty scales.
    """
    runs: dict[tuple[str, float], dict[int, Result]] = {}
    restarts: dict[str, Curve] = {}
    with open(args.out / f"{args.study}.csv", newline="") as f:
        for row in csv.DictReader(f):
            point = (int(row["step"]), float(row["val_loss"]))
            if row["experiment"] == "sweep":
                key = (row["optimizer"], float(row["lr"]))
                runs.setdefault(key, {}).setdefault(int(row["seed"]), Result([])).curve.append(point)
            else:
                restarts.setdefault(row["optimizer"], []).append(point)
    scale_csv = args.out / f"{args.study}-scale.csv"
    if scale_csv.exists():
        with open(scale_csv, newline="") as f:
            for row in csv.DictReader(f):
                runs[(row["optimizer"], float(row["lr"]))][int(row["seed"])].scale.append(float(row["scale_mean"]))
    curves = {key: [by_seed[s] for s in sorted(by_seed)] for key, by_seed in runs.items()}
    args.seeds = min(len(c) for c in curves.values())
    args.steps = max(step for c in curves.values() for step, _ in c[0].curve)
    return curves, restarts


def mean_curve(results: list[Result]) -> Curve:
    """The seeds' curves averaged step by step."""
    return [(step, statistics.mean(r.curve[i][1] for r in results)) for i, (step, _) in enumerate(results[0].curve)]


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def steps_to(curve: Curve, target: float) -> str:
    """The first evaluated step at which ``curve`` is at or below ``target``, or "not reached"."""
    return next((str(s) for s, v in curve if v <= target), "not reached")


def best_mark(curves: Curves, name: str, lr: float) -> str:
    """" **best**" for the best lr of ``name``, noting when it is still an edge of the (widened) sweep."""
    if best_lr(curves, name) != lr:
        return ""
    lrs = lrs_of(curves, name)
    return " **best** (edge of the sweep)" if lr in (lrs[0], lrs[-1]) else " **best**"


def header(args: argparse.Namespace, title: str, meta: dict) -> list[str]:
    shape = f"{args.layers}-layer, {args.width}-wide byte-level GPT on stdlib text"
    wall = (f"{meta['wall_s']} s in {meta['workers']} worker processes of {meta['threads']} thread(s)"
            if meta else "not recorded")
    lionsf = ", ".join(f"{k}={v}" for k, v in meta["lionsf"].items()) if "lionsf" in meta else "not recorded"
    return [f"# {title}: {shape}, {args.steps} steps, batch {args.batch_size}x{args.block}, {args.seeds} seed(s)",
            "", f"Wall time: {wall}. LionSF runs (unless a row says otherwise): {lionsf}.", ""]


def sweep_table(curves: Curves, configs: list[Config]) -> list[str]:
    """Every (config, lr) with its final validation loss, mean ± sd over seeds."""
    lines = ["| configuration | lr | final val loss (mean ± sd over seeds) |", "|---|---:|---:|"]
    for c in configs:
        for lr in lrs_of(curves, c.name):
            loss = mean_sd(final(curves[(c.name, lr)]))
            lines.append(f"| {c.name} | {lr:g}{best_mark(curves, c.name, lr)} | {loss} |")
    return lines


def plot_best(ax, curves: Curves, names: list[str], title: str) -> None:
    """Each config's validation curve at its best lr, mean ± sd over seeds."""
    for name in names:
        lr = best_lr(curves, name)
        runs = curves[(name, lr)]
        steps, mean = zip(*mean_curve(runs))
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*([v for _, v in r.curve] for r in runs))]
        line, = ax.plot(steps, mean, label=f"{name} (lr {lr:g})")
        ax.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                        color=line.get_color(), alpha=0.2)
    ax.set(xlabel="step", ylabel="validation loss", title=title)


def save(args: argparse.Namespace, lines: list[str], fig) -> None:
    """OUT/STUDY.md (also printed) and OUT/STUDY.png."""
    (args.out / f"{args.study}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for ax in fig.axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / f"{args.study}.png", dpi=110)


def figure(panels: int) -> tuple[Any, list[Any]]:
    """A matplotlib figure (no display needed) with ``panels`` axes side by side, as a list."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    return fig, list(axes[0])


def report_convergence(args: argparse.Namespace, configs: list[Config], curves: Curves,
                       restarts: dict[str, Curve], meta: dict) -> None:
    """The sweep, steps to the worst final of the best runs, and the restart experiment."""
    best = best_lrs(curves, configs)
    lines = header(args, "Convergence", meta) + sweep_table(curves, configs)
    means = {name: mean_curve(curves[(name, best[name])]) for name in best}
    target = max(curve[-1][1] for curve in means.values())
    lines += ["", f"## Steps to reach val loss {target:.4f} (the worst final of the best runs), mean over seeds", "",
              "| optimizer (best lr) | steps |", "|---|---:|"]
    lines += [f"| {name} ({best[name]:g}) | {steps_to(curve, target)} |" for name, curve in means.items()]
    lines += ["", "## Restart at half way", "",
              "| run | val loss at half | worst after restart | spike "
              "| steps until back at the half-way loss | final |",
              "|---|---:|---:|---:|---:|---:|"]
    half = args.steps // 2
    for name, curve in restarts.items():
        at_half = next(v for s, v in curve if s >= half)
        after = [(s, v) for s, v in curve if s > half]
        worst = max(v for _, v in after)
        back = next((str(s - half) for s, v in after if v <= at_half), "never")
        lines.append(f"| {name} | {at_half:.4f} | {worst:.4f} | {max(0.0, worst - at_half):+.4f} | {back} "
                     f"| {curve[-1][1]:.4f} |")
    fig, (a, b) = figure(2)
    plot_best(a, curves, list(best), "best lr of each, mean ± sd over seeds")
    for name, curve in restarts.items():
        b.plot([s for s, _ in curve], [v for _, v in curve], label=name)
    b.axvline(half, color="grey", linestyle=":")
    b.set(xlabel="step", ylabel="validation loss", title="restart at half way")
    for ax in (a, b):
        ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    save(args, lines, fig)


def report_ablation(args: argparse.Namespace, configs: list[Config], curves: Curves,
                    _restarts: dict[str, Curve], meta: dict) -> None:
    """Each option at its best lr against plain Lion's final loss; the mean scale of each unit type."""
    target = mean_curve(curves[(CONTROL, best_lr(curves, CONTROL))])[-1][1]
    lines = header(args, "LionSF ablation", meta)
    lines += ["| configuration | lrs run | best lr | final val loss (mean ± sd) | steps to reach plain Lion's final "
              f"loss ({target:.4f}) |", "|---|---|---:|---:|---:|"]
    for c in configs:
        lr, lrs = best_lr(curves, c.name), lrs_of(curves, c.name)
        edge = " (edge)" if lr in (lrs[0], lrs[-1]) else ""
        runs = curves[(c.name, lr)]
        lines.append(f"| {c.name} | {', '.join(f'{x:g}' for x in lrs)} | {lr:g}{edge} "
                     f"| {mean_sd(final(runs))} | {steps_to(mean_curve(runs), target)} |")
    lines += ["", "## Every run", ""] + sweep_table(curves, configs)
    fig, (a, b) = figure(2)
    plot_best(a, curves, [c.name for c in configs], "best lr of each, mean ± sd over seeds")
    lowest = min(mean_curve(curves[(c.name, best_lr(curves, c.name))])[-1][1] for c in configs)
    a.set_ylim(top=min(3.5, lowest + 0.6, a.get_ylim()[1]))  # nine curves end close together: show the ends
    units = [c.name for c in configs if c.name.startswith("agreement ") and c.name != "agreement_ema"]
    window = max(1, args.steps // 50)
    for name in units:
        runs = curves[(name, best_lr(curves, name))]
        if not all(r.scale for r in runs):
            raise ValueError(f"{args.out / 'ablation-scale.csv'} has no per-step scale of {name!r}: "
                             "run the study again")
        per_step = [statistics.mean(v) for v in zip(*(r.scale for r in runs))]
        smooth = [statistics.mean(per_step[max(0, i - window + 1):i + 1]) for i in range(len(per_step))]
        unit = name.removeprefix("agreement ").split(",")[0]
        b.plot(range(1, len(smooth) + 1), smooth, label=f"{unit} (lr {best_lr(curves, name):g})")
    b.set(xlabel="step", ylabel=f"mean scale over units ({window}-step average)", ylim=(0, 1.02),
          title="LionSF's agreement scale by unit type (best lr, mean over seeds)")
    save(args, lines, fig)


def report_anytime(args: argparse.Namespace, configs: list[Config], curves: Curves,
                   _restarts: dict[str, Curve], meta: dict) -> None:
    """Who wins at each budget, and how many training steps each method spent to answer all budgets."""
    lionsf = best_lr(curves, "LionSF")
    lines = header(args, "Anytime: tuned per budget vs one constant-lr LionSF run", meta)
    lines += [f"LionSF runs at lr {lionsf:g} (its best at {args.steps} steps) and is read at each budget; the other "
              "two are tuned and run for each budget. Validation loss, mean ± sd over seeds.", "",
              "| budget | AdamW cosine (best lr) | schedule-free AdamW (best lr) | LionSF, one run | "
              "LionSF, best lr for this budget | lowest |", "|---:|---:|---:|---:|---:|---|"]
    for budget in budgets(args.steps):
        cells = {}
        for name in (f"AdamW cosine {budget}", f"schedule-free AdamW {budget}"):
            lr = best_lr(curves, name)
            cells[name.rsplit(" ", 1)[0]] = (final(curves[(name, lr)], budget), lr)
        cells["LionSF"] = (final(curves[("LionSF", lionsf)], budget), lionsf)
        at_budget = best_lr(curves, "LionSF", budget)
        first, second = sorted(cells, key=lambda k: statistics.mean(cells[k][0]))[:2]
        margin = statistics.mean(cells[second][0]) - statistics.mean(cells[first][0])
        spread = max(statistics.stdev(cells[k][0]) if args.seeds > 1 else 0.0 for k in (first, second))
        winner = f"{first} (within 1 sd of {second})" if margin < spread else f"{first} by {margin:.4f}"
        lines.append(f"| {budget} | " + " | ".join(f"{mean_sd(v)} ({lr:g})" for v, lr in cells.values())
                     + f" | {mean_sd(final(curves[('LionSF', at_budget)], budget))} ({at_budget:g}) | {winner} |")
    lines += ["", "Training steps spent to answer all three budgets (every lr tried, every seed; and one seed at "
              "the chosen lrs alone):", "", "| method | steps, whole sweep | steps, chosen lrs, one seed |",
              "|---|---:|---:|"]
    for method in ("AdamW cosine", "schedule-free AdamW", "LionSF"):
        mine = [c for c in configs if c.optimizer == method]
        total = sum(len(curves[(c.name, lr)]) * (c.steps or args.steps) for c in mine for lr in lrs_of(curves, c.name))
        lines.append(f"| {method} | {total} | {sum(c.steps or args.steps for c in mine)} |")
    fig, (a,) = figure(1)
    plot_best(a, curves, [c.name for c in configs], "best lr of each budget, mean ± sd over seeds")
    for budget in budgets(args.steps):
        a.axvline(budget, color="grey", linestyle=":")
    a.set_ylim(top=min(3.5, a.get_ylim()[1]))
    save(args, lines, fig)


def report_large(args: argparse.Namespace, configs: list[Config], curves: Curves,
                 _restarts: dict[str, Curve], meta: dict) -> None:
    """LionSF against AdamW cosine on the larger model: the sweep and the gap at the best lrs."""
    params = sum(p.numel() for p in GPT(args.layers, args.width, args.heads, args.block).parameters())
    lines = header(args, f"Larger model ({params / 1e6:.2f}M parameters)", meta) + sweep_table(curves, configs)
    best = best_lrs(curves, configs)
    gap = statistics.mean(final(curves[("LionSF", best["LionSF"])])) - statistics.mean(
        final(curves[("AdamW cosine", best["AdamW cosine"])]))
    lines += ["", f"LionSF's final loss minus AdamW cosine's, at the best lrs: {gap:+.4f}."]
    fig, (a,) = figure(1)
    plot_best(a, curves, list(best), "best lr of each, mean ± sd over seeds")
    a.set_ylim(top=min(3.5, a.get_ylim()[1]))
    save(args, lines, fig)


def state_bytes_per_param(config: Config, args: argparse.Namespace) -> float:
    """Bytes per parameter of the parameters and the optimizer state, measured after one step."""
    model = GPT(args.layers, args.width, args.heads, args.block).to(config.dtype)
    opt = make_optimizer(config, model, 1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    params = list(model.parameters())
    state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.shape == p.shape]
    return sum(t.numel() * t.element_size() for t in params + state) / sum(p.numel() for p in params)


def report_precision(args: argparse.Namespace, configs: list[Config], curves: Curves,
                     _restarts: dict[str, Curve], meta: dict) -> None:
    """Final loss of each precision at the same lr, beside its bytes per parameter."""
    lines = header(args, "LionSF in low precision", meta)
    lines += ["| parameters, state, rounding | bytes / parameter (params + state) | lr | final val loss (mean ± sd) "
              "| minus fp32's |", "|---|---:|---:|---:|---:|"]
    baseline = statistics.mean(final(curves[(configs[0].name, best_lr(curves, configs[0].name))]))
    for c in configs:
        lr = best_lr(curves, c.name)
        runs = final(curves[(c.name, lr)])
        lines.append(f"| {c.name} | {state_bytes_per_param(c, args):g} | {lr:g} | {mean_sd(runs)} "
                     f"| {statistics.mean(runs) - baseline:+.4f} |")
    lines += ["", "Gradients add the parameters' size again (4 or 2 bytes). The loss is computed in fp32 from "
              "the logits in every run."]
    fig, (a,) = figure(1)
    plot_best(a, curves, [c.name for c in configs], "mean ± sd over seeds")
    a.set_ylim(top=min(3.5, a.get_ylim()[1]))
    save(args, lines, fig)


REPORTS = {"convergence": report_convergence, "ablation": report_ablation, "anytime": report_anytime,
           "large": report_large, "precision": report_precision}


if __name__ == "__main__":
    main()
