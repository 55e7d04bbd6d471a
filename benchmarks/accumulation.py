"""Exactness of the float16 sliding-window sums (issue 24): labels and probabilities of a trained model's
validation cases with float16 against float32 accumulation, and against the labels of a reference checkout.

    python benchmarks/accumulation.py --model-dir runs/hippocampus-demo [--reference /tmp/wt_main] [--label L]
                                      [--split val|test]

Each case of the model folder's validation list (or --split test: its test list; their converted case folders)
is segmented by the model's
checkpoint (latest) with `evaluation.accumulation` float16 and float32 (the rest of its evaluation section
as set); with --reference (a checkout of another commit, e.g. main before the change) the same cases are
segmented there too, in a child process with that checkout on PYTHONPATH. One JSON line: the cases and
voxels, how many labels differ (float16 vs float32, and each vs the reference), the largest probability
difference float16 vs float32, and the mean foreground Dice against the reference labels of each variant
(and their largest difference). Kept in benchmarks/results/accumulation.jsonl unless --quick (2 cases).
"""
import argparse
import os
import sys

import numpy as np
from harness import REPO, child_env, run_measured
from machine_info import record



def validation_cases(model_dir, quick, overrides=(), split="val"):
    """(params, the `Case`s of a model folder's `split`, its trained network), with the code on sys.path."""
    from medseg_dl.config.params import Params
    from medseg_dl.data.cases import case_from_volume
    from medseg_dl.experiment.filelists import split_case_paths
    from medseg_dl.experiment.model_dir import ModelDir
    from medseg_dl.inference.trained import load_trained
    from medseg_dl.pipeline.inputs import volume_inputs
    folder = ModelDir(model_dir)
    params = Params.load(folder.params_path, overrides)
    paths = split_case_paths(params, folder, split)[:2 if quick else None]
    cases = [case_from_volume(volume) for volume in volume_inputs(params, paths)]
    return params, cases, load_trained(folder, "latest", params).network


def segment(model_dir, quick, accumulation=None, split="val"):
    """{subject: labels} (and {subject: probabilities} when `accumulation` is given) of the cases of `split`."""
    from medseg_dl.inference.predictor import Predictor
    overrides = [f"evaluation.accumulation={accumulation}"] if accumulation else []
    params, cases, network = validation_cases(model_dir, quick, overrides, split)
    predictor = Predictor.from_params(network, params)
    labels = {c.subject_id: np.asarray(predictor.labels(c.image)) for c in cases}
    probabilities = {c.subject_id: predictor.probabilities(c.image) for c in cases} if accumulation else None
    return labels, probabilities, {c.subject_id: c.label for c in cases}, params.data.num_classes


def mean_dice(predictions, references, num_classes):
    """Mean foreground Dice over cases and classes (a class absent from both maps of a case is left out)."""
    values = []
    for subject, reference in references.items():
        for c in range(1, num_classes):
            a, b = reference == c, predictions[subject] == c
            if a.any() or b.any():
                values.append(2.0 * (a & b).sum() / (a.sum() + b.sum()))
    return float(np.mean(values))


def reference_labels(reference, model_dir, quick, split):
    """The labels of the cases of `split` segmented by the checkout at `reference` (a child process; medseg_dl is
    imported from the reference before this script, whose harness would put this checkout first on the path)."""
    out = os.path.join("/tmp", f"accumulation_reference_{os.getpid()}.npz")
    code = (f"import sys; sys.path[:0] = [{reference!r}, {os.path.join(REPO, 'benchmarks')!r}]\n"
            f"import numpy as np, medseg_dl, accumulation\n"
            f"assert medseg_dl.__file__.startswith({reference!r}), medseg_dl.__file__\n"
            f"labels = accumulation.segment({model_dir!r}, {quick!r}, None, {split!r})[0]\n"
            f"np.savez({out!r}, **labels)")
    run_measured([sys.executable, "-c", code], env=child_env(reference), cwd=reference)
    with np.load(out) as saved:
        labels = {k: saved[k] for k in saved.files}
    os.remove(out)
    return labels


def measure(args):
    args.model_dir = os.path.abspath(args.model_dir)
    half, half_probabilities, references, num_classes = segment(args.model_dir, args.quick, "float16", args.split)
    full, full_probabilities, _, _ = segment(args.model_dir, args.quick, "float32", args.split)
    line = {"workload": "accumulation", "library": "medseg_dl", "label": args.label, "model_dir": args.model_dir,
            "split": args.split,
            "cases": len(half), "voxels": int(sum(v.size for v in half.values())),
            "labels_differ_float16_vs_float32": int(sum((half[s] != full[s]).sum() for s in half)),
            "max_probability_difference": float(max(np.abs(half_probabilities[s] - full_probabilities[s]).max()
                                                    for s in half)),
            "mean_dice_float16": mean_dice(half, references, num_classes),
            "mean_dice_float32": mean_dice(full, references, num_classes)}
    if args.reference:
        main = reference_labels(args.reference, args.model_dir, args.quick, args.split)
        line.update({"labels_differ_float16_vs_reference": int(sum((half[s] != main[s]).sum() for s in half)),
                     "labels_differ_float32_vs_reference": int(sum((full[s] != main[s]).sum() for s in half)),
                     "mean_dice_reference": mean_dice(main, references, num_classes)})
        line["max_dice_difference_vs_reference"] = max(abs(line["mean_dice_float16"] - line["mean_dice_reference"]),
                                                       abs(line["mean_dice_float32"] - line["mean_dice_reference"]))
    return line


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--reference", help="a checkout of the commit to compare with (e.g. a git worktree)")
    parser.add_argument("--label", default="", help="a free-text label kept on the line")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="the cases segmented")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    record("accumulation", measure(args), keep=not args.quick)


if __name__ == "__main__":
    main()
