"""W6 and W7 of BENCHMARKS.md: the training side at the scale of real CT, memory against the number of cases,
and one case no one can hold twice.

    python benchmarks/scale.py [--cases 16 32 64] [--shape 256 256 128] [--quick] [--repo DIR]
    python benchmarks/scale.py --workload W7 [--shape 512 512 1000]

Synthetic CT-like cases (`synthetic_ct`: int16 HU, a body ellipse, K-1 ellipsoid organs, spacing
0.8 x 0.8 x 2.5 mm, .nii.gz) are written once under --work (seeded; reused when there). For each N the
first N cases go through three stages, each a child process whose whole process tree is sampled for its
peak RSS (`peak_rss_mb`): `medseg convert` (CT normalisation, 2 workers; its disk against the sources),
one epoch of the training input (`train_inputs`: N_train volumes, 96^3 patches thrown away, no network)
and `medseg train` for 20 steps of a small U-Net. A line per (N, stage), kept in
benchmarks/results/scale.jsonl (not with --quick); the figure to read is the slope over N (MB per added
case). --repo runs the stages with another checkout's medseg_dl (e.g. a worktree of an older commit), on
the same cases, for a before/after in one run.

nnU-Net v2 (its own venv, benchmarks/venvs.sh) on the same N cases as a raw dataset of links: stage `convert` is
`nnUNetv2_plan_and_preprocess -c 3d_fullres` with 2 processes (its disk: the 3d_fullres folder the trainer reads,
`disk_mb`, and the whole preprocessed dataset with its copy of the labels, `disk_all_mb`); stage `input_epoch`
draws as many patches as ours (N_train x 8) from the loaders of its nnUNetTrainer (fold 0: 80% training, its
default augmentation, patch 96^3, batch 2, 2 augmentation processes as on 2 cores; its validation loader starts
too, as in training). --peer nnunetv2 runs it, --peer none skips it.

W6-eval (issue 24's measure): the evaluator's peak RSS against the number of validation cases, N_val = 8, 16,
32 of W6's cases beside 8 training cases: `medseg convert`, 2 training steps (a checkpoint), then `medseg
evaluate --once` of it (no mirroring); a line per N_val with the slope over N_val.

W7: one case of 512 x 512 x 1000 (262 M voxels): `medseg convert`, `medseg train` for 10 steps of 2 patches
of 96^3 (20 training patches drawn from it) and `medseg predict` of the case with the trained network; each
stage passes or fails (its exit code), with its peak RSS and seconds; a failed stage ends the run.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

import nibabel as nib
import numpy as np
import yaml
from interpreters import python_for
from machine_info import record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACING_MM = (0.8, 0.8, 2.5)
INPUT_EPOCH = """
import sys, time, yaml
from medseg_dl.config.params import Params
from medseg_dl.experiment.model_dir import ModelDir, split_case_paths
from medseg_dl.pipeline.inputs import train_inputs
params = Params.load(sys.argv[1])
files = split_case_paths(params, ModelDir(params.experiment.model_dir), "train")
patches = len(files) * params.sampling.samples_per_volume
started, seen = time.time(), 0
for batch in train_inputs(params, files, seed=0):
    seen += batch["image"].shape[0]
    if seen >= patches:
        break
print("patches_per_s", seen / (time.time() - started))
"""
NNUNET_EPOCH = """
import sys, time, torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
folder, patch, patches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
plans = load_json(join(folder, "nnUNetPlans.json"))
plans["configurations"]["3d_fullres"].update({"patch_size": [patch] * 3, "batch_size": 2})
plans["continue_training"] = False  # as run_training.py sets it
trainer = nnUNetTrainer(plans, "3d_fullres", 0, load_json(join(folder, "dataset.json")), torch.device("cpu"))
trainer._set_batch_size_and_oversample()
started, seen = time.time(), 0
train_batches, _ = trainer.get_dataloaders()
while seen < patches:
    seen += next(train_batches)["data"].shape[0]
print("patches_per_s", seen / (time.time() - started))
"""


def synthetic_ct(shape, classes, rng):
    """(image (X, Y, Z) int16 HU, label (X, Y, Z) uint8) of BENCHMARKS.md's CT-like case: air (-1000) outside a
    body ellipse filling ~70% of each slice, smooth soft tissue (0-80 HU) plus noise (std 20) inside, and
    classes - 1 ellipsoid organs of 2-15% of the body each with their own mean HU."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    body = (x / 0.95) ** 2 + (y / 0.75) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)
    smooth = 40 + 40 * np.sin(3 * x + rng.uniform(0, 6)) * np.cos(2 * y + rng.uniform(0, 6)) * np.cos(z * 2)
    image = np.where(body, smooth + rng.normal(0, 20, shape).astype(np.float32), -1000.0)
    label = np.zeros(shape, np.uint8)
    body_fraction = body.mean()
    for organ in range(1, classes):
        volume = rng.uniform(0.02, 0.15) * body_fraction * 8 / (4 / 3 * np.pi)  # of the [-1, 1]^3 cube
        radii = volume ** (1 / 3) * rng.uniform(0.7, 1.3, 3)
        centre = rng.uniform(-0.5, 0.5, 3) * np.array([0.8, 0.6, 0.7])
        inside = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + \
                 ((z - centre[2]) / radii[2]) ** 2 <= 1.0
        inside &= body
        label[inside] = organ
        image[inside] += rng.uniform(-60, 120)
    return np.clip(image, -1024, 3071).astype(np.int16), label


def write_cases(folder, count, shape, classes, seed=0):
    """images/ and labels/ of `count` seeded cases under `folder` (written once: existing files are kept)."""
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    affine = np.diag([*SPACING_MM, 1.0])
    for i in range(count):
        names = [os.path.join(folder, sub, f"case_{i:03d}.nii.gz") for sub in ("images", "labels")]
        if all(os.path.exists(n) for n in names):
            continue
        image, label = synthetic_ct(shape, classes, np.random.default_rng([seed, i]))
        nib.save(nib.Nifti1Image(label, affine), names[1])
        nib.save(nib.Nifti1Image(image, affine), names[0])


def subset(cases_dir, folder, count):
    """`folder` with links to the first `count` cases of `cases_dir` (the data folder of one N)."""
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for i in range(count):
            link = os.path.join(folder, sub, f"case_{i:03d}.nii.gz")
            if not os.path.lexists(link):
                os.symlink(os.path.join(cases_dir, sub, f"case_{i:03d}.nii.gz"), link)


def tree_rss_mb(pid):
    """The RSS in MB of process `pid` and all its descendants (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except OSError:
                continue
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            total += int(open(f"/proc/{current}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total / 2**20


def run_measured(command, env):
    """Run `command` in the checkout of env["PYTHONPATH"] (`-m` and `-c` put the working directory first on
    the path: it must be that checkout); returns (stdout, seconds, peak RSS in MB of its process tree, sampled
    every 0.1 s)."""
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=env["PYTHONPATH"])
    peak = [0.0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(process.pid))
            time.sleep(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    sampler.join()
    if process.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"{' '.join(command[:4])} failed with exit code {process.returncode}")
    return out, time.time() - started, round(peak[0])


def folder_mb(folder):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(folder) for n in names
               if not os.path.islink(os.path.join(d, n))) / 2**20


def source_mb(folder):
    return sum(os.path.getsize(os.path.realpath(os.path.join(d, n))) for d, _, names in os.walk(folder)
               for n in names) / 2**20


def experiment(data_dir, model_dir, classes, patch):
    """The params of the W6 experiment (written beside `model_dir`)."""
    values = {"seed": 1, "experiment": {"name": "w6", "model_dir": model_dir},
              "data": {"source_dir": data_dir, "layout": "images_labels", "channels": ["ct"],
                       "num_classes": classes, "workers": 2, "split": {"val": 0.2, "test": 0.0}},
              "preprocessing": {"normalization": "ct"},
              "sampling": {"patch_size": patch, "batch_size": 2, "samples_per_volume": 8},
              "model": {"architecture": "unet", "base_filters": 8, "depth": 4},
              "training": {"steps": 20, "checkpoint_every": 20, "log_every": 10, "image_summary_every": 1000},
              "evaluation": {"device": "cpu"}}
    path = model_dir + ".yaml"
    with open(path, "w") as f:
        yaml.safe_dump(values, f)
    return path


def measure(count, args, cases_dir, env):
    """The three stage lines for the first `count` cases."""
    data_dir = os.path.join(args.work, f"n{count}", "data")
    subset(cases_dir, data_dir, count)
    model_dir = os.path.join(args.work, f"n{count}", f"run-{args.label}")
    subprocess.run(["rm", "-rf", model_dir], check=True)
    params = experiment(data_dir, model_dir, args.classes, [args.patch] * 3)
    medseg = [sys.executable, "-m", "medseg_dl.cli"]
    common = {"workload": "W6", "library": "medseg_dl", "label": args.label, "cases": count,
              "shape": args.shape, "classes": args.classes}
    _, seconds, peak = run_measured([*medseg, "convert", "--params", params], env)
    lines = [{**common, "stage": "convert", "peak_rss_mb": peak, "seconds": round(seconds, 1),
              "disk_mb": round(folder_mb(os.path.join(model_dir, "converted")), 1),
              "source_mb": round(source_mb(data_dir), 1)}]
    own = os.path.join(model_dir, "params.yaml")
    out, seconds, peak = run_measured([sys.executable, "-c", INPUT_EPOCH, own], env)
    rate = float(out.rsplit("patches_per_s", 1)[1].split()[0])
    lines.append({**common, "stage": "input_epoch", "peak_rss_mb": peak, "seconds": round(seconds, 1),
                  "patches_per_s": round(rate, 2), "patch": [args.patch] * 3})
    _, seconds, peak = run_measured([*medseg, "train", "--params", own], env)
    lines.append({**common, "stage": "train_20_steps", "peak_rss_mb": peak, "seconds": round(seconds, 1)})
    return lines


def nnunet_raw(cases_dir, raw_root, dataset_id, count, classes):
    """nnU-Net's raw dataset `Dataset<id>_W6` under `raw_root`: links to the first `count` cases; returns its name."""
    name = f"Dataset{dataset_id}_W6"
    folder = os.path.join(raw_root, name)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i in range(count):
        for sub, source, suffix in (("imagesTr", "images", "_0000"), ("labelsTr", "labels", "")):
            link = os.path.join(folder, sub, f"case_{i:03d}{suffix}.nii.gz")
            if not os.path.lexists(link):
                os.symlink(os.path.join(cases_dir, source, f"case_{i:03d}.nii.gz"), link)
    labels = {"background": 0, **{f"organ_{k}": k for k in range(1, classes)}}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": count, "file_ending": ".nii.gz"}, f)
    return name


def measure_nnunet(count, args, cases_dir):
    """nnU-Net v2's two lines for the first `count` cases (see the module's docstring)."""
    python, isolated = python_for("nnunetv2")
    if not isolated:
        raise SystemExit("nnU-Net's venv is missing: run benchmarks/venvs.sh, or pass --peer none")
    root = os.path.join(args.work, f"n{count}", "nnunet")
    subprocess.run(["rm", "-rf", root], check=True)
    paths = {key: os.path.join(root, key) for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    env = {**os.environ, **paths, "nnUNet_n_proc_DA": "2", "PYTHONPATH": REPO}
    name = nnunet_raw(cases_dir, paths["nnUNet_raw"], 900 + count, count, args.classes)
    common = {"workload": "W6", "library": "nnunetv2", "isolated": True, "label": "nnU-Net v2", "cases": count,
              "shape": args.shape, "classes": args.classes}
    tool = os.path.join(os.path.dirname(python), "nnUNetv2_plan_and_preprocess")
    _, seconds, peak = run_measured([tool, "-d", str(900 + count), "-c", "3d_fullres", "-np", "2", "-npfp", "2"], env)
    preprocessed = os.path.join(paths["nnUNet_preprocessed"], name)
    lines = [{**common, "stage": "convert", "peak_rss_mb": peak, "seconds": round(seconds, 1),
              "disk_mb": round(folder_mb(os.path.join(preprocessed, "nnUNetPlans_3d_fullres")), 1),
              "disk_all_mb": round(folder_mb(preprocessed), 1),
              "source_mb": round(source_mb(os.path.join(paths["nnUNet_raw"], name)), 1)}]
    patches = (count - round(0.2 * count)) * 8
    out, seconds, peak = run_measured([python, "-c", NNUNET_EPOCH, preprocessed, str(args.patch), str(patches)], env)
    rate = float(out.rsplit("patches_per_s", 1)[1].split()[0])
    lines.append({**common, "stage": "input_epoch", "peak_rss_mb": peak, "seconds": round(seconds, 1),
                  "patches_per_s": round(rate, 2), "patch": [args.patch] * 3})
    return lines


def measure_evaluator(val_count, args, cases_dir, env):
    """The W6-eval line of `val_count` validation cases (and 8 training cases) of `cases_dir`."""
    count = val_count + 8
    data_dir = os.path.join(args.work, f"n{count}", "data")
    subset(cases_dir, data_dir, count)
    model_dir = os.path.join(args.work, f"n{count}", f"eval-{args.label}")
    subprocess.run(["rm", "-rf", model_dir], check=True)
    params = experiment(data_dir, model_dir, args.classes, [args.patch] * 3)
    with open(params) as f:
        values = yaml.safe_load(f)
    values["data"]["split"] = {"val": val_count / count, "test": 0.0}
    values["training"].update({"steps": 2, "checkpoint_every": 2})
    values["evaluation"].update({"tta_mirroring": False, "save_overlays": False})
    with open(params, "w") as f:
        yaml.safe_dump(values, f)
    medseg = [sys.executable, "-m", "medseg_dl.cli"]
    own = os.path.join(model_dir, "params.yaml")
    for stage in (["convert", "--params", params], ["train", "--params", own]):
        run_measured([*medseg, *stage], env)
    _, seconds, peak = run_measured([*medseg, "evaluate", "--params", own, "--once"], env)
    with open(os.path.join(model_dir, "filelists", "val.json")) as f:
        validation = len(json.load(f))
    return {"workload": "W6-eval", "library": "medseg_dl", "label": args.label, "cases": validation,
            "shape": args.shape, "classes": args.classes, "stage": "evaluate_once", "peak_rss_mb": peak,
            "seconds": round(seconds, 1)}


def measure_w7(args, env):
    """The W7 lines: convert, 20 training patches, predict one case of `args.shape`, until a stage fails."""
    cases_dir = os.path.join(args.work, "w7_" + "x".join(map(str, args.shape)))
    write_cases(cases_dir, 1, args.shape, args.classes)
    model_dir = os.path.join(args.work, "w7-run")
    subprocess.run(["rm", "-rf", model_dir, model_dir + "-predicted"], check=True)
    params = experiment(cases_dir, model_dir, args.classes, [args.patch] * 3)
    with open(params) as f:
        values = yaml.safe_load(f)
    values["data"]["split"] = {"val": 0.0, "test": 0.0}
    values["training"].update({"steps": 10, "checkpoint_every": 10})
    values["model"].update({"base_filters": 4, "depth": 3})
    with open(params, "w") as f:
        yaml.safe_dump(values, f)
    medseg = [sys.executable, "-m", "medseg_dl.cli"]
    stages = {"convert": ["convert", "--params", params],
              "train_20_patches": ["train", "--params", os.path.join(model_dir, "params.yaml")],
              "predict": ["predict", "--model-dir", model_dir, "--checkpoint", "latest", "--input",
                          os.path.join(cases_dir, "images", "case_000.nii.gz"), "--output", model_dir + "-predicted"]}
    lines = []
    for stage, arguments in stages.items():
        try:
            _, seconds, peak = run_measured([*medseg, *arguments], env)
            passed = True
        except SystemExit as failure:
            print(failure, file=sys.stderr)
            seconds, peak, passed = float("nan"), float("nan"), False
        lines.append({"workload": "W7", "library": "medseg_dl", "label": args.label, "cases": 1, "shape": args.shape,
                      "classes": args.classes, "stage": stage, "passed": passed, "peak_rss_mb": peak,
                      "seconds": round(seconds, 1)})
        if not passed:
            break
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["W6", "W6-eval", "W7"], default="W6")
    parser.add_argument("--cases", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--shape", type=int, nargs=3)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--work", default="/tmp/medseg_scale")
    parser.add_argument("--repo", default=REPO, help="the checkout whose medseg_dl runs the stages")
    parser.add_argument("--label", default="main", help="names this checkout in the lines")
    parser.add_argument("--quick", action="store_true", help="5 and 6 cases of 48 x 48 x 24: a smoke test")
    parser.add_argument("--peer", choices=["nnunetv2", "none"], default="nnunetv2", help="W6's peer")
    args = parser.parse_args()
    args.shape = args.shape or ([512, 512, 1000] if args.workload == "W7" else [256, 256, 128])
    if args.quick:
        args.cases, args.shape, args.patch, args.work = [5, 6], [48, 48, 24], 16, os.path.join(args.work, "quick")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(args.repo), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if args.workload == "W7":
        for line in measure_w7(args, env):
            record("scale", line, keep=not args.quick)
        return
    cases_dir = os.path.join(args.work, "cases_" + "x".join(map(str, args.shape)) + f"_k{args.classes}")
    if args.workload == "W6-eval":
        write_cases(cases_dir, max(args.cases) + 8, args.shape, args.classes)
        lines = [measure_evaluator(count, args, cases_dir, env) for count in args.cases]
    else:
        write_cases(cases_dir, max(args.cases), args.shape, args.classes)
        lines = [line for count in args.cases for line in measure(count, args, cases_dir, env)]
    if args.peer == "nnunetv2" and args.workload == "W6":
        lines += [line for count in args.cases for line in measure_nnunet(count, args, cases_dir)]
    for library, stage in {(line["library"], line["stage"]) for line in lines}:
        points = [(line["cases"], line["peak_rss_mb"]) for line in lines
                  if line["stage"] == stage and line["library"] == library]
        slope = np.polyfit(*zip(*points), 1)[0] if len(points) > 1 else float("nan")
        for line in lines:
            if line["stage"] == stage and line["library"] == library:
                line["slope_mb_per_case"] = round(float(slope), 2)
    for line in lines:
        record("scale", line, keep=not args.quick)
    print(json.dumps({"work": args.work}), flush=True)


if __name__ == "__main__":
    main()
