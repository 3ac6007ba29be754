"""Draw the metrics.csv of one or several launch/train.py runs into one PNG.

    python launch/plot.py runs/fsdp runs/ds [--out compare.png]

Left: training loss (thin line) and validation loss (dots) against step; right: the mean
LionSF scale against step. Each run is one colour, labelled by its directory and the
world sizes it ran at (``W=2→3`` for a run resumed at another size), and by its engine
where the CSV has an ``engine`` column. A step logged twice (a job restarted from an
older checkpoint logs the steps after it again) is drawn from its newest row, the one the
run continued from. Without ``--out`` the PNG is ``metrics.png`` beside the first run's
``metrics.csv``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunLog:
    """One run's metrics.csv: a label and, per column, the values by step (newest row per step)."""

    label: str
    steps: list[int]
    loss: list[float]
    val: list[tuple[int, float]]  # only the rows with an evaluation
    scale: list[float]


def read_run(run_dir: Path) -> RunLog:
    """``run_dir/metrics.csv`` as a :class:`RunLog`; a last line still being written is left out."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if None not in r.values() and r["world_size"]]
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.csv'} has no complete row yet")
    by_step = {int(r["step"]): r for r in rows}  # later rows replace earlier ones of the same step
    steps = sorted(by_step)
    worlds: list[str] = []
    for r in rows:
        if not worlds or worlds[-1] != r["world_size"]:
            worlds.append(r["world_size"])
    label = f"{run_dir} (W={'→'.join(worlds)}"
    engines = sorted({r["engine"] for r in rows}) if "engine" in rows[0] else []
    label += f", {'/'.join(engines)})" if engines else ")"
    return RunLog(label=label, steps=steps, loss=[float(by_step[s]["loss"]) for s in steps],
                  val=[(s, float(by_step[s]["val_loss"])) for s in steps if by_step[s]["val_loss"]],
                  scale=[float(by_step[s]["scale_mean"]) for s in steps])


def plot(runs: list[RunLog], out: Path) -> None:
    """The two panels of the module docstring, written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        line, = left.plot(run.steps, run.loss, linewidth=0.8, alpha=0.6, label=f"{run.label} train")
        if run.val:
            left.plot(*zip(*run.val), "o-", color=line.get_color(), markersize=3, label=f"{run.label} val")
        right.plot(run.steps, run.scale, color=line.get_color(), label=run.label)
    left.set(xlabel="step", ylabel="loss (nats per byte)", title="training (line) and validation (dots) loss")
    right.set(xlabel="step", ylabel="mean LionSF scale", title="mean agreement scale over units", ylim=(0, 1.02))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Plot the metrics.csv of launch/train.py runs.")
    ap.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="a train.py --out directory")
    ap.add_argument("--out", type=Path, help="the PNG (default: RUN_DIR/metrics.png of the first run)")
    args = ap.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.csv").is_file()]
    if missing:
        ap.error(f"no metrics.csv in {', '.join(missing)}")
    out = args.out or args.runs[0] / "metrics.png"
    try:
        runs = [read_run(r) for r in args.runs]
    except ValueError as e:  # a log with a header only: the run has not reached its first row
        ap.error(str(e))
    plot(runs, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
