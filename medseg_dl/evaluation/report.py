"""The report of one evaluated checkpoint: `<model_dir>/eval/<step>/` (file names: ModelDir).

    metrics.csv     one row per (subject, class): dice, jaccard, assd_mm, hd95_mm, surface_dice,
                    reference_mm3, predicted_mm3, empty_reference, empty_prediction
    summary.json    per class mean/std/median of each metric, `mean_dice` over foreground classes,
                    counts of empty-mask cases (scoring.summarize), the step and subject count
    overlays/       <subject>.png: image, reference and prediction contours on three slices
    predictions/    <subject>.nii.gz with the case's affine (evaluation.save_predictions)

The folder is written atomically (medseg_dl.atomic): it appears complete or not at all.
"""
import csv
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from medseg_dl import atomic
from medseg_dl.config.params import Params
from medseg_dl.data.cases import Case
from medseg_dl.data.io import write_nifti
from medseg_dl.evaluation import scoring
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.viz import plotting

COLUMNS = ["subject", "class", "class_name", *scoring.METRICS, "empty_reference", "empty_prediction"]

Result = Tuple[Case, np.ndarray]  # a labelled case and its predicted label map (X, Y, Z) int32


def score_results(results: Sequence[Result], params: Params) -> List[Dict]:
    """metrics.csv rows for (case, prediction) pairs."""
    rows = []
    names = params.data.class_names
    for case, prediction in results:
        for row in scoring.score_case(case.label, prediction, params.data.num_classes, case.spacing_mm,
                                      params.evaluation.surface_tolerance_mm):
            rows.append({"subject": case.subject_id, "class_name": names[row["class"]], **row})
    return rows


def write_report(report_dir: str, results: Sequence[Result], params: Params, step: int,
                 writer: Optional[tf.summary.SummaryWriter] = None) -> Dict:
    """Write the report folder for `results`; returns the summary dict. With a TensorBoard `writer`,
    also log the summary's scalars and the first case's middle slice at `step`."""
    rows = score_results(results, params)
    summary = {"step": step, "subjects": len(results), **scoring.summarize(rows, params.data.class_names)}
    with atomic.replacing(report_dir) as folder:
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
    for case, prediction in results:
        if evaluation.save_overlays:
            path = os.path.join(folder, ModelDir.REPORT_OVERLAYS, f"{case.subject_id}.png")
            plotting.orthogonal_overlay(case.image, path, reference=case.label, prediction=prediction,
                                        class_names=params.data.class_names, spacing_mm=case.spacing_mm,
                                        title=case.subject_id)
        if evaluation.save_predictions:
            os.makedirs(os.path.join(folder, ModelDir.REPORT_PREDICTIONS), exist_ok=True)
            write_nifti(os.path.join(folder, ModelDir.REPORT_PREDICTIONS, f"{case.subject_id}.nii.gz"),
                        prediction.astype(np.uint8), case.affine)


def _write_summaries(writer, step, summary, results, params):
    with writer.as_default(step=step):
        tf.summary.scalar("mean_dice", summary["mean_dice"])
        for name, stats in summary["classes"].items():
            for metric in ("dice", "assd_mm", "hd95_mm"):
                tf.summary.scalar(f"{metric}/{name}", stats[metric]["mean"])
        if results:
            case, prediction = results[0]
            middle = case.image.shape[2] // 2
            k = max(params.data.num_classes - 1, 1)
            panels = np.stack([plotting.display_scaled(case.image[:, :, middle, 0]),
                               case.label[:, :, middle] / k, prediction[:, :, middle] / k])
            tf.summary.image("image_reference_prediction", panels[..., None].astype(np.float32), max_outputs=3)
    writer.flush()
