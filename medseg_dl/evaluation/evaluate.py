"""One evaluation: labelled cases + a way to segment them -> a report (report.py), one case at a time.

    evaluate(predictor, cases, report_dir, params, step, what)    the report of a trained predictor
    segmentations(predictor, cases, progress)                     its segmentations as the report consumes them
    SavedPredictions(parts, report_dir, targets)                  the predictions a report saved: iterated, the
                                                                  (reference, prediction, spacing_mm) of each case
                                                                  (postprocessing.decide); `.segmentations(decision)`
                                                                  post-processed, for their report

Each case is read (cases.py), segmented on its original grid (inference.predict.segment_case), put with the
image and reference of that grid, handed to the report, which scores and writes it, and dropped before the
next case is read: the evaluation holds one case, whatever their number. The watcher, `--once`, `--data`,
`--split test` and `--cv` all evaluate through here; progress is shown per case and per window
(inference/progress.py).
"""
import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.data.cases import Case
from medseg_dl.data.io import read_volume, spacing_from_affine
from medseg_dl.data.targets import Targets
from medseg_dl.errors import DataError
from medseg_dl.evaluation.cases import EvaluationCases
from medseg_dl.evaluation.report import Segmentation, write_report
from medseg_dl.experiment.model_dir import Report
from medseg_dl.inference import postprocess
from medseg_dl.inference.predict import segment_case
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.progress import Progress


def evaluate(predictor: Predictor, cases: EvaluationCases, report_dir: str, params: Params, step: Optional[int],
             what: str, writer: Optional[tf.summary.SummaryWriter] = None, extra: Optional[Dict] = None) -> Dict:
    """Segment `cases` with `predictor` and write their report to `report_dir` (report.write_report: with a
    TensorBoard `writer`, its scalars too; the items of `extra` in the summary); returns the summary. Progress is
    printed as `what` (e.g. "step 1200")."""
    return write_report(report_dir, segmentations(predictor, cases, Progress(what, len(cases))), params, step,
                        writer, extra)


def segmentations(predictor: Predictor, cases: EvaluationCases, progress: Progress) -> Iterator[Segmentation]:
    """Each case segmented by `predictor` on its original grid, read when asked for; nothing of a case is held
    here once the next is asked for."""
    for case in cases:
        progress.start_case(case.subject_id)
        segmentation = _on_original_grid(cases, case, segment_case(predictor, case, progress=progress.windows))
        del case  # the model grid's image is not needed while the report writes this case
        yield segmentation
        del segmentation  # written: freed before the next case is read
        progress.end_case()


def saved_segmentations(cases: EvaluationCases, report_dir: str, targets: Targets, decision: Optional[Dict] = None,
                        progress: Optional[Progress] = None) -> Iterator[Segmentation]:
    """Each case with the prediction the report `report_dir` saved (predictions/<subject>.nii.gz, (X, Y, Z) uint8
    on its original grid), post-processed by `decision` (None: as saved; inference.postprocess.apply with that grid's
    spacing and the structures of `targets`), read when asked for and held no longer than `segmentations` holds
    its own."""
    for case in cases:
        if progress is not None:
            progress.start_case(case.subject_id)
        segmentation = _on_original_grid(cases, case, saved_prediction(report_dir, case))
        del case  # as in `segmentations`
        if decision is not None:
            segmentation = dataclasses.replace(segmentation, prediction=postprocess.apply(
                segmentation.prediction, decision, segmentation.spacing_mm, targets))
        yield segmentation
        del segmentation  # freed before the next case is read
        if progress is not None:
            progress.end_case()


def saved_prediction(report_dir: str, case: Case) -> np.ndarray:
    """The prediction (X, Y, Z) uint8 of `case` that the report `report_dir` saved; `DataError` naming the file when
    it is missing or is not on the case's original grid."""
    path = Report(report_dir).prediction(case.subject_id)
    if not os.path.isfile(path):
        raise DataError(f"{path}: the saved prediction of subject '{case.subject_id}' is missing; evaluate again "
                        f"(the report saves every prediction)")
    labels = read_volume(path).data
    if labels.shape != tuple(case.original_shape):
        raise DataError(f"{path}: a prediction of {labels.shape} voxels for a subject of {tuple(case.original_shape)}; "
                        f"it belongs to other data, evaluate again")
    return labels.astype(np.uint8, copy=False)


@dataclass(frozen=True)
class SavedPredictions:
    """The predictions the report `report_dir` saved of the cases of `parts`, read again, one case at a time,
    every time they are asked for. Iterating gives (reference (X, Y, Z) uint8, prediction (X, Y, Z) uint8,
    spacing_mm (3,) float64) per case: the re-iterable cases of postprocessing.decide. targets: the experiment's
    (Targets.from_params(params.data)), whose structures a post-processing decision numbers."""

    parts: Sequence[EvaluationCases]
    report_dir: str
    targets: Targets

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return map(_scored_pair, self.segmentations())

    def segmentations(self, decision: Optional[Dict] = None, progress: Optional[Progress] = None
                      ) -> Iterator[Segmentation]:
        """`saved_segmentations` of every part, in order."""
        for part in self.parts:
            yield from saved_segmentations(part, self.report_dir, self.targets, decision, progress)


def _scored_pair(segmentation: Segmentation) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    return segmentation.reference, segmentation.prediction, segmentation.spacing_mm


def _on_original_grid(cases: EvaluationCases, case: Case, prediction: np.ndarray) -> Segmentation:
    """The case's `prediction` (X, Y, Z) uint8 on its original grid, with that grid's image and reference."""
    image, reference, affine = cases.original_grid(case)
    return Segmentation(case.subject_id, image, reference, prediction, spacing_from_affine(affine), affine)
