"""BraTS end to end: `params/brats.yaml` (or, with --plan, the experiment `medseg plan` writes for the
BraTS folder) converted, trained, its validation subjects evaluated.

The multi-channel, large-volume path (2 channels, 240x240x155, 5 labels) through the same `medseg`
commands a user runs, each in its own process; prints one JSON line with the wall time and the peak
resident memory of each stage (its whole process tree, conversion workers included: `harness`), and the
validation Dice per class. With --plan the line also carries what the planner chose (patch, batch,
depth, normalisation, spacing) and is kept in benchmarks/results/brats_end_to_end.jsonl.

    python benchmarks/brats_end_to_end.py --steps 300
    python benchmarks/brats_end_to_end.py --steps 200 --set model.base_filters=8   # a CPU budget
    python benchmarks/brats_end_to_end.py --plan --steps 300                       # the planned experiment
"""
import argparse
import json
import os

from datasets import BRATS, BRATS_PATTERNS
from harness import MEDSEG, REPO, run_measured
from machine_info import record


def run_stage(arguments):
    """`medseg <arguments>` in a child process -> (stdout, minutes, peak RSS in MB of its process tree)."""
    measured = run_measured([*MEDSEG, *arguments], cwd=REPO)
    return measured.stdout, measured.wall_s / 60, round(measured.peak_rss_mb)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--model-dir", default=os.path.join(REPO, "runs", "brats-end-to-end"))
    parser.add_argument("--set", action="append", default=[], help="extra params overrides")
    parser.add_argument("--plan", action="store_true", help="train the experiment `medseg plan` writes (CPU budget)")
    args = parser.parse_args()
    overrides = [f"experiment.model_dir={args.model_dir}", f"training.steps={args.steps}",
                 f"training.checkpoint_every={max(1, args.steps // 3)}", *args.set]
    settings = [argument for override in overrides for argument in ("--set", override)]
    source = planned_experiment(args.model_dir + "-plan") if args.plan else os.path.join(REPO, "params", "brats.yaml")
    _, convert_min, convert_mb = run_stage(["convert", "--params", source, "--overwrite", *settings])
    params_path = os.path.join(args.model_dir, "params.yaml")
    _, train_min, train_mb = run_stage(["train", "--params", params_path])
    output, evaluate_min, evaluate_mb = run_stage(["evaluate", "--params", params_path, "--once",
                                                   "--checkpoint", "latest"])
    step = json.loads(output.strip().splitlines()[-1])["step"]
    from medseg_dl.experiment.model_dir import ModelDir

    with open(ModelDir(os.path.abspath(args.model_dir)).summary_path(step)) as f:
        summary = json.load(f)
    line = {"benchmark": "brats_end_to_end", "steps": step, "settings": overrides[1:],
            "minutes": {"convert": round(convert_min, 1), "train": round(train_min, 1),
                        "evaluate": round(evaluate_min, 1)},
            "peak_rss_mb": {"convert": convert_mb, "train": train_mb, "evaluate": evaluate_mb},
            "val_subjects": summary["subjects"], "val_mean_dice": summary["mean_dice"],
            "val_dice": {name: stats["dice"]["mean"] for name, stats in summary["classes"].items()}}
    if args.plan:
        record("brats_end_to_end", {**line, "planned": planned_choices(params_path)}, keep=True)
    else:
        record("brats_end_to_end", line, keep=False)


def planned_experiment(plan_dir):
    """`medseg plan` of the BraTS folder (CPU budget; the layout's patterns given) into <plan_dir>/planned.yaml."""
    from medseg_dl.planning.command import run_plan

    return run_plan(BRATS, "subject_folders", os.path.join(plan_dir, "planned.yaml"), overrides=BRATS_PATTERNS)


def planned_choices(params_path):
    """{key: value} of what the planner chose, read back from the run's params.yaml."""
    from medseg_dl.config.params import Params

    params = Params.load(params_path)
    return {"patch_size": params.sampling.patch_size, "batch_size": params.sampling.batch_size,
            "depth": params.model.depth, "strides": params.model.strides, "base_filters": params.model.base_filters,
            "normalization": params.preprocessing.normalization,
            "target_spacing_mm": params.preprocessing.target_spacing_mm,
            "rotate_max_deg": params.augmentation.rotate.max_deg,
            "optimizer": params.training.optimizer, "learning_rate": params.training.learning_rate,
            "precision": params.training.precision}


if __name__ == "__main__":
    main()
