#!/usr/bin/env bash
# The two-process workflow on one GPU: training steps/s alone and with the evaluator beside it, and
# each process's peak GPU memory, with and without mixed precision (see benchmarks/gpu_workflow.py).
#   bash benchmarks/gpu_workflow.sh                  # on a GPU machine, 3 minutes per run (4 runs)
#   bash benchmarks/gpu_workflow.sh --cpu --minutes 1  # the CPU form: float32, a small network, peak RSS
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
exec "$python" benchmarks/gpu_workflow.py "$@"
