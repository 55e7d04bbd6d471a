"""Workload W3 of BENCHMARKS.md: per-class Dice, ASSD and HD95 of the BraTS label maps (s/subject).

Reference: each BraTS label map (rounded to int). Prediction, fixed and deterministic
(`w3_prediction`): class 2 grown by 2 voxels (two 6-connected dilations of the reference's
class 2, kept only where the reference is background); the outer layer of class 4 (class 4
minus its 6-connected erosion) set to background; the second-largest 26-connected
component of class 3 set to background (ties: the lower component label ranks first);
class 1 unchanged. Classes 1..4 are scored with spacing (1, 1, 1) mm (the line's
"value") and, on the same arrays, (0.8, 0.8, 2.5) mm (the "anisotropic" detail).

Timing: one untimed pass over all subjects (warm-up, also records the values), then
`--repetitions` timed passes; a figure is the median over passes of seconds per subject (every pass's
kept beside it: `value_runs`).
The libraries take turns within each pass, so a change of machine load hits them alike.
Only the metric calls are timed: reading, building the prediction and each peer's input
format (MONAI one-hot tensors, per-class boolean masks) are prepared outside the clock.

With --peers, MONAI, medpy and DeepMind surface-distance run the same work when importable
(else a "skipped" line). Their lines add "ratio" (peer s/subject / medseg_dl s/subject at
spacing 1, both measured in this run) and "max_rel_diff" per metric of our values against
theirs, over (subject, class, spacing) where both are finite; "same_convention" lists the
metrics whose convention medseg_dl.evaluation.scoring documents as that peer's (they must differ by
< 1e-6 relative). Lines are kept in benchmarks/results/metrics.jsonl (not with --quick).
Usage: python benchmarks/metrics.py [--workload W3] [--quick] [--peers]
"""
import argparse
import glob
import os
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from datasets import BRATS
from harness import speedup, spread
from machine_info import record
from scipy import ndimage

from medseg_dl.data.targets import Targets
from medseg_dl.evaluation.scoring import score_case

CLASSES = (1, 2, 3, 4)
NUM_CLASSES = 5
TARGETS = Targets(NUM_CLASSES, tuple(f"class_{c}" for c in range(NUM_CLASSES)))  # scores classes 1..4 = CLASSES
ISOTROPIC_MM = (1.0, 1.0, 1.0)
ANISOTROPIC_MM = (0.8, 0.8, 2.5)
METRIC_KEYS = ("dice", "assd_mm", "hd95_mm")
SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


def w3_prediction(reference):
    """The W3 prediction (X, Y, Z) int32 built from a reference label map (see module docstring)."""
    prediction = reference.copy()
    grown = ndimage.binary_dilation(reference == 2, SIX_CONNECTED, iterations=2)
    prediction[grown & (reference == 0)] = 2
    class4 = reference == 4
    prediction[class4 & ~ndimage.binary_erosion(class4, SIX_CONNECTED)] = 0
    components, count = ndimage.label(reference == 3, np.ones((3, 3, 3), bool))
    if count >= 2:
        sizes = np.bincount(components.ravel())[1:]
        second = np.argsort(-sizes, kind="stable")[1] + 1
        prediction[components == second] = 0
    return prediction


def load_cases(data_dir, subjects):
    """[(name, reference, prediction)] for the first `subjects` label maps (sorted by path)."""
    paths = sorted(glob.glob(os.path.join(str(data_dir), "*", "*", "OTMultiClass.nii.gz")))[:subjects]
    if not paths:
        raise SystemExit(f"no */*/OTMultiClass.nii.gz under {data_dir}; pass --data-dir")
    cases = []
    for path in paths:
        reference = np.rint(np.asanyarray(nib.load(path).dataobj)).astype(np.int32)
        cases.append((Path(path).parent.name, reference, w3_prediction(reference)))
    return cases


def medseg_runner():
    """(prepare, run) for medseg_dl: run returns {metric: [class 1..4]}."""

    def run(prepared, spacing):
        rows = score_case(prepared[0], prepared[1], TARGETS, spacing)
        return {key: [row[key] for row in rows] for key in METRIC_KEYS}

    return (lambda reference, prediction: (reference, prediction)), run


def monai_runner():
    import torch
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    def prepare(reference, prediction):
        def one_hot(labels):
            return torch.from_numpy(np.stack([labels == c for c in range(NUM_CLASSES)])[None].astype(np.float32))

        return one_hot(reference), one_hot(prediction)

    def run(prepared, spacing):
        y, y_pred = prepared
        spacing = list(spacing)
        values = {
            "dice": compute_dice(y_pred, y, include_background=False),
            "assd_mm": compute_average_surface_distance(y_pred, y, include_background=False, symmetric=True,
                                                        spacing=spacing),
            "hd95_mm": compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95,
                                                  spacing=spacing),
        }
        return {key: value[0].double().tolist() for key, value in values.items()}

    return prepare, run


def medpy_runner():
    from medpy.metric import binary

    def run(masks, spacing):
        values = {key: [] for key in METRIC_KEYS}
        for reference, prediction in masks:
            values["dice"].append(binary.dc(prediction, reference))
            for key, fn in (("assd_mm", binary.assd), ("hd95_mm", binary.hd95)):
                try:
                    values[key].append(fn(prediction, reference, voxelspacing=spacing))
                except RuntimeError:  # medpy raises when a mask is empty
                    values[key].append(float("nan"))
        return values

    return _class_masks, run


def surface_distance_runner():
    import surface_distance as sd

    def run(masks, spacing):
        values = {key: [] for key in METRIC_KEYS}
        for reference, prediction in masks:
            distances = sd.compute_surface_distances(reference, prediction, spacing)
            values["dice"].append(sd.compute_dice_coefficient(reference, prediction))
            values["assd_mm"].append(float(np.mean(sd.compute_average_surface_distance(distances))))
            values["hd95_mm"].append(sd.compute_robust_hausdorff(distances, 95))
        return values

    return _class_masks, run


def _class_masks(reference, prediction):
    return [(reference == c, prediction == c) for c in CLASSES]


PEERS = {
    "monai": (monai_runner, ("dice", "assd_mm", "hd95_mm")),
    "medpy": (medpy_runner, ("dice", "assd_mm")),
    "surface_distance": (surface_distance_runner, ("dice",)),
}


def one_pass(runner, cases, spacing):
    """(seconds spent in the metric calls, [per-subject values]) of one pass over the cases."""
    prepare, run = runner
    elapsed, values = 0.0, []
    for _, reference, prediction in cases:
        prepared = prepare(reference, prediction)
        start = time.perf_counter()
        values.append(run(prepared, spacing))
        elapsed += time.perf_counter() - start
    return elapsed, values


def measure(runners, cases, repetitions):
    """Interleaved timing of every library: {name: (iso [seconds per subject of each pass], aniso [...], values)}.

    Pass 0 is the warm-up and gives the values (spacing 1 subjects, then anisotropic ones);
    each later pass runs every library in turn, so load changes hit all of them alike.
    """
    seconds = {name: {ISOTROPIC_MM: [], ANISOTROPIC_MM: []} for name in runners}
    values = {name: [] for name in runners}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for repetition in range(repetitions + 1):
            for spacing in (ISOTROPIC_MM, ANISOTROPIC_MM):
                for name, runner in runners.items():
                    elapsed, result = one_pass(runner, cases, spacing)
                    if repetition == 0:
                        values[name].extend(result)
                    else:
                        seconds[name][spacing].append(elapsed / len(cases))
    return {name: (seconds[name][ISOTROPIC_MM], seconds[name][ANISOTROPIC_MM], values[name]) for name in runners}


def max_relative_differences(ours, theirs):
    """{metric: max |a - b| / max(|a|, |b|)} over pairs where both are finite, and the skipped count."""
    worst, skipped = {key: 0.0 for key in METRIC_KEYS}, 0
    for case_ours, case_theirs in zip(ours, theirs):
        for key in METRIC_KEYS:
            for a, b in zip(case_ours[key], case_theirs[key]):
                if not (np.isfinite(a) and np.isfinite(b)):
                    skipped += 1
                elif a != b:
                    worst[key] = max(worst[key], abs(a - b) / max(abs(a), abs(b)))
    return worst, skipped


def result_line(library, timing, cases):
    """The JSON line of one library: seconds per subject at 1 mm (the figure) and anisotropic, over the passes."""
    isotropic_s, anisotropic_s = timing
    return {"workload": "W3", "library": library, **spread(isotropic_s, 4), "unit": "s", "subjects": len(cases),
            "spacing_mm": list(ISOTROPIC_MM), "anisotropic": {"spacing_mm": list(ANISOTROPIC_MM),
                                                              **spread(anisotropic_s, 4)}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="W3", choices=["W3"])
    parser.add_argument("--quick", action="store_true", help="1 subject, 1 repetition (smoke run)")
    parser.add_argument("--peers", action="store_true", help="also run MONAI, medpy, surface-distance if importable")
    parser.add_argument("--only-peers", default=None,
                        help="comma-separated subset of " + ",".join(PEERS) + " (implies --peers)")
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--data-dir", default=BRATS)
    args = parser.parse_args(argv)
    if args.quick:
        args.subjects, args.repetitions = 1, 1
    args.peer_names = args.only_peers.split(",") if args.only_peers else list(PEERS) if args.peers else []
    unknown = set(args.peer_names) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {list(PEERS)}")
    if args.subjects < 1 or args.repetitions < 1:
        parser.error("--subjects and --repetitions must be >= 1")
    return args


def load_peers(names):
    """({name: runner} of the importable peers, [skip lines of the others])."""
    runners, skipped = {}, []
    for name in names:
        try:
            runners[name] = PEERS[name][0]()
        except ImportError as error:
            skipped.append({"workload": "W3", "library": name, "skipped": f"not importable: {error}"})
    return runners, skipped


def main(argv=None):
    args = parse_args(argv)
    cases = load_cases(args.data_dir, args.subjects)
    peers, skipped = load_peers(args.peer_names)
    results = measure({"medseg_dl": medseg_runner(), **peers}, cases, args.repetitions)
    ours_iso, ours_aniso, ours_values = results.pop("medseg_dl")
    ours = result_line("medseg_dl", (ours_iso, ours_aniso), cases)
    ours["mean_dice_spacing_1"] = round(float(np.mean([v["dice"] for v in ours_values[: len(cases)]])), 6)
    record("metrics", ours, keep=not args.quick)
    for name, (iso, aniso, values) in results.items():
        line = result_line(name, (iso, aniso), cases)
        worst, not_compared = max_relative_differences(ours_values, values)
        line.update(ratio=speedup(ours, line, digits=2),
                    ratio_anisotropic=speedup(ours["anisotropic"], line["anisotropic"], digits=2),
                    max_rel_diff={key: float(f"{v:.3g}") for key, v in worst.items()},
                    same_convention=list(PEERS[name][1]), not_compared=not_compared)
        record("metrics", line, keep=not args.quick)
    for line in skipped:
        record("metrics", line, keep=False)


if __name__ == "__main__":
    main()
