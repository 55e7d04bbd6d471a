"""`medseg evaluate --cv`: every fold's validation cases segmented by that fold's own model, one report.

Each case of the experiment is in exactly one fold's validation list, so the union is a prediction
of every non-test case by a model that never saw it (nnU-Net's cross-validation). The report, on
the original grid of every case, goes to `<root>/cv/raw/` (metrics.csv, summary.json with the
per-case rows and the checkpoint of each fold); the post-processing that raises its mean Dice is
decided on these predictions (postprocessing.py), stored in `<root>/postprocessing.json` (applied by
predict and export from then on), and the report after it goes to `<root>/cv/postprocessed/`.

`medseg evaluate --cv --split test` scores the held-out test cases (the same for every fold) with the
ensemble of all folds (mean softmax, inference/trained.py `load_ensemble`), as predict and export
segment: `<root>/cv/test-ensemble/raw/`, and `<root>/cv/test-ensemble/postprocessed/` with the stored
decision applied.
"""
import dataclasses
import os
from typing import Dict, List, Tuple

from medseg_dl import atomic
from medseg_dl.config.params import Params
from medseg_dl.data.cases import stored_recipe
from medseg_dl.evaluation import postprocessing
from medseg_dl.evaluation.report import Segmentation, write_report
from medseg_dl.evaluation.runner import record_cases, segment_cases, split_records, split_subjects_of
from medseg_dl.experiment.model_dir import ModelDir, experiment_root, fold_model_dirs
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference import postprocess
from medseg_dl.inference.trained import load_ensemble, load_trained


def _fold_checkpoint(fold_dir: ModelDir, checkpoint: str) -> str:
    """`checkpoint`, or latest when it is best and the fold has no best checkpoint yet."""
    return checkpoint if checkpoint != "best" or os.path.isfile(fold_dir.best_index) else "latest"


def fold_predictions(fold_dir: ModelDir, checkpoint: str) -> Tuple[List[Segmentation], int]:
    """The validation cases of one fold segmented by its model at `checkpoint` (best, else latest when
    the fold has no best checkpoint yet), and that checkpoint's step."""
    params = Params.load(fold_dir.params_path)
    trained = load_trained(fold_dir, _fold_checkpoint(fold_dir, checkpoint), params)
    cases = record_cases(params, split_records(params, fold_dir, "val", params.evaluation.poll_seconds))
    results = segment_cases(Predictor.from_params(trained.network, params), cases, split_subjects_of(fold_dir, "val"),
                            stored_recipe(params))
    print(f"{fold_dir.root}: {len(results)} validation cases at step {trained.step}", flush=True)
    return results, trained.step


def run_cross_validation(params: Params, checkpoint: str = "best") -> Dict:
    """Evaluate every fold on its validation cases, decide the post-processing on them; returns
    {"raw": summary, "postprocessed": summary, "postprocessing": decision}."""
    root = experiment_root(params)
    results, steps = [], {}
    for fold, fold_dir in enumerate(fold_model_dirs(params)):
        fold_results, steps[f"fold_{fold}"] = fold_predictions(fold_dir, checkpoint)
        results += fold_results
    os.makedirs(root.cv, exist_ok=True)
    raw = write_report(root.cv_report("raw"), results, params, step=None, extra={"checkpoints": steps})
    decision = postprocessing.decide([(r.reference, r.prediction, r.spacing_mm) for r in results],
                                     params.data.num_classes)
    atomic.write_json(root.postprocessing_json, decision)
    processed = [dataclasses.replace(r, prediction=postprocess.apply(r.prediction, decision, r.spacing_mm))
                 for r in results]
    after = write_report(root.cv_report("postprocessed"), processed, params, step=None,
                         extra={"checkpoints": steps, "postprocessing": decision})
    print(f"cross-validation over {len(results)} cases: mean Dice {raw['mean_dice']:.4f}, after post-processing "
          f"{after['mean_dice']:.4f} ({root.postprocessing_json})", flush=True)
    return {"raw": raw, "postprocessed": after, "postprocessing": decision}


def run_ensemble_test(params: Params, checkpoint: str = "best") -> Dict:
    """Score the test cases with the ensemble of every fold (each at `checkpoint`, best falling back to
    latest), raw and with the experiment's post-processing decision (none when `evaluate --cv` has not
    decided one); returns {"raw": summary, "postprocessed": summary, "postprocessing": decision or None}."""
    root, folds = experiment_root(params), fold_model_dirs(params)
    ensemble = load_ensemble([f.root for f in folds], [_fold_checkpoint(f, checkpoint) for f in folds])
    first = ensemble.params
    cases = record_cases(first, split_records(first, folds[0], "test", first.evaluation.poll_seconds))
    results = segment_cases(Predictor.from_params(ensemble.networks, first), cases,
                            split_subjects_of(folds[0], "test"), stored_recipe(first))
    steps = {f"fold_{k}": m.step for k, m in enumerate(ensemble.members)}
    report = os.path.join(root.cv, "test-ensemble")
    raw = write_report(os.path.join(report, "raw"), results, first, step=None, extra={"checkpoints": steps})
    decision = postprocess.read_decision(root.root)
    processed = [dataclasses.replace(r, prediction=postprocess.apply(r.prediction, decision or postprocess.NOTHING,
                                                                     r.spacing_mm)) for r in results]
    after = write_report(os.path.join(report, "postprocessed"), processed, first, step=None,
                         extra={"checkpoints": steps, "postprocessing": decision})
    print(f"ensemble of {len(folds)} folds on {len(results)} test cases: mean Dice {raw['mean_dice']:.4f}, after "
          f"post-processing {after['mean_dice']:.4f}", flush=True)
    return {"raw": raw, "postprocessed": after, "postprocessing": decision}
