#!/usr/bin/env bash
# One virtual environment per measured library under .venv-bench/ (benchmarks/harness.py, python_for, picks
# them): a process then holds only its own library. In one environment with everything, MONAI imports
# TensorFlow (about 640 MB of RSS charged to MONAI) and ITK imports torch (charged to medseg_dl).
#   ours           medseg_dl and its dependencies, no torch
#   peers          the .[bench] extra (torch, MONAI, TorchIO, medpy, surface-distance) with medseg_dl's
#                  readers, TensorFlow and Keras removed
#   elasticdeform  numpy < 2 and the .[bench] pin of elasticdeform (built against numpy 1)
#   nnunet         nnU-Net v2 (the .[bench] pin of torch, CPU build), the peer of the large-data workloads
set -euo pipefail
cd "$(dirname "$0")/.."
root=.venv-bench
pin() { python3 -c "import tomllib, sys; print(next(p for p in tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench'] if p.startswith(sys.argv[1])))" "$1"; }
python3 -m venv "$root/ours"
"$root/ours/bin/python" -m pip install --quiet -e .
python3 -m venv "$root/peers"
"$root/peers/bin/python" -m pip install --quiet -e '.[bench]'
"$root/peers/bin/python" -m pip uninstall --quiet --yes tensorflow keras tensorboard
python3 -m venv "$root/elasticdeform"
"$root/elasticdeform/bin/python" -m pip install --quiet "numpy<2" scipy "$(pin elasticdeform)"
python3 -m venv "$root/nnunet"
"$root/nnunet/bin/python" -m pip install --quiet "$(pin torch)" nnunetv2==2.8.1 psutil
echo "made $root/ours, $root/peers, $root/elasticdeform, $root/nnunet"
