"""The report of one evaluated checkpoint: `<model_dir>/eval/<step>/`.

    metrics.csv     one row per (subject, class): dice, jaccard, assd_mm, hd95_mm, surface_dice,
                    reference_mm3, predicted_mm3, empty_reference, empty_prediction
    summary.json    per class mean/std/median of each metric, `mean_dice` over foreground classes,
                    counts of empty-mask cases (scoring.summarize), the step and subject count
    overlays/       <subject>.png: image, reference and prediction contours on three slices
    predictions/    <subject>.nii.gz with the input's affine (evaluation.save_predictions)

The folder is assembled under a temporary name and renamed when complete.
"""
import csv
import json
import os
import shutil

import numpy as np
import tensorflow as tf

from medseg_dl import plotting, scoring
from medseg_dl.data.io import write_nifti

COLUMNS = ["subject", "class", "class_name", *scoring.METRICS, "empty_reference", "empty_prediction"]


def score_results(results, params):
    """metrics.csv rows for (case, prediction) pairs."""
    rows = []
    names = params.data.class_names
    for case, prediction in results:
        for row in scoring.score_case(case["label"], prediction, params.data.num_classes, case["spacing_mm"],
                                      params.evaluation.surface_tolerance_mm):
            rows.append({"subject": case["subject"], "class_name": names[row["class"]], **row})
    return rows


def write_report(eval_dir, results, params, step, writer=None):
    """Write the report folder for `results` [(case, prediction)]; returns the summary dict."""
    rows = score_results(results, params)
    summary = {"step": step, "subjects": len(results), **scoring.summarize(rows, params.data.class_names)}
    tmp = f"{eval_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _write_csv(os.path.join(tmp, "metrics.csv"), rows)
    with open(os.path.join(tmp, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    _write_pictures(tmp, results, params)
    if os.path.isdir(eval_dir):
        shutil.rmtree(eval_dir)
    os.replace(tmp, eval_dir)
    if writer is not None:
        _write_summaries(writer, step, summary, results, params)
    return summary


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        out.writeheader()
        out.writerows(rows)


def _write_pictures(folder, results, params):
    evaluation = params.evaluation
    for case, prediction in results:
        subject = case["subject"]
        if evaluation.save_overlays:
            os.makedirs(os.path.join(folder, "overlays"), exist_ok=True)
            plotting.orthogonal_overlay(case["image"], os.path.join(folder, "overlays", f"{subject}.png"),
                                        reference=case["label"], prediction=prediction,
                                        class_names=params.data.class_names, spacing_mm=case["spacing_mm"],
                                        title=subject)
        if evaluation.save_predictions:
            os.makedirs(os.path.join(folder, "predictions"), exist_ok=True)
            write_nifti(os.path.join(folder, "predictions", f"{subject}.nii.gz"), prediction.astype(np.uint8),
                        case["affine"])


def _write_summaries(writer, step, summary, results, params):
    with writer.as_default(step=step):
        tf.summary.scalar("mean_dice", summary["mean_dice"])
        for name, stats in summary["classes"].items():
            for metric in ("dice", "assd_mm", "hd95_mm"):
                tf.summary.scalar(f"{metric}/{name}", stats[metric]["mean"])
        if results:
            case, prediction = results[0]
            middle = case["image"].shape[2] // 2
            k = max(params.data.num_classes - 1, 1)
            image = case["image"][:, :, middle, 0]
            low, high = np.percentile(image, [1, 99])
            panels = np.stack([np.clip((image - low) / max(high - low, 1e-6), 0, 1),
                               case["label"][:, :, middle] / k, prediction[:, :, middle] / k])
            tf.summary.image("image_reference_prediction", panels[..., None].astype(np.float32), max_outputs=3)
    writer.flush()
