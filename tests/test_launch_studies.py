"""launch/plot.py and launch/bench_convergence.py run on tiny configurations and write their outputs.

The studies themselves are benchmarks (hours); these only check that each one runs end
to end on ``--smoke`` (a tiny model, a few steps) and writes what it says it writes.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train import ENV, ROOT, run

sys.path.insert(0, str(ROOT / "launch"))
import bench_convergence as bench  # noqa: E402
import plot  # noqa: E402

sys.path.remove(str(ROOT / "launch"))


def script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / name), *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_plot_draws_two_runs_one_resumed_at_another_world_size(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(1, "--steps", "10", "--log-every", "2", "--eval-every", "5", "--out", str(a))
    run(1, "--steps", "10", "--eval-every", "5", "--out", str(b))
    run(2, "--steps", "20", "--eval-every", "5", "--resume", "--out", str(b))
    assert plot.read_run(b).label == f"{b} (W=1→2)"
    log = plot.read_run(a)
    assert log.steps == [2, 4, 5, 6, 8, 10] and [s for s, _ in log.val] == [5, 10]
    proc = script("plot.py", str(a), str(b))
    assert proc.returncode == 0, proc.stderr
    png = a / "metrics.png"
    assert proc.stdout.strip() == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert (width, height) == (1320, 495)  # 12 x 4.5 inches at 110 dpi
    assert script("plot.py", str(b), "--out", str(tmp_path / "x.png")).returncode == 0 and (tmp_path / "x.png").exists()


def test_plot_without_metrics_is_a_clear_error(tmp_path):
    proc = script("plot.py", str(tmp_path))
    assert proc.returncode == 2 and "no metrics.csv" in proc.stderr


def smoke_rows(out: Path, name: str) -> list[dict[str, str]]:
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("study, heading", [
    ("convergence", "## Restart at half way"),
    ("ablation", "steps to reach plain Lion's final loss"),
    ("anytime", "| budget | AdamW cosine (best lr)"),
    ("large", "LionSF's final loss minus AdamW cosine's"),
    ("precision", "| bytes / parameter (params + state) | lr |"),
])
def test_study_smoke_writes_tables_plot_and_scales(study, heading, tmp_path):
    proc = script("bench_convergence.py", "--study", study, "--smoke", "--workers", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / f"{study}.md").read_text()
    assert heading in md and "Wall time: " in md and (tmp_path / f"{study}.png").stat().st_size > 10_000
    evals = smoke_rows(tmp_path, f"{study}.csv")
    scales = smoke_rows(tmp_path, f"{study}-scale.csv")
    lionsf = {c.name for c in bench.study_configs(study, 8) if c.optimizer == "LionSF"}
    lionsf_runs = {(r["optimizer"], r["lr"], r["seed"]) for r in evals
                   if r["experiment"] == "sweep" and r["optimizer"] in lionsf}
    assert lionsf_runs and len(scales) == 8 * len(lionsf_runs)  # one mean scale per step of every LionSF run
    assert all(0.0 <= float(r["scale_mean"]) <= 1.0 for r in scales)
    (tmp_path / f"{study}.md").unlink()
    bench.main(["--study", study, "--smoke", "--replot", "--out", str(tmp_path)])
    replotted = (tmp_path / f"{study}.md").read_text()
    assert replotted.splitlines()[:3] == md.splitlines()[:3]  # the same study and wall time


def test_large_study_has_four_times_the_parameters():
    small, large = bench.parse([]), bench.parse(["--study", "large"])
    def count(a):
        return sum(p.numel() for p in bench.GPT(a.layers, a.width, a.heads, a.block).parameters())
    assert 3.8 < count(large) / count(small) < 4.2 and large.seeds == 1 and small.seeds == 3


def test_precision_study_runs_what_its_rows_say():
    args = bench.parse(["--study", "precision", "--smoke"])
    configs = {c.name: c for c in bench.study_configs("precision", 8)}
    expected = {  # (parameter dtype, exp_avg dtype, stochastic rounding, bytes of both per parameter)
        "fp32 params, fp32 state": (torch.float32, torch.float32, False, 8),
        "fp32 params, bf16 state": (torch.float32, torch.bfloat16, False, 6),
        "bf16 params, bf16 state, nearest": (torch.bfloat16, torch.bfloat16, False, 4),
        "bf16 params, bf16 state, stochastic": (torch.bfloat16, torch.bfloat16, True, 4),
    }
    assert configs.keys() == expected.keys()
    for name, (param_dtype, state_dtype, stochastic, size) in expected.items():
        run = bench.Run(configs[name], 1e-3, 0, args, (torch.zeros(4000, dtype=torch.long),) * 2)
        list(run.train(1))
        p = next(run.model.parameters())
        assert (p.dtype, run.opt.state[p]["exp_avg"].dtype, run.opt.stochastic_rounding) == (
            param_dtype, state_dtype, stochastic), name
        assert bench.state_bytes_per_param(configs[name], args) == size


def test_lionsf_flag_reaches_the_lionsf_runs_only():
    args = bench.parse(["--study", "large", "--lionsf", "pow=2", "agreement=tensor", "agreement_ema=true"])
    lionsf, adamw = bench.study_configs("large", 1500, args.lionsf)
    opt = bench.make_optimizer(lionsf, bench.GPT(1, 32, 2, 16), 1e-3)
    assert (opt.pow, opt.agreement, opt.agreement_ema, opt.negative) == (2.0, "tensor", True, "abs")
    assert adamw.options == ()
    assert bench.make_optimizer(bench.study_configs("large", 1500)[0], bench.GPT(1, 32, 2, 16), 1e-3).pow == 1.0


def fake(loss_by_lr: dict[float, float]) -> bench.Curves:
    return {("x", lr): [bench.Result([(10, loss)])] for lr, loss in loss_by_lr.items()}


def test_sweep_widens_only_past_an_edge_best():
    assert bench.beyond_edge(fake({1e-3: 2.0, 2e-3: 1.5, 4e-3: 1.8}), "x") is None
    assert bench.beyond_edge(fake({1e-3: 2.0, 2e-3: 1.9, 4e-3: 1.8}), "x") == 8e-3
    assert bench.beyond_edge(fake({1e-3: 1.7, 2e-3: 1.9, 4e-3: 2.8}), "x") == 5e-4


@pytest.mark.parametrize("flags, message", [
    (["--study", "anytime", "--steps", "1500", "--eval-every", "50"], "--eval-every divide --steps / 4"),
    (["--study", "anytime", "--steps", "1450", "--eval-every", "50"], "--steps must be a multiple of 4"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--max-widen", "-1"], "--max-widen must be >= 0"),
    (["--lionsf", "pow"], "expected KEY=VALUE"),
    (["--lionsf", "agreement_ema=yes"], "agreement_ema cannot be 'yes'"),
    (["--lionsf", "agreement=layer"], "agreement must be one of"),
    (["--study", "ablation", "--lionsf", "pow=2"], "the ablation sets its own options"),
    (["--steps", "1000", "--eval-every", "300"], "--eval-every must divide --steps"),
])
def test_bad_study_flag_is_a_clear_error(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
