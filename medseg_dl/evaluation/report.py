"""The report of one evaluated checkpoint: `<model_dir>/eval/<step>/` (file names: ModelDir).

    metrics.csv     one row per (subject, class): dice, jaccard, assd_mm, hd95_mm, surface_dice,
                    reference_mm3, predicted_mm3, empty_reference, empty_prediction
    summary.json    per class mean/std/median of each metric, `mean_dice` over foreground classes,
                    counts of empty-mask cases (scoring.summarize), the step and subject count
    overlays/       <subject>.png: image, reference and prediction contours on three slices
    predictions/    <subject>.nii.gz with the affine of the case's original files (evaluation.save_predictions)

Everything is on the grid of each case's original files: predictions made on the model grid are
mapped back first (runner.py), and scored against the original label file. The folder is written
atomically (medseg_dl.atomic): it appears complete or not at all.
"""
import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from medseg_dl import atomic
from medseg_dl.config.params import Params
from medseg_dl.data.io import write_nifti
from medseg_dl.evaluation import scoring
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.viz import plotting

COLUMNS = ["subject", "class", "class_name", *scoring.METRICS, "empty_reference", "empty_prediction",
           "distance_penalised"]

@dataclass(frozen=True, eq=False)
class Segmentation:
    """One segmented case on the grid it is scored on (its original files' grid): subject_id; image
    (X, Y, Z, C) float32 for the pictures; reference and prediction (X, Y, Z) int label maps;
    spacing_mm (3,) float64; affine (4, 4) float64 voxel -> RAS mm (saved with the prediction)."""

    subject_id: str
    image: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray
    spacing_mm: np.ndarray
    affine: np.ndarray


def score_results(results: Sequence[Segmentation], params: Params) -> List[Dict]:
    """metrics.csv rows of segmented cases."""
    rows = []
    names = params.data.class_names
    for result in results:
        for row in scoring.score_case(result.reference, result.prediction, params.data.num_classes,
                                      result.spacing_mm, params.evaluation.surface_tolerance_mm):
            rows.append({"subject": result.subject_id, "class_name": names[row["class"]], **row})
    return rows


def write_report(report_dir: str, results: Sequence[Segmentation], params: Params, step: Optional[int],
                 writer: Optional[tf.summary.SummaryWriter] = None, extra: Optional[Dict] = None) -> Dict:
    """Write the report folder for `results`; returns the summary dict (with the per-case rows under
    "per_case", as nnU-Net's summary.json, and the items of `extra`). With a TensorBoard `writer`, also
    log the summary's scalars and the first case's middle slice at `step`."""
    rows = score_results(results, params)
    summary = {"step": step, "subjects": len(results), **scoring.summarize(rows, params.data.class_names),
               **(extra or {}), "per_case": rows}
    with atomic.disk_full_reported(report_dir, "this report", "evaluate again (the report is written whole or not at "
                                   "all)"), atomic.replacing(report_dir) as folder:
        os.makedirs(folder)
        _write_csv(os.path.join(folder, ModelDir.REPORT_METRICS), rows)
        with open(os.path.join(folder, ModelDir.REPORT_SUMMARY), "w") as f:
            json.dump(summary, f, indent=1, default=float)
        _write_pictures(folder, results, params)
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
    for result in results:
        if evaluation.save_overlays:
            path = os.path.join(folder, ModelDir.REPORT_OVERLAYS, f"{result.subject_id}.png")
            plotting.orthogonal_overlay(result.image, path, reference=result.reference, prediction=result.prediction,
                                        class_names=params.data.class_names, spacing_mm=result.spacing_mm,
                                        title=result.subject_id)
        if evaluation.save_predictions:
            os.makedirs(os.path.join(folder, ModelDir.REPORT_PREDICTIONS), exist_ok=True)
            write_nifti(os.path.join(folder, ModelDir.REPORT_PREDICTIONS, f"{result.subject_id}.nii.gz"),
                        result.prediction.astype(np.uint8), result.affine)


def _write_summaries(writer, step, summary, results, params):
    with writer.as_default(step=step):
        tf.summary.scalar("mean_dice", summary["mean_dice"])
        for name, stats in summary["classes"].items():
            for metric in ("dice", "assd_mm", "hd95_mm"):
                tf.summary.scalar(f"{metric}/{name}", stats[metric]["mean"])
        if results:
            first = results[0]
            middle = first.image.shape[2] // 2
            k = max(params.data.num_classes - 1, 1)
            panels = np.stack([plotting.display_scaled(first.image[:, :, middle, 0]),
                               first.reference[:, :, middle] / k, first.prediction[:, :, middle] / k])
            tf.summary.image("image_reference_prediction", panels[..., None].astype(np.float32), max_outputs=3)
    writer.flush()
