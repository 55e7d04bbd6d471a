"""BraTS end to end: `params/brats.yaml` converted, trained, its validation subjects evaluated.

The multi-channel, large-volume path (2 channels, 240x240x155, 5 labels, 96^3 patches) through
the same `medseg` commands a user runs, each in its own process; prints one JSON line with the
wall time and the peak resident memory (RSS of the largest process, conversion workers included)
of each stage, and the validation Dice per class.

    python benchmarks/brats_end_to_end.py --steps 300
    python benchmarks/brats_end_to_end.py --steps 200 --set model.base_filters=8   # a CPU budget
"""
import argparse
import json
import os
import subprocess
import sys
import time

from machine_info import describe_machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
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
    args = parser.parse_args()
    overrides = [f"experiment.model_dir={args.model_dir}", f"training.steps={args.steps}",
                 f"training.checkpoint_every={max(1, args.steps // 3)}", *args.set]
    settings = [argument for override in overrides for argument in ("--set", override)]
    _, convert_min, convert_mb = run_stage(["convert", "--params", os.path.join(REPO, "params", "brats.yaml"),
                                            "--overwrite", *settings])
    params_path = os.path.join(args.model_dir, "params.yaml")
    _, train_min, train_mb = run_stage(["train", "--params", params_path])
    output, evaluate_min, evaluate_mb = run_stage(["evaluate", "--params", params_path, "--once",
                                                   "--checkpoint", "latest"])
    step = json.loads(output.strip().splitlines()[-1])["step"]
    from medseg_dl.experiment.model_dir import ModelDir

    with open(ModelDir(os.path.abspath(args.model_dir)).summary_path(step)) as f:
        summary = json.load(f)
    print(json.dumps({"benchmark": "brats_end_to_end", "steps": step, "settings": overrides[1:],
                      "minutes": {"convert": round(convert_min, 1), "train": round(train_min, 1),
                                  "evaluate": round(evaluate_min, 1)},
                      "peak_rss_mb": {"convert": convert_mb, "train": train_mb, "evaluate": evaluate_mb},
                      "val_subjects": summary["subjects"], "val_mean_dice": summary["mean_dice"],
                      "val_dice": {name: stats["dice"]["mean"] for name, stats in summary["classes"].items()},
                      "machine": describe_machine()}), flush=True)


if __name__ == "__main__":
    main()
