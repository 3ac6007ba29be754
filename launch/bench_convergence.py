"""Convergence of LionSF against its peers on the char-LM of launch/train.py, single process.

Optimizers, each at a small learning-rate sweep and several seeds, same data order:
LionSF (constant lr, no schedule), Lion (constant lr), AdamW with linear warm-up and
cosine decay, and schedule-free AdamW (``schedulefree.AdamWScheduleFree``). Then a
hot-restart experiment: stop at half way and continue with the saved LionSF state, with
a fresh ``exp_avg``, and, for comparison, extend a finished cosine AdamW run by the same
number of steps with a new warm-up + cosine schedule.

Writes ``OUT/convergence.csv`` (every evaluation), ``OUT/convergence.md`` (tables) and
``OUT/convergence.png`` (curves at each optimizer's best lr, and the restarts).

    python launch/bench_convergence.py --steps 1500 --seeds 3 --workers 2 --out runs/convergence

Every configuration is independent and deterministic, so ``--workers`` runs them in
parallel processes (``--threads`` each); the losses do not depend on it. ``--replot``
rebuilds the tables and the plot from an existing ``OUT/convergence.csv`` without training.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import GPT, batch, stdlib_text  # noqa: E402  (the training script's model and data)

from lion_sf_dist import LionSF  # noqa: E402

LRS = {
    "LionSF": [1e-3, 2e-3, 4e-3, 8e-3],
    "Lion": [2.5e-4, 5e-4, 1e-3, 2e-3],
    "AdamW cosine": [1.5e-3, 3e-3, 6e-3, 1.2e-2],
    "schedule-free AdamW": [3e-3, 6e-3, 1.2e-2, 2.4e-2],
}


def cosine(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak, as a multiplier."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


class Run:
    """One optimizer on one model: ``train(steps)`` yields ``(step, val_loss)`` at each evaluation."""

    def __init__(self, name: str, lr: float, seed: int, args: argparse.Namespace, data) -> None:
        self.name, self.lr, self.seed, self.args = name, lr, seed, args
        self.train_data, self.val_data = data
        torch.manual_seed(seed)
        self.model = GPT(args.layers, args.width, args.heads, args.block)
        self.opt = make_optimizer(name, self.model, lr)
        self.schedule: Callable[[int], float] = lambda s: 1.0
        if name == "AdamW cosine":
            self.schedule = lambda s: cosine(s, args.steps, args.steps // 20)
        self.step = 0

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
            if self.step % self.args.eval_every == 0:
                yield self.step, self.val_loss()


def make_optimizer(name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "LionSF":
        return LionSF(model.named_parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0, agreement="module")
    if name == "Lion":
        from lion_pytorch import Lion

        return Lion(model.parameters(), lr=lr, betas=(0.9, 0.99))
    if name == "AdamW cosine":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if name == "schedule-free AdamW":
        import schedulefree

        opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=lr, warmup_steps=0, weight_decay=0.0)
        opt.train()
        return opt
    raise ValueError(name)


Curve = list[tuple[int, float]]  # (step, validation loss) at each evaluation
Curves = dict[tuple[str, float], list[Curve]]  # (optimizer, lr) -> one curve per seed
_ARGS: argparse.Namespace
_DATA: tuple[torch.Tensor, torch.Tensor]


def init_worker(args: argparse.Namespace) -> None:
    """Per worker process: its thread count, the arguments and the data, loaded once."""
    global _ARGS, _DATA
    torch.set_num_threads(args.threads)
    _ARGS, _DATA = args, stdlib_text(4_000_000)


def sweep_run(name: str, lr: float, seed: int) -> Curve:
    """One sweep configuration, trained for the full run."""
    return list(Run(name, lr, seed, _ARGS, _DATA).train(_ARGS.steps))


def lionsf_restarts(lr: float) -> dict[str, Curve]:
    """Stop LionSF at half way and restart it from a checkpoint, hot and with a fresh state.

    Goes through ``lion_sf_dist.checkpoint``: a hot restart loads parameters and
    ``exp_avg``; a fresh-state restart loads the parameters only.
    """
    import tempfile

    from lion_sf_dist import checkpoint

    half = _ARGS.steps // 2
    base = Run("LionSF", lr, 0, _ARGS, _DATA)
    before = list(base.train(half))
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(tmp, base.model, base.opt, extra={"step": half})
        for mode, hot in (("hot restart (saved state)", True), ("fresh-state restart", False)):
            run = Run("LionSF", lr, 0, _ARGS, _DATA)
            run.step = checkpoint.load(tmp, run.model, run.opt, optimizer_state=hot)["step"]
            curves[f"LionSF {mode}"] = before + list(run.train(_ARGS.steps - half))
    return curves


def adamw_extended(lr: float) -> dict[str, Curve]:
    """A cosine AdamW run scheduled to end at half way, then extended with a new warm-up + cosine."""
    half = _ARGS.steps // 2
    adam = Run("AdamW cosine", lr, 0, _ARGS, _DATA)
    adam.schedule = lambda s: cosine(s, half, max(1, half // 20))
    first = list(adam.train(half))
    return {"AdamW cosine done at half, extended with a new schedule":
            first + list(adam.train(_ARGS.steps - half, schedule_offset=half))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="configurations trained at once, one process each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--out", type=Path, default=Path("runs/convergence"))
    ap.add_argument("--replot", action="store_true", help="only rebuild the table and plot from OUT/convergence.csv")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    curves, restarts = read_csv(args) if args.replot else train_all(args)
    report(args, curves, restarts)


def best_lrs(curves: Curves) -> dict[str, float]:
    """Each optimizer's learning rate with the lowest final validation loss, mean over seeds."""
    return {name: min(LRS[name], key=lambda lr: statistics.mean(c[-1][1] for c in curves[(name, lr)])) for name in LRS}


def train_all(args: argparse.Namespace) -> tuple[Curves, dict[str, Curve]]:
    """Every sweep configuration, then the restart experiment at the best lrs; writes the CSV as it goes."""
    configs = [(name, lr, seed) for name, lrs in LRS.items() for lr in lrs for seed in range(args.seeds)]
    curves: Curves = {}
    t0 = time.time()
    with ProcessPoolExecutor(args.workers, get_context("spawn"), init_worker, (args,)) as pool, \
            open(args.out / "convergence.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["experiment", "optimizer", "lr", "seed", "step", "val_loss"])
        for (name, lr, seed), curve in zip(configs, pool.map(sweep_run, *zip(*configs))):
            for step, loss in curve:
                writer.writerow(["sweep", name, lr, seed, step, f"{loss:.5f}"])
            curves.setdefault((name, lr), []).append(curve)
            print(f"{time.time() - t0:7.0f}s {name:22s} lr={lr:g} seed={seed} final val {curve[-1][1]:.4f}",
                  flush=True)
        best = best_lrs(curves)
        jobs = [pool.submit(lionsf_restarts, best["LionSF"]), pool.submit(adamw_extended, best["AdamW cosine"])]
        restarts = {"LionSF uninterrupted": curves[("LionSF", best["LionSF"])][0]}
        restarts |= {name: curve for job in jobs for name, curve in job.result().items()}
        for name, curve in restarts.items():
            for step, loss in curve:
                writer.writerow(["restart", name, "", 0, step, f"{loss:.5f}"])
    return curves, restarts


def read_csv(args: argparse.Namespace) -> tuple[Curves, dict[str, Curve]]:
    """What :func:`train_all` wrote, read back; ``args.steps`` and ``args.seeds`` taken from it."""
    runs: dict[tuple[str, float], dict[int, Curve]] = {}
    restarts: dict[str, Curve] = {}
    with open(args.out / "convergence.csv", newline="") as f:
        for row in csv.DictReader(f):
            point = (int(row["step"]), float(row["val_loss"]))
            if row["experiment"] == "sweep":
                runs.setdefault((row["optimizer"], float(row["lr"])), {}).setdefault(int(row["seed"]), []).append(point)
            else:
                restarts.setdefault(row["optimizer"], []).append(point)
    curves = {key: [by_seed[s] for s in sorted(by_seed)] for key, by_seed in runs.items()}
    args.seeds = min(len(c) for c in curves.values())
    args.steps = max(step for c in curves.values() for step, _ in c[0])
    return curves, restarts


def mean_curve(runs: list[Curve]) -> Curve:
    """The seeds' curves averaged step by step."""
    return [(step, statistics.mean(r[i][1] for r in runs)) for i, (step, _) in enumerate(runs[0])]


def report(args: argparse.Namespace, curves: Curves, restarts: dict[str, Curve]) -> None:
    """OUT/convergence.md (and printed) and OUT/convergence.png."""
    best = best_lrs(curves)
    lines = [f"# Convergence: {args.layers}-layer, {args.width}-wide byte-level GPT on stdlib text, "
             f"{args.steps} steps, batch {args.batch_size}x{args.block}, {args.seeds} seeds", "",
             "| optimizer | lr | final val loss (mean ± sd over seeds) |", "|---|---:|---:|"]
    for (name, lr), runs in curves.items():
        vals = [c[-1][1] for c in runs]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        mark = ""
        if best[name] == lr:
            edge = lr in (LRS[name][0], LRS[name][-1])
            mark = " **best** (edge of the sweep)" if edge else " **best**"
        lines.append(f"| {name} | {lr:g}{mark} | {statistics.mean(vals):.4f} ± {sd:.4f} |")
    means = {name: mean_curve(curves[(name, best[name])]) for name in best}
    target = max(curve[-1][1] for curve in means.values())
    lines += ["", f"## Steps to reach val loss {target:.4f} (the worst final of the best runs), mean over seeds", "",
              "| optimizer (best lr) | steps |", "|---|---:|"]
    for name, curve in means.items():
        lines.append(f"| {name} ({best[name]:g}) | {next(s for s, v in curve if v <= target)} |")
    lines += ["", "## Restart at half way", "",
              "| run | val loss at half | worst after restart | spike | steps until back at the half-way loss | final |",
              "|---|---:|---:|---:|---:|---:|"]
    half = args.steps // 2
    for name, curve in restarts.items():
        at_half = next(v for s, v in curve if s >= half)
        after = [(s, v) for s, v in curve if s > half]
        worst = max(v for _, v in after)
        back = next((str(s - half) for s, v in after if v <= at_half), "never")
        lines.append(f"| {name} | {at_half:.4f} | {worst:.4f} | {max(0.0, worst - at_half):+.4f} | {back} "
                     f"| {curve[-1][1]:.4f} |")
    (args.out / "convergence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in best:
        runs = curves[(name, best[name])]
        steps, mean = zip(*mean_curve(runs))
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*([v for _, v in r] for r in runs))]
        line, = a.plot(steps, mean, label=f"{name} (lr {best[name]:g})")
        a.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                       color=line.get_color(), alpha=0.2)
    a.set(xlabel="step", ylabel="validation loss", title="best lr of each, mean ± sd over seeds")
    for name, curve in restarts.items():
        b.plot([s for s, _ in curve], [v for _, v in curve], label=name)
    b.axvline(half, color="grey", linestyle=":")
    b.set(xlabel="step", ylabel="validation loss", title="restart at half way")
    for ax in (a, b):
        ax.legend()
        ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    fig.tight_layout()
    fig.savefig(args.out / "convergence.png", dpi=110)


if __name__ == "__main__":
    main()
