#!/usr/bin/env bash
# The main job on a fresh machine (about 10 minutes on 2 CPU cores):
#   set up .venv; convert ../shared/data/msd_hippocampus; train in the background while a second
#   process (the evaluator) watches the checkpoints beside it; print per-class Dice on the validation
#   split; write the learning curves and overlay PNGs into the run folder.
# Extra arguments are params overrides, e.g.: bash scripts/demo.sh --set training.steps=2000
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/medseg ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e .
fi
medseg=.venv/bin/medseg
run=runs/hippocampus-demo
demo_settings=(--set experiment.model_dir=$run --set training.steps=${DEMO_STEPS:-400}
               --set training.checkpoint_every=100 --set sampling.patch_size=[32,40,32]
               --set model.base_filters=8 --set training.learning_rate=0.003
               --set evaluation.save_predictions=true)
$medseg convert --params params/hippocampus.yaml "${demo_settings[@]}" "$@"
: > $run/train.log  # there before tail opens it
$medseg train --params $run/params.yaml > $run/train.log 2>&1 &
train_pid=$!
$medseg evaluate --params $run/params.yaml --timeout 900 > $run/evaluate.log 2>&1 &
eval_pid=$!
echo "training (pid $train_pid, log $run/train.log) and evaluating (pid $eval_pid, log $run/evaluate.log)"
tail -f $run/train.log --pid $train_pid | grep --line-buffered "^step" || true
wait $train_pid
echo "training done; waiting for the evaluator to score the last checkpoint"
wait $eval_pid
$medseg show --curves $run --out $run/curves.png
.venv/bin/python - "$run" <<'PY'
import json, os, sys
from medseg_dl.experiment.model_dir import ModelDir
run = sys.argv[1]
model_dir = ModelDir(os.path.abspath(run))
best = json.load(open(model_dir.best_index))[0]
summary = json.load(open(model_dir.summary_path(best["step"])))
print(f"best checkpoint: step {best['step']} ({summary['subjects']} validation cases)")
for name, stats in summary["classes"].items():
    print(f"  {name:10s} Dice {stats['dice']['mean']:.3f}  ASSD {stats['assd_mm']['mean']:.2f} mm  "
          f"HD95 {stats['hd95_mm']['mean']:.2f} mm")
print(f"  mean Dice {summary['mean_dice']:.3f}")
print(f"learning curves: {run}/curves.png")
print(f"overlays and predictions: {run}/eval/{best['step']}/overlays/, predictions/")
print(f"metrics per subject: {run}/eval/{best['step']}/metrics.csv; TensorBoard: tensorboard --logdir {run}/logs")
PY
