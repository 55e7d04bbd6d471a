"""The report of one evaluation: `<model_dir>/eval/<step>/` (file names: model_dir.py `Report`), written one case
at a time.

    metrics.csv     one row per (subject, structure: a foreground class, or a region): class (its number
                    from 1), class_name, dice, jaccard, assd_mm, hd95_mm, surface_dice, reference_mm3,
                    predicted_mm3, empty_reference, empty_prediction, distance_penalised
    summary.json    per structure mean/std/median of each metric, `mean_dice` over the structures, counts
                    of empty-mask cases (scoring.summarize), the step and subject count, and the per-case
                    rows (as nnU-Net's summary.json)
    overlays/       <subject>.png: image, reference and prediction contours on three slices (the voxels of
                    the ignore label shown as background)
    predictions/    <subject>.nii.gz with the affine of the case's original files (evaluation.save_predictions)

`write_report` consumes its segmentations one at a time: each is scored, its rows appended to metrics.csv,
its overlay and prediction written, and it is dropped before the next is asked for; the summary is then
computed from the rows read back from metrics.csv, so memory holds one case whatever their number.
Everything is on the grid of each case's original files (evaluate.py maps predictions back and reads the
original label files). The folder is written atomically (medseg_dl.runtime.atomic): it appears complete or not at
all, so a killed evaluation leaves nothing to count twice.
"""
import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.data.io import write_volume
from medseg_dl.data.targets import Targets
from medseg_dl.evaluation import scoring
from medseg_dl.experiment.model_dir import Report
from medseg_dl.runtime import atomic
from medseg_dl.viz import plotting

COLUMNS = ["subject", "class", "class_name", *scoring.METRICS, "empty_reference", "empty_prediction",
           "distance_penalised"]
FLAGS = ("empty_reference", "empty_prediction", "distance_penalised")


@dataclass(frozen=True, eq=False)
class Segmentation:
    """One segmented case on the grid it is scored on (its original files' grid): subject_id; image
    (X, Y, Z, C) float32 for the pictures; reference and prediction (X, Y, Z) int label maps (the prediction
    painted with regions; only the reference may hold the ignore label);
    spacing_mm (3,) float64; affine (4, 4) float64 voxel -> RAS mm (saved with the prediction)."""

    subject_id: str
    image: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray
    spacing_mm: np.ndarray
    affine: np.ndarray


def write_report(report_dir: str, segmentations: Iterable[Segmentation], params: Params, step: Optional[int],
                 writer: Optional[tf.summary.SummaryWriter] = None, extra: Optional[Dict] = None) -> Dict:
    """Write the report folder of `segmentations` (any iterable, consumed once, one at a time); returns the
    summary dict (the rows of metrics.csv under "per_case", and the items of `extra`). With a TensorBoard
    `writer`, also log the summary's scalars and the first case's middle slice at `step`. The structures scored
    and the ignore label are those of `Targets.from_params(params.data)`."""
    with atomic.disk_full_reported(report_dir, "this report", "evaluate again (the report is written whole or not at "
                                   "all)"), atomic.replacing(report_dir) as folder:
        os.makedirs(folder)
        cases, panels = _write_cases(folder, segmentations, params, Targets.from_params(params.data))
        report = Report(folder)
        rows = read_rows(report.metrics_csv)
        summary = {"step": step, "subjects": cases, **scoring.summarize(rows),
                   **(extra or {}), "per_case": rows}
        with open(report.summary_json, "w") as f:
            json.dump(summary, f, indent=1, default=float)
    if writer is not None:
        _write_summaries(writer, step, summary, panels)
    return summary


def _write_cases(folder: str, segmentations: Iterable[Segmentation], params: Params,
                 targets: Targets) -> Tuple[int, Optional[np.ndarray]]:
    """Score and write each segmentation (metrics.csv rows, overlay, prediction), holding none once the next is
    asked for; returns (the number of cases, the TensorBoard panels of the first: `_panels`)."""
    metrics = Report(folder).metrics_csv
    _write_csv(metrics, [])
    cases, panels = 0, None
    for segmentation in segmentations:
        _write_csv(metrics, case_rows(segmentation, targets, params.evaluation.surface_tolerance_mm))
        _write_pictures(folder, segmentation, params, targets)
        panels = _panels(segmentation, targets) if panels is None else panels
        cases += 1
        del segmentation  # freed before the next case is made
    return cases, panels


def case_rows(segmentation: Segmentation, targets: Targets, tolerance_mm: float) -> List[Dict]:
    """The metrics.csv rows of one segmented case: scoring.score_case of each structure of `targets` (surface Dice
    at `tolerance_mm`), with the subject."""
    return [{"subject": segmentation.subject_id, **row}
            for row in scoring.score_case(segmentation.reference, segmentation.prediction, targets,
                                          segmentation.spacing_mm, tolerance_mm)]


def read_rows(path: str) -> List[Dict]:
    """The rows of a metrics.csv with their values typed as `case_rows` gives them (class int, metrics float,
    flags bool), keys in the order of `COLUMNS`; floats come back exactly (the file holds their repr)."""
    with open(path, newline="") as f:
        return [{key: _typed(key, row[key]) for key in COLUMNS} for row in csv.DictReader(f)]


def _typed(key: str, text: str):
    if key in FLAGS:
        return text == "True"
    if key == "class":
        return int(text)
    return text if key in ("subject", "class_name") else float(text)


def _write_csv(path: str, rows: List[Dict]) -> None:
    """Append `rows` to the CSV file `path`; a new file gets the header first."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        out = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        if new:
            out.writeheader()
        out.writerows(rows)


def _write_pictures(folder: str, segmentation: Segmentation, params: Params, targets: Targets) -> None:
    evaluation, report = params.evaluation, Report(folder)
    if evaluation.save_overlays:
        path = report.overlay(segmentation.subject_id)
        plotting.orthogonal_overlay(segmentation.image, path, reference=_shown(segmentation.reference, targets),
                                    prediction=segmentation.prediction, class_names=targets.class_names,
                                    spacing_mm=segmentation.spacing_mm, title=segmentation.subject_id)
    if evaluation.save_predictions:
        os.makedirs(report.predictions, exist_ok=True)
        write_volume(report.prediction(segmentation.subject_id),
                     segmentation.prediction.astype(np.uint8), segmentation.affine)


def _panels(segmentation: Segmentation, targets: Targets) -> np.ndarray:
    """(3, X, Y, 1) float32 in [0, 1]: the middle axial slice of the image (display-scaled), of the reference and
    of the prediction (label / (num_classes - 1), the ignore label as 0): all the TensorBoard image keeps of a
    case."""
    middle = segmentation.image.shape[2] // 2
    k = max(targets.num_classes - 1, 1)
    reference = _shown(segmentation.reference[:, :, middle], targets)
    panels = np.stack([plotting.display_scaled(segmentation.image[:, :, middle, 0]),
                       reference / k, segmentation.prediction[:, :, middle] / k])
    return panels[..., None].astype(np.float32)


def _shown(reference: np.ndarray, targets: Targets) -> np.ndarray:
    """The reference (any shape, int) as the pictures show it: its voxels of the ignore label as background (a
    copy where there is an ignore label)."""
    if targets.ignore_label is None:
        return reference
    return np.where(reference == targets.ignore_label, 0, reference)


def _write_summaries(writer, step, summary, panels):
    with writer.as_default(step=step):
        tf.summary.scalar("mean_dice", summary["mean_dice"])
        for name, stats in summary["classes"].items():
            for metric in ("dice", "assd_mm", "hd95_mm"):
                tf.summary.scalar(f"{metric}/{name}", stats[metric]["mean"])
        if panels is not None:
            tf.summary.image("image_reference_prediction", panels, max_outputs=3)
    writer.flush()
