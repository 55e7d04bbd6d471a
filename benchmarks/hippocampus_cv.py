"""Cross-validation, fold ensemble, post-processing and export on the hippocampus data (CPU budget).

Plans the hippocampus folder as `hippocampus_accuracy.py` does (`medseg plan`, CPU recipe), holds out
the same 20% test cases (seeded split; the folds share them), deals the other cases into `--folds`
folds, and trains each fold for `--steps` steps (`medseg train --fold k` in a subprocess; a step
budget, not a time budget, so a loaded machine changes the minutes, not the result). Then, each
fold at its latest checkpoint:
- `medseg evaluate --cv`: every fold scored on its own validation cases, the post-processing decided
  on them (raw and post-processed mean Dice of the pooled validation cases, and per fold);
- every fold alone, and the ensemble of all folds (mean softmax, TTA as planned), on the test cases,
  without and with the decided post-processing;
- `medseg export` of the ensemble, and its seconds per test volume (the SavedModel's serving
  function) against the Predictor's (what `medseg predict` runs on the model grid), both in this
  process, after one warm-up call, on the same preprocessed volumes; labels compared.
One JSON line is printed and appended to benchmarks/results/hippocampus_cv.jsonl.

    python benchmarks/hippocampus_cv.py --folds 3 --steps 1400
"""
import argparse
import itertools
import json
import os
import statistics
import subprocess
import time

import numpy as np

from datasets import HIPPO, HIPPO_CLASS_NAMES
from experiments import planned_experiment, step_times_s
from harness import MEDSEG, REPO
from machine_info import record

TIMED_VOLUMES = 10


def train_fold(params_path, fold, overrides):
    """`medseg train --fold` in a subprocess; returns its wall time in minutes."""
    command = [*MEDSEG, "train", "--params", params_path, "--fold", str(fold)]
    for override in overrides:
        command += ["--set", override]
    started = time.time()
    subprocess.run(command, cwd=REPO, check=True)
    return (time.time() - started) / 60


def mean_dice_by_class(summary):
    return {name: stats["dice"]["mean"] for name, stats in summary["classes"].items()}


def per_fold_validation(cv_summary, fold_dirs):
    """Mean foreground Dice of each fold's own validation cases, from the pooled cross-validation rows."""
    result = []
    for fold_dir in fold_dirs:
        with open(fold_dir.filelist("val")) as f:
            ids = {entry["id"] for entry in json.load(f)}
        dice = [row["dice"] for row in cv_summary["per_case"]
                if row["subject"] in ids and row["class"] > 0 and not np.isnan(row["dice"])]
        result.append(round(float(np.mean(dice)), 4))
    return result


def test_scores_per_fold(fold_dirs):
    """Mean Dice of each fold's model alone on the test cases (latest checkpoint)."""
    from medseg_dl.config.params import Params
    from medseg_dl.evaluation.watcher import run_evaluation

    return [round(run_evaluation(Params.load(d.params_path), d, checkpoint="latest", split="test")["mean_dice"], 4)
            for d in fold_dirs]


def export_timing(root, fold_dirs, output_dir):
    """Seconds per test volume of the exported ensemble and of the Predictor, and whether their labels agree (the
    Predictor's after the experiment's post-processing decision, which the SavedModel applies in its graph)."""
    import tensorflow as tf

    from medseg_dl.config.params import Params
    from medseg_dl.evaluation.cases import split_cases
    from medseg_dl.inference import postprocess
    from medseg_dl.inference.export import run_export
    from medseg_dl.inference.predict import load_predictor

    started = time.time()
    run_export([root], "latest", output_dir, folds="all")
    export_s = time.time() - started
    predictor, ensemble, decision = load_predictor([root], "latest", "all")
    params = Params.load(fold_dirs[0].params_path)
    cases = itertools.islice(split_cases(params, fold_dirs[0], "test", 1.0), TIMED_VOLUMES)
    served = tf.saved_model.load(output_dir)
    exported_s, predictor_s, equal = [], [], 0
    for case in cases:
        image, spacing_mm = case.image.astype(np.float32), np.asarray(case.spacing_mm, np.float32)
        served.serve(tf.constant(image), tf.constant(spacing_mm))
        begin = time.perf_counter()
        out = served.serve(tf.constant(image), tf.constant(spacing_mm))
        exported_s.append(time.perf_counter() - begin)
        predictor.labels(image)
        begin = time.perf_counter()
        labels = postprocess.apply(predictor.labels(image), decision or postprocess.NOTHING, case.spacing_mm,
                                   predictor.targets)
        predictor_s.append(time.perf_counter() - begin)
        equal += int(np.array_equal(out["labels"].numpy(), labels))
    return {"export_s": round(export_s, 1), "export_s_per_volume": round(statistics.median(exported_s), 3),
            "export_s_per_volume_runs": [round(s, 3) for s in exported_s],
            "predictor_s_per_volume": round(statistics.median(predictor_s), 3),
            "predictor_s_per_volume_runs": [round(s, 3) for s in predictor_s], "timed_volumes": len(exported_s),
            "export_labels_identical": f"{equal}/{len(exported_s)}", "members": len(ensemble.members)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1400, help="training steps per fold")
    parser.add_argument("--data", default=HIPPO)
    parser.add_argument("--model-dir", default=os.path.join(REPO, "runs", "cv"))
    parser.add_argument("--set", action="append", default=[], help="extra params overrides")
    args = parser.parse_args()
    work = os.path.abspath(args.model_dir)
    root = os.path.join(work, "unet")
    params_path = planned_experiment(args.data, work)
    overrides = [HIPPO_CLASS_NAMES, f"data.split.folds={args.folds}", "data.split.val=0.0", "data.split.test=0.2",
                 f"data.converted_dir={os.path.join(work, 'converted')}", f"experiment.model_dir={root}",
                 f"training.steps={args.steps}", f"training.checkpoint_every={args.steps}", *args.set]
    minutes = [round(train_fold(params_path, k, overrides), 1) for k in range(args.folds)]

    from medseg_dl.config.params import Params
    from medseg_dl.evaluation.cross_validation import run_cross_validation, run_ensemble_test
    from medseg_dl.experiment.experiment import fold_model_dirs

    params = Params.load(params_path, overrides)
    fold_dirs = fold_model_dirs(params)
    cv = run_cross_validation(params, "latest")
    ensemble = run_ensemble_test(params, "latest")
    result = {"benchmark": "hippocampus_cv", "folds": args.folds, "steps_per_fold": args.steps,
              "train_minutes_per_fold": minutes,
              "step_time_s": [round(statistics.median(step_times_s(d.root)), 3) for d in fold_dirs],
              "step_time_s_runs": [[round(s, 3) for s in step_times_s(d.root)] for d in fold_dirs],
              "cv_cases": cv["raw"]["subjects"], "test_cases": ensemble["raw"]["subjects"],
              "cv_mean_dice": cv["raw"]["mean_dice"], "cv_mean_dice_postprocessed": cv["postprocessed"]["mean_dice"],
              "cv_mean_dice_per_fold": per_fold_validation(cv["raw"], fold_dirs),
              "postprocessing": {k: cv["postprocessing"][k] for k in
                                 ("foreground_largest_component", "largest_component_classes", "min_island_mm3")},
              "test_mean_dice_per_fold": test_scores_per_fold(fold_dirs),
              "test_mean_dice_ensemble": ensemble["raw"]["mean_dice"],
              "test_mean_dice_ensemble_postprocessed": ensemble["postprocessed"]["mean_dice"],
              "test_dice_ensemble_by_class": mean_dice_by_class(ensemble["raw"]),
              **export_timing(root, fold_dirs, os.path.join(work, "exported")),
              "tta_mirroring": params.evaluation.tta_mirroring, "settings": args.set}
    record("hippocampus_cv", result, keep=args.data == HIPPO)  # kept for runs on the real folder


if __name__ == "__main__":
    main()
