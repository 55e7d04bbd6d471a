"""Deployment (issue 26): `medseg predict`, the Predictor, the SavedModel and the ONNX runner on the same
preprocessed volumes, seconds per volume and peak RSS, each in its own process.

    python benchmarks/deploy.py --model-dir /tmp/deploy/hippo --workload hippocampus --split val [--cases 20]
    python benchmarks/deploy.py --model-dir /tmp/medseg_regions_brats/brats/labels --workload brats --cases 1

The model folder's test (or --split val) cases (its filelists; --cases: the first N) are preprocessed once
here (the model's recipe: reorientation, resampling, normalisation) and saved as .npy with their spacing;
the model is exported as a SavedModel and as ONNX (`medseg export`). Then, each in a fresh process, one
volume after another, both outputs (probabilities and labels) of every volume, in float32
(evaluation.accumulation float32, the precision of both exports):
- `predictor`: `Predictor.probabilities` and the labels of those probabilities (`Targets.labels_of_probabilities`),
  one pass over the windows, as `medseg predict` segments a case on its model grid;
- `savedmodel`: `serve(image, spacing_mm)` of `tf.saved_model.load`;
- `onnxruntime`: `OnnxSegmenter.segment` of the export's segment.py, TensorFlow and medseg_dl not importable;
- `predict_cli`: `medseg predict` on the cases' image files, the whole command (start, model loading, reading,
  preprocessing, mapping back, writing): its wall time over the number of cases.
The first volume of each in-process runner is a warm-up (its time is kept as `first_s`); the value is the
median of the others. Peak RSS is that of each process's tree, measured by the harness (`harness.RSS_METHOD`).
One JSON line per runner, kept in benchmarks/results/deploy.jsonl unless --quick.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
from harness import MEDSEG, run_measured, spread
from machine_info import record

RUNNERS = ("predictor", "savedmodel", "onnxruntime")
# the in-process runners: each prints {"seconds": [...]}, one per volume
CHILD = r"""
import json, os, sys, time
import numpy as np
runner, model_dir, export_dir, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
if runner == "onnxruntime":
    sys.modules["tensorflow"] = sys.modules["medseg_dl"] = None
    sys.path.insert(0, export_dir)
    import segment
    segmenter = segment.OnnxSegmenter(export_dir)
    run = lambda image, spacing_mm: segmenter.segment(image, spacing_mm)
elif runner == "savedmodel":
    import tensorflow as tf
    served = tf.saved_model.load(export_dir)
    def run(image, spacing_mm):
        out = served.serve(tf.constant(image), tf.constant(spacing_mm))
        return out["probabilities"].numpy(), out["labels"].numpy()
else:
    from medseg_dl.inference.predict import load_predictor
    predictor = load_predictor([model_dir], ["latest"], None, ["evaluation.accumulation=float32"])[0]
    def run(image, spacing_mm):
        probabilities = predictor.probabilities(image)
        return probabilities, predictor.targets.labels_of_probabilities(probabilities)
seconds = []
for name in names:
    image, spacing_mm = np.load(name + ".npy"), np.load(name + "_spacing_mm.npy")
    begin = time.perf_counter()
    probabilities, labels = run(image, spacing_mm)
    seconds.append(time.perf_counter() - begin)
    np.save(name + "_" + runner + "_labels.npy", labels)
print(json.dumps({"seconds": seconds}))
"""


def prepare(args, folder):
    """Save the test cases' preprocessed images (<folder>/case_<i>.npy, _spacing_mm.npy) and export the model
    (<folder>/savedmodel, <folder>/onnx); returns (the names, the cases' image paths, export seconds)."""
    from medseg_dl.config.params import Params
    from medseg_dl.data.cases import stored_recipe, subject_case
    from medseg_dl.data.io import spacing_from_affine
    from medseg_dl.experiment.filelists import filelist_subjects
    from medseg_dl.experiment.model_dir import ModelDir
    from medseg_dl.inference.export import run_export
    model_dir = ModelDir(args.model_dir)
    subjects = filelist_subjects(model_dir, args.split)[:args.cases]
    recipe, names = stored_recipe(Params.load(model_dir.params_path)), []
    for i, subject in enumerate(subjects):
        case = subject_case(subject, recipe)
        name = os.path.join(folder, f"case_{i}")
        np.save(name + ".npy", case.image)
        np.save(name + "_spacing_mm.npy", spacing_from_affine(case.affine).astype(np.float32))
        names.append(name)
    export_s = {}
    for export_format in ("savedmodel", "onnx"):
        begin = time.perf_counter()
        run_export(args.model_dir, "latest", os.path.join(folder, export_format),
                   overrides=["evaluation.accumulation=float32"], export_format=export_format)
        export_s[export_format] = time.perf_counter() - begin
    return names, subjects, export_s


def run_child(runner, args, folder, names):
    """{"seconds": [...], "peak_rss_mb"} of one in-process runner, in a fresh process."""
    export_dir = os.path.join(folder, "onnx" if runner == "onnxruntime" else "savedmodel")
    measured = run_measured([sys.executable, "-c", CHILD, runner, args.model_dir, export_dir, *names], cwd=folder)
    return {**measured.result, "peak_rss_mb": measured.peak_rss_mb}


def run_predict_cli(args, folder, subjects):
    """{"seconds": the whole command's wall time, "peak_rss_mb": its process tree's peak} of `medseg predict` on
    the cases' image files (one subject folder or file each)."""
    inputs = [os.path.dirname(s.channels[0]) if len(s.channels) > 1 else s.channels[0] for s in subjects]
    measured = run_measured([*MEDSEG, "predict", "--model-dir", args.model_dir, "--checkpoint", "latest", "--set",
                             "evaluation.accumulation=float32", "--input", *inputs, "--output",
                             os.path.join(folder, "predicted")])
    return {"seconds": measured.wall_s, "peak_rss_mb": measured.peak_rss_mb}


def lines(args, names, export_s, raw, cli):
    """The JSON lines: one per runner, with the labels that differ from the predictor's."""
    shapes = [list(np.load(n + ".npy", mmap_mode="r").shape) for n in names]
    common = {"workload": f"deploy-{args.workload}", "unit": "s", "split": args.split, "cases": len(names),
              "shapes": shapes,
              "model_dir": args.model_dir, "label": args.label}
    out = []
    for runner in RUNNERS:
        seconds = raw[runner]["seconds"]
        differ = sum(int((np.load(f"{n}_{runner}_labels.npy") != np.load(f"{n}_predictor_labels.npy")).sum())
                     for n in names)
        out.append({**common, "library": "medseg_dl" if runner == "predictor" else runner, "runner": runner,
                    **spread(seconds[1:] or seconds, 4), "first_s": round(seconds[0], 4),
                    "peak_rss_mb": round(raw[runner]["peak_rss_mb"], 1), "labels_differ_from_predictor": differ,
                    **({"export_s": round(export_s[runner if runner != "onnxruntime" else "onnx"], 2)}
                       if runner != "predictor" else {})})
    out.append({**common, "library": "medseg_dl", "runner": "predict_cli",
                "value": round(cli["seconds"] / len(names), 4), "total_s": round(cli["seconds"], 2),
                "peak_rss_mb": round(cli["peak_rss_mb"], 1)})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True, help="a trained model folder (its test cases are used)")
    parser.add_argument("--workload", required=True, help="a name for the lines: hippocampus, brats, ...")
    parser.add_argument("--split", choices=["val", "test"], default="test", help="the model folder's cases used")
    parser.add_argument("--cases", type=int, default=None, help="the first N test cases (default: all)")
    parser.add_argument("--label", default="", help="a free-text label kept on the lines")
    parser.add_argument("--quick", action="store_true", help="2 cases, nothing kept")
    args = parser.parse_args()
    args.model_dir = os.path.abspath(args.model_dir)
    args.cases = 2 if args.quick else args.cases
    with tempfile.TemporaryDirectory(prefix="medseg_deploy_") as folder:
        names, subjects, export_s = prepare(args, folder)
        cli = run_predict_cli(args, folder, subjects)
        raw = {runner: run_child(runner, args, folder, names) for runner in RUNNERS}
        for line in lines(args, names, export_s, raw, cli):
            record("deploy", line, keep=not args.quick)


if __name__ == "__main__":
    main()
