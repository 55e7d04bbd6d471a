"""Accuracy on held-out hippocampus cases after a fixed training budget, with the experiment that
`medseg plan` writes for the hippocampus folder (no GPU: its CPU-budget recipe).

Plans the folder (`--data`, default ../shared/data/msd_hippocampus) into `<model-dir>/planned.yaml`,
holds 20% of the cases out as the test split (never seen in training or model selection), and
trains for `--steps`, or for `--minutes` of wall time: a 40-step calibration run measures this
machine's step time and the step count (and so the learning-rate schedule, which decays to zero at
the last step) is set to fill the budget; training is stopped with SIGTERM (which saves a
checkpoint) if it overruns by 20% plus 2 minutes for start-up, conversion and tracing. Then each of
the `--curve-points` kept checkpoints is scored on the test cases (the learning curve; the last is
the result) and one JSON line is printed and appended to benchmarks/results/hippocampus_accuracy.jsonl:
per-class Dice, ASSD, HD95 (means), the curve, minutes, steps, step time (the median of the logged
intervals, and every interval's), network, settings.

    python benchmarks/hippocampus_accuracy.py --minutes 60 --architecture unet
    python benchmarks/hippocampus_accuracy.py --minutes 60 --architecture medpatchnet [--no-position]
"""
import argparse
import csv
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from machine_info import describe_machine, record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


CALIBRATION_STEPS = 40
STARTUP_MINUTES = 2.0  # TensorFlow import, conversion of missing cases, tracing: not in the budget
HIPPO = os.path.join(os.path.dirname(REPO), "shared", "data", "msd_hippocampus")
CLASS_NAMES = "data.class_names=[background, anterior, posterior]"


def train(params_path, overrides, minutes):
    """Run `medseg train` in a subprocess; SIGTERM after `minutes` (None: run to training.steps).

    Returns the wall time in minutes."""
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


def calibrated_steps(params_path, overrides, model_dir, minutes):
    """Steps that fill `minutes`, from the median step time of a short run (its first 10 steps,
    which include tracing, are left out)."""
    calibration_dir = model_dir + "-calibration"
    train(params_path, [*overrides, f"experiment.model_dir={calibration_dir}",
                        f"training.steps={CALIBRATION_STEPS}", "training.log_every=10"], None)
    median_s = statistics.median(step_times_s(calibration_dir))
    shutil.rmtree(calibration_dir)
    return max(1, int(minutes * 60 / median_s))


def planned_experiment(data_dir, work_dir):
    """`medseg plan` of the dataset folder (CPU budget) into <work_dir>/planned.yaml."""
    from medseg_dl.planning.command import run_plan

    return run_plan(data_dir, "images_labels", os.path.join(work_dir, "planned.yaml"), overrides=[CLASS_NAMES])


def score_test_split(model_dir_path, overrides):
    """(params, summary of the last checkpoint, [(step, mean Dice)] of every kept checkpoint) on the test cases."""
    from medseg_dl.config.params import Params
    from medseg_dl.evaluation.cases import split_cases
    from medseg_dl.evaluation.watcher import score_checkpoint
    from medseg_dl.experiment.checkpoints import checkpoint_step, completed_checkpoints
    from medseg_dl.experiment.model_dir import ModelDir

    model_dir = ModelDir(model_dir_path)
    params = Params.load(model_dir.params_path, overrides)
    cases = split_cases(params, model_dir, "test", 1.0)
    curve = []
    for prefix in completed_checkpoints(model_dir.checkpoints):
        summary = score_checkpoint(params, model_dir, cases, "test", prefix)
        curve.append([checkpoint_step(prefix), round(summary["mean_dice"], 4)])
    return params, summary, curve


def step_times_s(model_dir_path):
    """The mean step time of each logged interval of a run, without the first (it includes tracing) unless it
    is the only one."""
    from medseg_dl.experiment.model_dir import ModelDir

    with open(ModelDir(model_dir_path).scalars_csv) as f:
        rows = list(csv.DictReader(f))
    return [float(row["step_time_s"]) for row in (rows[1:] or rows)]


def report(result, results_name, data_dir):
    """Print the result's JSON line; keep it in benchmarks/results/<results_name>.jsonl for runs on the real
    hippocampus folder."""
    record(results_name, result, keep=data_dir == HIPPO)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="training wall-time budget")
    parser.add_argument("--steps", type=int, help="train this many steps instead of a time budget")
    parser.add_argument("--architecture", default="unet", choices=["unet", "medpatchnet"])
    parser.add_argument("--no-position", action="store_true", help="medpatchnet with position input zeroed")
    parser.add_argument("--data", default=HIPPO, help="the hippocampus folder to plan and train on")
    parser.add_argument("--model-dir", default=os.path.join(REPO, "runs", "accuracy"))
    parser.add_argument("--curve-points", type=int, default=5, help="checkpoints kept and scored")
    parser.add_argument("--set", action="append", default=[], help="extra params overrides")
    args = parser.parse_args()
    name = args.architecture + ("-noposition" if args.no_position else "")
    model_dir = os.path.join(os.path.abspath(args.model_dir), name)
    params_path = planned_experiment(args.data, args.model_dir)
    overrides = [f"model.architecture={args.architecture}", "data.split.val=0.0", "data.split.test=0.2",
                 f"data.converted_dir={os.path.join(args.model_dir, 'converted')}",
                 f"model.use_position={not args.no_position}".lower(), *args.set]
    steps = args.steps or calibrated_steps(params_path, overrides, model_dir, args.minutes)
    shutil.rmtree(model_dir, ignore_errors=True)  # an earlier run of the same settings would be resumed, not timed
    every = max(1, steps // args.curve_points)
    minutes = train(params_path, [*overrides, f"experiment.model_dir={model_dir}", f"training.steps={steps}",
                                  f"training.checkpoint_every={every}", f"training.keep_last={args.curve_points}"],
                    None if args.steps else 1.2 * args.minutes + STARTUP_MINUTES)
    params, summary, curve = score_test_split(model_dir, [])
    intervals_s = step_times_s(model_dir)
    result = {"benchmark": "hippocampus_accuracy", "network": name, "minutes": round(minutes, 1),
              "steps": summary["step"], "step_time_s": round(statistics.median(intervals_s), 3),
              "step_time_s_runs": [round(s, 3) for s in intervals_s],
              "test_cases": summary["subjects"], "mean_dice": summary["mean_dice"], "curve_test_dice": curve,
              "base_filters": params.model.base_filters, "deep_supervision": params.model.deep_supervision,
              "patch_size": params.sampling.patch_size, "batch_size": params.sampling.batch_size,
              "optimizer": params.training.optimizer, "learning_rate": params.training.learning_rate,
              "tta_mirroring": params.evaluation.tta_mirroring, "settings": args.set,
              "machine": describe_machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    for class_name, stats in summary["classes"].items():
        for metric in ("dice", "assd_mm", "hd95_mm"):
            result[f"{metric}_{class_name}"] = stats[metric]["mean"]
    report(result, "hippocampus_accuracy", args.data)


if __name__ == "__main__":
    main()
