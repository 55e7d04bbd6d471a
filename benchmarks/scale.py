"""W6 and W7 of BENCHMARKS.md: the training side at the scale of real CT, memory against the number of cases,
and one case no one can hold twice.

    python benchmarks/scale.py [--cases 16 32 64] [--shape 256 256 128] [--quick] [--repo DIR]
    python benchmarks/scale.py --workload W7 [--shape 512 512 1000]
    python benchmarks/scale.py --workload W8 [--stages zero_cost planned mapped_back] [--repetitions 1] [--quick]

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

W8: sliding window on one case of 512 x 512 x 600 (14 classes, written under --work), window 128^3, overlap 0.5,
batch 2, Gaussian blending; each measured process is a child (`run_measured`: its seconds are timed inside it, its
peak RSS is the process tree's). `zero_cost_labels`: the label map on the model grid (the argmax of the blended
scores) of medseg_dl's `Predictor.labels`, MONAI's `sliding_window_inference` and nnU-Net v2's
`nnUNetPredictor.predict_sliding_window_return_logits` (one window per network call, its own batch; no mirroring),
each with its interpreter (`harness.python_for`), on the same normalised image (a .npy under --work), after a
warm-up on one window. The network costs nothing: the one channel broadcast to the 14 class scores 2 c_k x - c_k^2
(centres c_k evenly from the image's minimum to its maximum, so the argmax is the centre nearest x; a plain
repetition would tie every class, every label would be 0 and the libraries' labels could not be compared). The
scores are affine in x, so their blend is that of x itself whatever the weights: the labels agree up to rounding
(nnU-Net accumulates in float16) where every voxel is covered by windows in the right place. The medseg_dl line
has speedup_vs_<peer> (peer s / ours), peak_rss_ratio_vs_<peer> and labels_agree_with_<peer> (the fraction of
equal voxels). `planned_labels` (stage planned, not by default; always with --quick): the network `medseg plan`
chooses for the case (random weights), with the 128^3 window where it is a multiple of the network's total
stride; with --quick it also estimates the full-size run (`estimated_full_seconds`). `predict_mapped_back` and
`predict_mapped_back_probabilities_<dtype>`: `medseg predict` (the CLI) of the case with a model folder that
resamples to 1.5 mm (a small U-Net trained for 2 steps on 3 small synthetic cases), its labels mapped back to the
case's grid; the target is a peak RSS of 4 GB.
"""
import argparse
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import yaml
from datasets import write_cases
from harness import MEDSEG, REPO, ChildFailed, add_ratios, peers_available, python_for, run_measured, spread
from machine_info import record

W8_SHAPE, W8_CLASSES, W8_WINDOW, W8_BATCH, W8_OVERLAP = [512, 512, 600], 14, 128, 2, 0.5
W8_MODEL_SPACING_MM, W8_RSS_TARGET_MB = 1.5, 4096
W8_NETWORK = "zero-cost: the channel broadcast to K class scores 2 c_k x - c_k^2 (argmax: the nearest of K centres)"
INPUT_EPOCH = """
import sys, time, yaml
from medseg_dl.config.params import Params
from medseg_dl.experiment.filelists import split_case_paths
from medseg_dl.experiment.model_dir import ModelDir
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


def subset(cases_dir, folder, count):
    """`folder` with links to the first `count` cases of `cases_dir` (the data folder of one N)."""
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for i in range(count):
            link = os.path.join(folder, sub, f"case_{i:03d}.nii.gz")
            if not os.path.lexists(link):
                os.symlink(os.path.join(cases_dir, sub, f"case_{i:03d}.nii.gz"), link)


def in_checkout(command, env):
    """Run `command` in the checkout of env["PYTHONPATH"] (`-m` and `-c` put the working directory first on the
    path: it must be that checkout); returns (stdout, seconds, peak RSS in MB of its process tree, rounded)."""
    measured = run_measured(command, env, cwd=env["PYTHONPATH"])
    return measured.stdout, measured.wall_s, round(measured.peak_rss_mb)


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
    common = {"workload": "W6", "library": "medseg_dl", "label": args.label, "cases": count,
              "shape": args.shape, "classes": args.classes}
    _, seconds, peak = in_checkout([*MEDSEG, "convert", "--params", params], env)
    lines = [{**common, "stage": "convert", "peak_rss_mb": peak, "seconds": round(seconds, 1),
              "disk_mb": round(folder_mb(os.path.join(model_dir, "converted")), 1),
              "source_mb": round(source_mb(data_dir), 1)}]
    own = os.path.join(model_dir, "params.yaml")
    out, seconds, peak = in_checkout([sys.executable, "-c", INPUT_EPOCH, own], env)
    rate = float(out.rsplit("patches_per_s", 1)[1].split()[0])
    lines.append({**common, "stage": "input_epoch", "peak_rss_mb": peak, "seconds": round(seconds, 1),
                  "patches_per_s": round(rate, 2), "patch": [args.patch] * 3})
    _, seconds, peak = in_checkout([*MEDSEG, "train", "--params", own], env)
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
    _, seconds, peak = in_checkout([tool, "-d", str(900 + count), "-c", "3d_fullres", "-np", "2", "-npfp", "2"], env)
    preprocessed = os.path.join(paths["nnUNet_preprocessed"], name)
    lines = [{**common, "stage": "convert", "peak_rss_mb": peak, "seconds": round(seconds, 1),
              "disk_mb": round(folder_mb(os.path.join(preprocessed, "nnUNetPlans_3d_fullres")), 1),
              "disk_all_mb": round(folder_mb(preprocessed), 1),
              "source_mb": round(source_mb(os.path.join(paths["nnUNet_raw"], name)), 1)}]
    patches = (count - round(0.2 * count)) * 8
    out, seconds, peak = in_checkout([python, "-c", NNUNET_EPOCH, preprocessed, str(args.patch), str(patches)], env)
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
    own = os.path.join(model_dir, "params.yaml")
    for stage in (["convert", "--params", params], ["train", "--params", own]):
        in_checkout([*MEDSEG, *stage], env)
    _, seconds, peak = in_checkout([*MEDSEG, "evaluate", "--params", own, "--once"], env)
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
    stages = {"convert": ["convert", "--params", params],
              "train_20_patches": ["train", "--params", os.path.join(model_dir, "params.yaml")],
              "predict": ["predict", "--model-dir", model_dir, "--checkpoint", "latest", "--input",
                          os.path.join(cases_dir, "images", "case_000.nii.gz"), "--output", model_dir + "-predicted"]}
    lines = []
    for stage, arguments in stages.items():
        try:
            _, seconds, peak = in_checkout([*MEDSEG, *arguments], env)
            passed = True
        except ChildFailed as failure:
            print(failure, file=sys.stderr)
            seconds, peak, passed = float("nan"), float("nan"), False
        lines.append({"workload": "W7", "library": "medseg_dl", "label": args.label, "cases": 1, "shape": args.shape,
                      "classes": args.classes, "stage": stage, "passed": passed, "peak_rss_mb": peak,
                      "seconds": round(seconds, 1)})
        if not passed:
            break
    return lines


# W8 children: argv image.npy labels.npy window classes batch repetitions overlap [extra]; each prints one JSON line
W8_PRELUDE = """
import json, sys, time
import numpy as np
image_path, labels_path = sys.argv[1], sys.argv[2]
window, classes, batch, repetitions = (int(v) for v in sys.argv[3:7])
overlap = float(sys.argv[7])
image = np.load(image_path)  # (X, Y, Z) float32, C order
centres = np.linspace(image.min(), image.max(), classes, dtype=np.float32)
slopes, offsets = 2 * centres, -centres ** 2  # score_k(x) = 2 c_k x - c_k^2: its argmax is the centre nearest x


def measure(predict_labels, **extra):
    # predict_labels: (X, Y, Z) float32 -> (X, Y, Z) integer labels; a warm-up on one window, then the timed runs
    predict_labels(np.ascontiguousarray(image[:window, :window, :window]))
    seconds, labels = [], None
    for _ in range(repetitions):
        labels = None  # the last run's labels are freed before the next run
        started = time.perf_counter()
        labels = predict_labels(image)
        seconds.append(time.perf_counter() - started)
    np.save(labels_path, labels.astype(np.uint8))
    print(json.dumps({"seconds_runs": seconds, **extra}))
"""
W8_MEDSEG = W8_PRELUDE + """
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
from medseg_dl.data.targets import Targets
from medseg_dl.inference.predictor import Predictor
slopes_t, offsets_t = tf.constant(slopes), tf.constant(offsets)


def network(inputs):  # {"image": (N, w, w, w, 1)} -> (N, w, w, w, K) scores: the channel broadcast to K classes
    return inputs["image"] * slopes_t + offsets_t


accumulation = sys.argv[8]
targets = Targets(classes, tuple(f"class_{k}" for k in range(classes)))
predictor = Predictor(network, (window,) * 3, targets, overlap=overlap, blending="gaussian", batch_size=batch,
                      accumulation=accumulation)
measure(lambda volume: predictor.labels(volume[..., None]), accumulation=accumulation)
"""
W8_MONAI = W8_PRELUDE + """
import torch
from monai.inferers import sliding_window_inference
torch.set_grad_enabled(False)
slopes_t, offsets_t = (torch.from_numpy(v).view(1, -1, 1, 1, 1) for v in (slopes, offsets))


def network(x):  # (N, 1, w, w, w) -> (N, K, w, w, w) scores
    return x * slopes_t + offsets_t


def predict_labels(volume):
    scores = sliding_window_inference(torch.from_numpy(volume)[None, None], (window,) * 3, batch, network,
                                      overlap=overlap, mode="gaussian")
    return scores.argmax(dim=1)[0].numpy()


measure(predict_labels)
"""
W8_NNUNET = W8_PRELUDE + """
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager


class ZeroCost(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", torch.from_numpy(slopes).view(1, -1, 1, 1, 1))
        self.register_buffer("offsets", torch.from_numpy(offsets).view(1, -1, 1, 1, 1))

    def forward(self, x):  # (1, 1, w, w, w) -> (1, K, w, w, w) scores
        return x * self.slopes + self.offsets


# what predict_sliding_window_return_logits reads: the configuration's patch size and the label manager's classes
plans = PlansManager({"configurations": {"3d_fullres": {"patch_size": [window] * 3, "architecture": {}}}})
predictor = nnUNetPredictor(tile_step_size=1 - overlap, use_gaussian=True, use_mirroring=False,
                            perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
predictor.manual_initialization(ZeroCost(), plans, plans.get_configuration("3d_fullres"), None,
                                {"labels": {"background": 0, **{f"class_{k}": k for k in range(1, classes)}}},
                                "zero_cost", None)
measure(lambda volume: predictor.predict_sliding_window_return_logits(torch.from_numpy(volume)[None]).argmax(0).numpy())
"""
# argv as the prelude's, then the planned params (YAML), the full W8 window and its window count (0: no estimate)
W8_PLANNED = W8_PRELUDE + """
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
from medseg_dl.config.params import Params
from medseg_dl.data.targets import Targets
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.trained import inference_network
params = Params.load(sys.argv[8])
full_window, full_windows = int(sys.argv[9]), int(sys.argv[10])
network = inference_network(params)  # random weights
planned = list(params.sampling.patch_size)
shape = [window] * 3  # the W8 window where it is a multiple of the network's total stride, else the planned patch
shape = shape if not any(w % s for w, s in zip(shape, network.level_strides[-1])) else planned
predictor = Predictor(network, shape, Targets.from_params(params.data), overlap=overlap, blending="gaussian",
                      batch_size=batch)
window = min(shape)  # the warm-up crop of `measure`
extra = {"window": shape, "planned_patch": planned, "precision": keras.mixed_precision.global_policy().name}
if full_windows:  # seconds of one full-size window (after its tracing) times the full volume's window count
    probe = np.zeros((full_window,) * 3 + (1,), np.float32)
    full = Predictor(network, (full_window,) * 3, Targets.from_params(params.data), overlap=overlap, batch_size=batch)
    full.labels(probe)
    started = time.perf_counter()
    full.labels(probe)
    extra["estimated_full_seconds"] = round((time.perf_counter() - started) * full_windows)
measure(lambda volume: predictor.labels(volume[..., None]), **extra)
"""
W8_PEERS = {"monai": (W8_MONAI, "MONAI"), "nnunetv2": (W8_NNUNET, "nnU-Net v2")}  # library: (child, label)


def w8_window_count(shape, window, overlap):
    """Windows of a sliding window `window` (3,) voxels over `shape` (3,) voxels: per axis ceil((n - w) / step) + 1,
    step = w (1 - overlap) (MONAI's and nnU-Net's count; at least one)."""
    return int(np.prod([max(1, int(np.ceil((n - w) / (w * (1 - overlap)))) + 1) for n, w in zip(shape, window)]))


def w8_normalised(cases_dir):
    """<cases_dir>/normalised.npy, written once: the image (X, Y, Z) float32 C-order of case_000, CT normalisation
    (clipped to the 0.5 / 99.5 percentiles of its foreground, then the foreground's mean and std)."""
    path = os.path.join(cases_dir, "normalised.npy")
    if not os.path.exists(path):
        image = np.asarray(nib.load(os.path.join(cases_dir, "images", "case_000.nii.gz")).dataobj, np.float32)
        foreground = image[np.asarray(nib.load(os.path.join(cases_dir, "labels", "case_000.nii.gz")).dataobj) > 0]
        low, high = np.percentile(foreground, [0.5, 99.5])
        foreground = np.clip(foreground, low, high)
        normalised = (np.clip(image, low, high) - foreground.mean()) / foreground.std()
        np.save(path, np.ascontiguousarray(normalised, np.float32))
    return path


def w8_child(code, python, npy, labels_path, args, env, extra=()):
    """(the child's JSON dict, its peak RSS in MB as a process tree) of a W8 child `code` run by `python`."""
    arguments = [npy, labels_path, args.patch, args.classes, W8_BATCH, args.repetitions, W8_OVERLAP, *extra]
    out, _, peak = in_checkout([python, "-c", code, *map(str, arguments)], env)
    return json.loads(out.strip().splitlines()[-1]), peak


def w8_line(args, library, label, stage, result, peak, **details):
    """A W8 JSON line: the median seconds of the runs (`value`, `seconds`), every run and the peak RSS in MB."""
    figure = spread(result["seconds_runs"], 3)
    return {"workload": "W8", "library": library, "label": label, "cases": 1, "shape": args.shape,
            "classes": args.classes, "stage": stage, **figure, "unit": "s", "seconds": figure["value"],
            "peak_rss_mb": peak,
            "overlap": W8_OVERLAP, "blending": "gaussian", **details}


def w8_zero_cost_line(library, code, label, npy, args, env):
    """(the zero_cost_labels line of `library`, the path of its labels (X, Y, Z) uint8 .npy); medseg_dl's child
    gets --accumulation."""
    python, isolated = python_for(library)
    labels_path = os.path.join(args.work, f"w8_labels_{library}.npy")
    result, peak = w8_child(code, python, npy, labels_path, args, env,
                            extra=[args.accumulation] if library == "medseg_dl" else [])
    window = [args.patch] * 3
    line = w8_line(args, library, label, "zero_cost_labels", result, peak, isolated=isolated, window=window,
                   windows=w8_window_count(args.shape, window, W8_OVERLAP), network=W8_NETWORK,
                   batch=1 if library == "nnunetv2" else W8_BATCH)  # nnU-Net: one window per network call
    line.update({"accumulation": result["accumulation"]} if "accumulation" in result else {})
    return line, labels_path


def measure_w8_zero_cost(args, npy, env):
    """The zero-cost lines of medseg_dl, MONAI and nnU-Net v2 (the peers importable by their interpreters) on the
    image `npy`; ours with speedup_vs_<peer> (peer s / ours), peak_rss_ratio_vs_<peer> (ours / peer's) and
    labels_agree_with_<peer> (the fraction of voxels with equal labels)."""
    ours, ours_path = w8_zero_cost_line("medseg_dl", W8_MEDSEG, args.label, npy, args, env)
    lines = [ours]
    peers = [] if args.peer == "none" else peers_available({library: f"torch, {library}" for library in W8_PEERS})
    for library in peers:
        code, label = W8_PEERS[library]
        theirs, theirs_path = w8_zero_cost_line(library, code, label, npy, args, env)
        add_ratios(ours, theirs, library)
        ours[f"labels_agree_with_{library}"] = round(float(np.mean(np.load(ours_path) == np.load(theirs_path))), 5)
        lines.append(theirs)
    return lines


def w8_plan(cases_dir, args, env):
    """The params that `medseg plan` writes for the W8 case folder (a CPU budget), as a YAML path."""
    output = os.path.join(args.work, "w8-plan.yaml")
    in_checkout([*MEDSEG, "plan", "--data", cases_dir, "--layout", "images_labels",
                  "--modality", "CT", "--output", output], env)
    return output


def measure_w8_planned(args, cases_dir, npy, env):
    """The planned-network line (random weights, labels on the model grid); --quick adds the estimated seconds
    of the full-size run (`estimated_full_seconds`: one 128^3 window's seconds times its window count)."""
    plan = w8_plan(cases_dir, args, env)
    full_windows = w8_window_count(W8_SHAPE, [W8_WINDOW] * 3, W8_OVERLAP) if args.quick else 0
    python, isolated = python_for("medseg_dl")
    result, peak = w8_child(W8_PLANNED, python, npy, os.path.join(args.work, "w8_labels_planned.npy"), args, env,
                            extra=(plan, W8_WINDOW, full_windows))
    details = {k: result[k] for k in ("window", "planned_patch", "precision", "estimated_full_seconds") if k in result}
    return w8_line(args, "medseg_dl", args.label, "planned_labels", result, peak, batch=W8_BATCH, isolated=isolated,
                   network="planned U-Net, random weights", windows=w8_window_count(args.shape, result["window"],
                                                                                    W8_OVERLAP), **details)


def w8_model_folder(args, env):
    """A model folder resampling to W8_MODEL_SPACING_MM, trained for 2 steps on small synthetic cases (same classes,
    window args.patch, a small U-Net): what `medseg predict` maps back from."""
    shape = [48, 48, 24] if args.quick else [128, 128, 64]
    cases_dir = os.path.join(args.work, "w8_model_cases_" + "x".join(map(str, shape)) + f"_k{args.classes}")
    write_cases(cases_dir, 3, shape, args.classes, seed=8)
    model_dir = os.path.join(args.work, "w8-model")
    subprocess.run(["rm", "-rf", model_dir], check=True)
    params = experiment(cases_dir, model_dir, args.classes, [args.patch] * 3)
    with open(params) as f:
        values = yaml.safe_load(f)
    values["data"]["split"] = {"val": 0.0, "test": 0.0}
    values["preprocessing"]["target_spacing_mm"] = [W8_MODEL_SPACING_MM] * 3
    values["model"].update({"base_filters": 4, "depth": 3})
    values["training"].update({"steps": 2, "checkpoint_every": 2})
    values["evaluation"].update({"overlap": W8_OVERLAP, "blending": "gaussian", "batch_size": W8_BATCH,
                                 "tta_mirroring": False})
    with open(params, "w") as f:
        yaml.safe_dump(values, f)
    for stage in (["convert", "--params", params], ["train", "--params", os.path.join(model_dir, "params.yaml")]):
        in_checkout([*MEDSEG, *stage], env)
    return model_dir


def probabilities_option(env):
    """(the `medseg predict` arguments that save probabilities, their dtype): uint8 where --save-probabilities
    takes a dtype among which it is, else the flag (float32)."""
    out, _, _ = in_checkout([*MEDSEG, "predict", "--help"], env)
    usage = " ".join(out.split())
    taken = usage.split("--save-probabilities", 1)[1].lstrip(" [").split("]", 1)[0].strip()
    if not taken:
        return ["--save-probabilities"], "float32"
    choices = taken.strip("{}").split(",") if taken.startswith("{") else [d for d in ("uint8", "float16") if d in out]
    choices = choices or [taken]
    dtype = "uint8" if "uint8" in choices else choices[0]
    return ["--save-probabilities", dtype], dtype


def measure_w8_mapped_back(args, image_path, env):
    """`medseg predict` of the W8 case with a model folder at 1.5 mm, without and with saved probabilities: the
    labels mapped back to the case's grid (checked: `labels_on_original_grid`); seconds of the whole command (its
    imports and model loading too, as a user waits for it) and peak RSS of its process tree, against the 4 GB target."""
    model_dir = w8_model_folder(args, env)
    option, dtype = probabilities_option(env)
    lines = []
    for stage, extra in (("predict_mapped_back", []), (f"predict_mapped_back_probabilities_{dtype}", option)):
        output = os.path.join(args.work, "w8-predicted")
        subprocess.run(["rm", "-rf", output], check=True)
        _, seconds, peak = in_checkout([*MEDSEG, "predict", "--model-dir", model_dir,
                                         "--checkpoint", "latest", "--input", image_path, "--output", output,
                                         "--set", f"evaluation.accumulation={args.accumulation}", *extra], env)
        written = nib.load(os.path.join(output, "case_000.nii.gz")).shape
        lines.append(w8_line(args, "medseg_dl", args.label, stage, {"seconds_runs": [seconds]}, peak, batch=W8_BATCH,
                             window=[args.patch] * 3, model_spacing_mm=[W8_MODEL_SPACING_MM] * 3,
                             network="small U-Net (base 4, depth 3), 2 training steps",
                             labels_on_original_grid=list(written) == list(args.shape),
                             accumulation=args.accumulation,
                             output_mb=round(folder_mb(output), 1), rss_target_mb=W8_RSS_TARGET_MB,
                             meets_rss_target=peak <= W8_RSS_TARGET_MB))
    return lines


def measure_w8(args, env):
    """The W8 lines of `args.stages`, each as soon as measured: zero-cost windowing of the three libraries, the
    planned network (always with --quick) and `medseg predict` mapped back to the original grid."""
    cases_dir = os.path.join(args.work, "w8_" + "x".join(map(str, args.shape)) + f"_k{args.classes}")
    write_cases(cases_dir, 1, args.shape, args.classes)
    npy = w8_normalised(cases_dir)
    if "zero_cost" in args.stages:
        yield from measure_w8_zero_cost(args, npy, env)
    if "planned" in args.stages or args.quick:
        yield measure_w8_planned(args, cases_dir, npy, env)
    if "mapped_back" in args.stages:
        yield from measure_w8_mapped_back(args, os.path.join(cases_dir, "images", "case_000.nii.gz"), env)


def workload_defaults(args):
    """`args` with the workload's shape, classes and patch where not given, and the --quick sizes."""
    w8 = args.workload == "W8"
    args.shape = args.shape or {"W7": [512, 512, 1000], "W8": W8_SHAPE}.get(args.workload, [256, 256, 128])
    args.classes = args.classes or (W8_CLASSES if w8 else 5)
    args.patch = args.patch or (W8_WINDOW if w8 else 96)
    if args.quick:
        args.cases, args.shape, args.patch = [5, 6], ([96, 96, 64] if w8 else [48, 48, 24]), (32 if w8 else 16)
        args.classes, args.work = (4 if w8 else args.classes), os.path.join(args.work, "quick")
    return args


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["W6", "W6-eval", "W7", "W8"], default="W6")
    parser.add_argument("--cases", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--shape", type=int, nargs=3)
    parser.add_argument("--classes", type=int, help="default 5; W8: 14")
    parser.add_argument("--patch", type=int, help="the patch, or W8's window, per axis (default 96; W8: 128)")
    parser.add_argument("--work", default="/tmp/medseg_scale")
    parser.add_argument("--repo", default=REPO, help="the checkout whose medseg_dl runs the stages")
    parser.add_argument("--label", default="main", help="names this checkout in the lines")
    parser.add_argument("--quick", action="store_true", help="5 and 6 cases of 48 x 48 x 24 (W8: one case of "
                                                             "96 x 96 x 64, 4 classes, window 32): a smoke test")
    parser.add_argument("--peer", choices=["nnunetv2", "none"], default="nnunetv2",
                        help="W6's peer; W8: none measures medseg_dl alone")
    parser.add_argument("--accumulation", choices=["float32", "float16"], default="float32",
                        help="W8: medseg_dl's evaluation.accumulation")
    parser.add_argument("--repetitions", type=int, default=1, help="W8: timed runs per library (the median is kept)")
    parser.add_argument("--stages", nargs="+", choices=["zero_cost", "planned", "mapped_back"],
                        default=["zero_cost", "mapped_back"], help="W8's stages (planned: long on a CPU)")
    args = workload_defaults(parser.parse_args())
    env = {**os.environ, "PYTHONPATH": os.path.abspath(args.repo), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if args.workload in ("W7", "W8"):
        for line in (measure_w7 if args.workload == "W7" else measure_w8)(args, env):
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
