"""BraTS end to end: `params/brats.yaml` (or, with --plan, the experiment `medseg plan` writes for the
BraTS folder) converted, trained, its validation subjects evaluated.

The multi-channel, large-volume path (2 channels, 240x240x155, 5 labels) through the same `medseg`
commands a user runs, each in its own process; prints one JSON line with the wall time and the peak
resident memory (RSS of the largest process, conversion workers included) of each stage, and the
validation Dice per class. With --plan the line also carries what the planner chose (patch, batch,
depth, normalisation, spacing) and is kept in benchmarks/results/brats_end_to_end.jsonl.

    python benchmarks/brats_end_to_end.py --steps 300
    python benchmarks/brats_end_to_end.py --steps 200 --set model.base_filters=8   # a CPU budget
    python benchmarks/brats_end_to_end.py --plan --steps 300                       # the planned experiment
"""
import argparse
import json
import os
import subprocess
import sys
import time

from machine_info import describe_machine, record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
BRATS = os.path.join(os.path.dirname(REPO), "shared", "data", "brats2015_deepmedic")
BRATS_PATTERNS = ["data.channels=[Flair*.nii.gz, T1c*.nii.gz]", "data.label_pattern=OTMultiClass*.nii.gz",
                  "data.mask_pattern=brainmask*.nii.gz",
                  "data.class_names=[background, necrosis, edema, non_enhancing, enhancing]"]
# Runs a command and reports the largest peak RSS among its (waited-for) descendants, in KiB.
PEAK_RSS_WRAPPER = ("import resource, subprocess, sys\n"
                    "code = subprocess.call(sys.argv[1:])\n"
                    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
                    "sys.exit(code)")


def run_stage(arguments):
    """`medseg <arguments>` in a child process -> (stdout, minutes, peak RSS in MB)."""
    command = [sys.executable, "-c", PEAK_RSS_WRAPPER, sys.executable, "-m", "medseg_dl.cli", *arguments]
    started = time.time()
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    minutes = (time.time() - started) / 60
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"medseg {arguments[0]} failed with exit code {done.returncode}")
    peak_kib = int(done.stderr.rsplit("peak_rss_kib", 1)[1].split()[0])
    return done.stdout, minutes, round(peak_kib / 1024)


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
        print(json.dumps({**line, "machine": describe_machine()}), flush=True)


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
