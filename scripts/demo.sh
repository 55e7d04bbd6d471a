#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, convert the bundled hippocampus data
# (../shared/data/msd_hippocampus) into runs/hippocampus/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/medseg ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e .
fi
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/medseg convert --params params/hippocampus.yaml "$@"
