#!/usr/bin/env bash
# Every CUDA check in one run, for a machine with a GPU (see README, "On a GPU"):
# paths against the CPU reference and a non-blocking step, the step benchmark on the GPU, op counts.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
"$python" launch/gpu_check.py --device cuda
"$python" launch/bench_step.py --device cuda --rounds 20
"$python" launch/bench_step.py --count-ops
