"""`medseg evaluate --cv`: every fold's validation cases segmented by that fold's own model, one report.

Each case of the experiment is in exactly one fold's validation list, so the union is a prediction
of every non-test case by a model that never saw it (nnU-Net's cross-validation). Each fold is scored
with its final (latest) checkpoint by default, chosen without its validation cases; its best checkpoint
was chosen on them by the evaluator, so scoring it is optimistic (allowed, and said so in the report).
The report, on the original grid of every case, goes to `<root>/cv/raw/` (metrics.csv, summary.json
with the per-case rows, the checkpoint of each fold and how it was chosen); the post-processing that raises its mean Dice is
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
from medseg_dl.devices import configure_devices
from medseg_dl.evaluation import postprocessing
from medseg_dl.evaluation.report import Segmentation, write_report
from medseg_dl.evaluation.runner import converted_cases, segment_cases, split_cases, split_subjects_of
from medseg_dl.experiment.model_dir import ModelDir, experiment_root, fold_model_dirs
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference import postprocess
from medseg_dl.inference.trained import load_ensemble, load_trained


def fold_predictions(fold_dir: ModelDir, checkpoint: str) -> Tuple[List[Segmentation], int]:
    """The validation cases of one fold segmented by its model at `checkpoint` (trained.py
    `resolve_checkpoint`), and that checkpoint's step; a warning when the fold's training is not done."""
    params = Params.load(fold_dir.params_path)
    trained = load_trained(fold_dir, checkpoint, params)
    if not os.path.isfile(fold_dir.done_marker):
        print(f"warning: {fold_dir.root} has not finished training: its step {trained.step} is scored, not the "
              f"final step {params.training.steps}", flush=True)
    cases = converted_cases(params, split_cases(params, fold_dir, "val", params.evaluation.poll_seconds))
    results = segment_cases(Predictor.from_params(trained.network, params), cases, split_subjects_of(fold_dir, "val"),
                            stored_recipe(params))
    print(f"{fold_dir.root}: {len(results)} validation cases at step {trained.step}", flush=True)
    return results, trained.step


CHECKPOINT_CHOICES = {"latest": "the final (latest) checkpoint of each fold: chosen without its validation "
                                       "cases", "auto": "the best checkpoint where an evaluator kept one, else the "
                                       "latest: the best was chosen on these validation cases (optimistic)",
                             "best": "the best checkpoint of each fold: chosen on these validation cases (optimistic)"}


def run_cross_validation(params: Params, checkpoint: str = "latest") -> Dict:
    """Evaluate every fold on its validation cases with its checkpoint `checkpoint` (latest: the final one,
    chosen without those cases; best or auto select on them, which is optimistic and reported so), decide
    the post-processing on them; returns {"raw": summary, "postprocessed": summary, "postprocessing":
    decision}. The summaries record the checkpoint of each fold and how it was chosen."""
    configure_devices(params.evaluation, "evaluation")
    root = experiment_root(params)
    results, steps = [], {}
    for fold, fold_dir in enumerate(fold_model_dirs(params)):
        fold_results, steps[f"fold_{fold}"] = fold_predictions(fold_dir, checkpoint)
        results += fold_results
    os.makedirs(root.cv, exist_ok=True)
    choice = CHECKPOINT_CHOICES.get(checkpoint, f"the checkpoint {checkpoint}")
    if checkpoint != "latest":
        print(f"warning: cross-validation with {choice}", flush=True)
    raw = write_report(root.cv_report("raw"), results, params, step=None,
                       extra={"checkpoints": steps, "checkpoint_choice": choice})
    decision = postprocessing.decide([(r.reference, r.prediction, r.spacing_mm) for r in results],
                                     params.data.num_classes)
    atomic.write_json(root.postprocessing_json, decision)
    processed = [dataclasses.replace(r, prediction=postprocess.apply(r.prediction, decision, r.spacing_mm))
                 for r in results]
    after = write_report(root.cv_report("postprocessed"), processed, params, step=None,
                         extra={"checkpoints": steps, "checkpoint_choice": choice, "postprocessing": decision})
    print(f"cross-validation over {len(results)} cases: mean Dice {raw['mean_dice']:.4f}, after post-processing "
          f"{after['mean_dice']:.4f} ({root.postprocessing_json})", flush=True)
    return {"raw": raw, "postprocessed": after, "postprocessing": decision}


def run_ensemble_test(params: Params, checkpoint: str = "auto") -> Dict:
    """Score the test cases with the ensemble of every fold (each at `checkpoint`; auto: its best where kept,
    else latest, as predict and export choose), raw and with the experiment's post-processing decision (none
    when `evaluate --cv` has not decided one); returns {"raw": summary, "postprocessed": summary,
    "postprocessing": decision or None}."""
    configure_devices(params.evaluation, "evaluation")
    root, folds = experiment_root(params), fold_model_dirs(params)
    ensemble = load_ensemble([f.root for f in folds], checkpoint)
    first = ensemble.params
    cases = converted_cases(first, split_cases(first, folds[0], "test", first.evaluation.poll_seconds))
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
