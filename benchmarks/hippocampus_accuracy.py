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
import os
import shutil
import statistics

from datasets import HIPPO
from experiments import planned_experiment, score_test_split, step_times_s, train
from harness import REPO
from machine_info import record

CALIBRATION_STEPS = 40
STARTUP_MINUTES = 2.0  # TensorFlow import, conversion of missing cases, tracing: not in the budget


def calibrated_steps(params_path, overrides, model_dir, minutes):
    """Steps that fill `minutes`, from the median step time of a short run (its first 10 steps,
    which include tracing, are left out)."""
    calibration_dir = model_dir + "-calibration"
    train(params_path, [*overrides, f"experiment.model_dir={calibration_dir}",
                        f"training.steps={CALIBRATION_STEPS}", "training.log_every=10"], None)
    median_s = statistics.median(step_times_s(calibration_dir))
    shutil.rmtree(calibration_dir)
    return max(1, int(minutes * 60 / median_s))


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
              "tta_mirroring": params.evaluation.tta_mirroring, "settings": args.set}
    for class_name, stats in summary["classes"].items():
        for metric in ("dice", "assd_mm", "hd95_mm"):
            result[f"{metric}_{class_name}"] = stats[metric]["mean"]
    record("hippocampus_accuracy", result, keep=args.data == HIPPO)  # kept for runs on the real folder


if __name__ == "__main__":
    main()
