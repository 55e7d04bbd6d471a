"""`medseg evaluate --cv`: every fold's validation cases segmented by that fold's own model, one report.

Each case of the experiment is in exactly one fold's validation list, so the union is a prediction
of every non-test case by a model that never saw it (nnU-Net's cross-validation). Each fold is scored
with its final (latest) checkpoint by default, chosen without its validation cases; its best checkpoint
was chosen on them by the evaluator, so scoring it is optimistic (allowed, and said so in the report).
The report, on the original grid of every case, goes to `<root>/cv/raw/` (metrics.csv, summary.json
with the per-case rows, the checkpoint of each fold and how it was chosen, and always predictions/); the
post-processing that raises its mean Dice is decided on these saved predictions (postprocessing.py), stored
in `<root>/postprocessing.json` (applied by predict and export from then on), and the report of the saved
predictions after it goes to `<root>/cv/postprocessed/`. Every report is written by evaluate.py one case at a
time: the folds' models one after the other, the cases and saved predictions read again when needed.

`medseg evaluate --cv --split test` scores the held-out test cases (the same for every fold) with the
ensemble of all folds (mean softmax, inference/trained.py `load_ensemble`), as predict and export
segment: `<root>/cv/test-ensemble/raw/` (with its predictions/), and `<root>/cv/test-ensemble/postprocessed/`
with the stored decision applied to them.
"""
import copy
import itertools
import os
from dataclasses import dataclass
from typing import Dict, Iterator

from medseg_dl.config.params import Params
from medseg_dl.data.targets import Targets
from medseg_dl.evaluation import postprocessing
from medseg_dl.evaluation.cases import EvaluationCases, split_cases
from medseg_dl.evaluation.evaluate import SavedPredictions, evaluate, segmentations
from medseg_dl.evaluation.report import Segmentation, write_report
from medseg_dl.experiment.checkpoints import checkpoint_step
from medseg_dl.experiment.experiment import Experiment, fold_model_dirs, fold_name
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.inference import postprocess
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.progress import Progress
from medseg_dl.inference.trained import load_ensemble, load_trained, resolve_checkpoint
from medseg_dl.runtime import atomic
from medseg_dl.runtime.devices import configure_devices

CHECKPOINT_CHOICES = {"latest": "the final (latest) checkpoint of each fold: chosen without its validation "
                                "cases", "auto": "the best checkpoint where an evaluator kept one, else the "
                                "latest: the best was chosen on these validation cases (optimistic)",
                      "best": "the best checkpoint of each fold: chosen on these validation cases (optimistic)"}


@dataclass(frozen=True)
class Fold:
    """One fold: its model folder and params, the checkpoint prefix it is scored with, its validation cases."""

    model_dir: ModelDir
    params: Params
    prefix: str
    cases: EvaluationCases


def fold_of(fold_dir: ModelDir, checkpoint: str) -> Fold:
    """The fold of `fold_dir` at `checkpoint` (trained.py `resolve_checkpoint`); a warning when its training is
    not done. Nothing is loaded yet."""
    params = Params.load(fold_dir.params_path)
    prefix = resolve_checkpoint(fold_dir, checkpoint)
    if not os.path.isfile(fold_dir.done_marker):
        print(f"warning: {fold_dir.root} has not finished training: its step {checkpoint_step(prefix)} is scored, "
              f"not the final step {params.training.steps}", flush=True)
    return Fold(fold_dir, params, prefix, split_cases(params, fold_dir, "val", params.evaluation.poll_seconds))


def fold_segmentations(fold: Fold, number: int) -> Iterator[Segmentation]:
    """The validation cases of one fold segmented by its model, loaded when the first case is asked for."""
    trained = load_trained(fold.model_dir, fold.prefix, fold.params)
    predictor = Predictor.from_params(trained.network, fold.params)
    yield from segmentations(predictor, fold.cases, Progress(f"cv fold {number}", len(fold.cases)))
    print(f"{fold.model_dir.root}: {len(fold.cases)} validation cases at step {trained.step}", flush=True)


def run_cross_validation(params: Params, checkpoint: str = "latest") -> Dict:
    """Evaluate every fold on its validation cases with its checkpoint `checkpoint` (latest: the final one,
    chosen without those cases; best or auto select on them, which is optimistic and reported so), decide
    the post-processing on the saved predictions; returns {"raw": summary, "postprocessed": summary,
    "postprocessing": decision}. The summaries record the checkpoint of each fold and how it was chosen."""
    configure_devices(params.evaluation, "evaluation")
    experiment = Experiment.of(params)
    folds = [fold_of(fold_dir, checkpoint) for fold_dir in fold_model_dirs(params)]
    choice = CHECKPOINT_CHOICES.get(checkpoint, f"the checkpoint {checkpoint}")
    if checkpoint != "latest":
        print(f"warning: cross-validation with {choice}", flush=True)
    extra = {"checkpoints": {fold_name(k): checkpoint_step(f.prefix) for k, f in enumerate(folds)},
             "checkpoint_choice": choice}
    reports = experiment.cv_reports
    os.makedirs(experiment.cv, exist_ok=True)
    raw = write_report(reports.raw, itertools.chain.from_iterable(
        fold_segmentations(fold, k) for k, fold in enumerate(folds)), saving_predictions(params), None, extra=extra)
    targets = Targets.from_params(params.data)
    saved = SavedPredictions([fold.cases for fold in folds], reports.raw, targets)
    decision = postprocessing.decide(saved, targets)
    atomic.write_json(experiment.decision_path, decision)
    after = write_report(reports.postprocessed, saved.segmentations(
        decision, Progress("cv post-processed", len(saved))), params, None, extra={**extra, "postprocessing": decision})
    print(f"cross-validation over {raw['subjects']} cases: mean Dice {raw['mean_dice']:.4f}, after post-processing "
          f"{after['mean_dice']:.4f} ({experiment.decision_path})", flush=True)
    return {"raw": raw, "postprocessed": after, "postprocessing": decision}


def run_ensemble_test(params: Params, checkpoint: str = "auto") -> Dict:
    """Score the test cases with the ensemble of every fold (each at `checkpoint`; auto: its best where kept,
    else latest, as predict and export choose), raw and with the experiment's post-processing decision (none
    when `evaluate --cv` has not decided one) applied to the saved raw predictions; returns {"raw": summary,
    "postprocessed": summary, "postprocessing": decision or None}."""
    configure_devices(params.evaluation, "evaluation")
    experiment, folds = Experiment.of(params), fold_model_dirs(params)
    ensemble = load_ensemble(folds, checkpoint)
    first = ensemble.params
    cases = split_cases(first, folds[0], "test", first.evaluation.poll_seconds)
    steps = {fold_name(k): m.step for k, m in enumerate(ensemble.members)}
    reports = experiment.test_ensemble_reports
    raw = evaluate(Predictor.from_params(ensemble.networks, first), cases, reports.raw,
                   saving_predictions(first), None, "test ensemble", extra={"checkpoints": steps})
    decision = postprocess.read_decision(experiment.decision_path)
    saved = SavedPredictions([cases], reports.raw, Targets.from_params(first.data))
    after = write_report(reports.postprocessed, saved.segmentations(
        decision, Progress("test ensemble post-processed", len(saved))), first, None,
        extra={"checkpoints": steps, "postprocessing": decision})
    print(f"ensemble of {len(folds)} folds on {raw['subjects']} test cases: mean Dice {raw['mean_dice']:.4f}, after "
          f"post-processing {after['mean_dice']:.4f}", flush=True)
    return {"raw": raw, "postprocessed": after, "postprocessing": decision}


def saving_predictions(params: Params) -> Params:
    """A copy of `params` whose reports save their predictions (the raw reports the post-processing reads)."""
    saving = copy.deepcopy(params)
    saving.evaluation.save_predictions = True
    return saving

