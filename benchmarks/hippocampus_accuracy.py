"""Accuracy on held-out hippocampus cases after a fixed training budget.

Trains `params/hippocampus.yaml` (20% of the 208 cases held out as the test split, never seen in
training or model selection) for `--minutes` of wall time (the training process is stopped with
SIGTERM, which saves a checkpoint) or `--steps`, then scores the last checkpoint on the test
cases and prints one JSON line: per-class Dice, ASSD, HD95 (means), minutes, steps, network.

    python benchmarks/hippocampus_accuracy.py --minutes 60 --architecture unet
    python benchmarks/hippocampus_accuracy.py --minutes 60 --architecture medpatchnet [--no-position]
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def train(params_path, overrides, minutes):
    """Run `medseg train` in a subprocess; SIGTERM after `minutes` (None: run to training.steps)."""
    command = [sys.executable, "-m", "medseg_dl.cli", "train", "--params", params_path, "--overwrite"]
    for override in overrides:
        command += ["--set", override]
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO)
    try:
        process.wait(timeout=None if minutes is None else minutes * 60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        process.wait()
    if process.returncode != 0:
        raise SystemExit(f"training failed with exit code {process.returncode}")
    return (time.time() - started) / 60


def score_test_split(model_dir_path, overrides):
    from medseg_dl import evaluation
    from medseg_dl.model_dir import ModelDir
    from medseg_dl.params import Params

    model_dir = ModelDir(model_dir_path)
    params = Params.load(model_dir.params_path, overrides)
    prefix = evaluation.resolve_checkpoint(model_dir, "latest")
    evaluator = evaluation.Evaluator(params, model_dir, evaluation.split_cases(params, model_dir, 1.0, "test"),
                                     tag="test")
    try:
        summary = evaluator.evaluate(prefix)
    finally:
        evaluator.close()
    return params, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="training wall-time budget")
    parser.add_argument("--steps", type=int, help="train this many steps instead of a time budget")
    parser.add_argument("--architecture", default="unet", choices=["unet", "medpatchnet"])
    parser.add_argument("--no-position", action="store_true", help="medpatchnet with position input zeroed")
    parser.add_argument("--model-dir", default=os.path.join(REPO, "runs", "accuracy"))
    parser.add_argument("--set", action="append", default=[], help="extra params overrides")
    args = parser.parse_args()
    name = args.architecture + ("-noposition" if args.no_position else "")
    model_dir = os.path.join(args.model_dir, name)
    overrides = [f"experiment.model_dir={model_dir}", f"model.architecture={args.architecture}",
                 "data.split.val=0.0", "data.split.test=0.2", "training.checkpoint_every=250",
                 f"model.use_position={not args.no_position}".lower(),
                 f"training.steps={args.steps or 10 ** 6}", *args.set]
    minutes = train(os.path.join(REPO, "params", "hippocampus.yaml"), overrides,
                    None if args.steps else args.minutes)
    params, summary = score_test_split(model_dir, [])
    result = {"benchmark": "hippocampus_accuracy", "network": name, "minutes": round(minutes, 1),
              "steps": summary["step"], "test_cases": summary["subjects"], "mean_dice": summary["mean_dice"]}
    for class_name, stats in summary["classes"].items():
        for metric in ("dice", "assd_mm", "hd95_mm"):
            result[f"{metric}_{class_name}"] = stats[metric]["mean"]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
