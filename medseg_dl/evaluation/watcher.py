"""The evaluation process: `medseg evaluate --params <model_dir>/params.yaml` / `python evaluate.py`.

Watch mode (default) polls `<model_dir>/checkpoints` every `evaluation.poll_seconds`, evaluates each
new checkpoint once on the validation list (whole volumes by sliding window, metrics with voxel
spacing), keeps the best `evaluation.keep_best` in `<model_dir>/best/`, and stops after the
checkpoint named by training's `done.json` (or after `--timeout` seconds without a new checkpoint).
It may be started before, during or after training, and killed and restarted at will: evaluated
steps are remembered in `<model_dir>/eval/history.json`, and each `eval/<step>/` report is written
atomically. Pause it with `kill -STOP <pid>` / `kill -CONT`, or by creating the file
`<model_dir>/eval/PAUSE` (removing it resumes).

`--once` evaluates one checkpoint of the validation list the same way; `--data DIR` scores one
checkpoint on another labelled folder (`evaluate_folder`, `score_checkpoint`): report in
`eval/<step>-<folder>/`, history and best checkpoints untouched.
"""
import json
import math
import os
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import tensorflow as tf

from medseg_dl import atomic
from medseg_dl.config.params import Params
from medseg_dl.data.cases import Case, case_from_record, stored_recipe, subject_case
from medseg_dl.data.subjects import find_subjects
from medseg_dl.errors import DataError, MedsegError
from medseg_dl.evaluation.report import Result, write_report
from medseg_dl.experiment.checkpoints import (BestCheckpoints, CheckpointGone, checkpoint_step, list_checkpoints,
                                              remove_checkpoint, stage_checkpoint)
from medseg_dl.experiment.model_dir import ModelDir, read_filelist, split_record_paths
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.trained import inference_network, load_trained, resolve_checkpoint, restore_weights
from medseg_dl.pipeline.inputs import volume_inputs


def predict_cases(predictor: Predictor, cases: Sequence[Case]) -> List[Result]:
    """(case, predicted labels (X, Y, Z) int32) for each case, for `write_report`."""
    return [(case, predictor.labels(case.image)) for case in cases]


class Evaluator:
    """Evaluates the checkpoints of one model folder on its validation `cases`, each step once
    (eval/history.json), keeping the best in best/ and logging to logs/eval."""

    def __init__(self, params: Params, model_dir: ModelDir, cases: Sequence[Case]):
        self.params, self.model_dir, self.cases = params, model_dir, cases
        self.network = inference_network(params)
        self.predictor = Predictor.from_params(self.network, params)
        self.history = json.load(open(model_dir.history)) if os.path.isfile(model_dir.history) else {}
        self.best = BestCheckpoints(model_dir.best, model_dir.best_index, params.evaluation.keep_best,
                                    params.evaluation.metric)
        self.writer = tf.summary.create_file_writer(model_dir.eval_logs)
        self.staging = tempfile.mkdtemp(prefix=ModelDir.STAGING_PREFIX, dir=model_dir.eval_root)

    def evaluate(self, prefix: str) -> Optional[Dict]:
        """Evaluate one checkpoint; returns its summary, or None if it vanished before it was read."""
        step = checkpoint_step(prefix)
        try:
            staged = stage_checkpoint(prefix, self.staging)
        except CheckpointGone:
            print(f"warning: checkpoint {prefix} was removed before it could be read; skipped", flush=True)
            self._remember(step, None)
            return None
        metric = self.params.evaluation.metric
        try:
            restore_weights(self.network, staged)
            summary = write_report(self.model_dir.report_dir(step), predict_cases(self.predictor, self.cases),
                                   self.params, step, self.writer)
            self.best.offer(staged, step, summary.get(metric, math.nan))
        finally:
            remove_checkpoint(staged)
        self._remember(step, summary)
        print(f"step {step}: {metric} {summary.get(metric, math.nan):.4f}", flush=True)
        return summary

    def pending(self) -> List[str]:
        """Checkpoints of training not evaluated yet, oldest first."""
        return [p for p in list_checkpoints(self.model_dir.checkpoints) if str(checkpoint_step(p)) not in self.history]

    def _remember(self, step, summary):
        self.history[str(step)] = {"mean_dice": None if summary is None else summary["mean_dice"],
                                   "skipped": summary is None}
        atomic.write_json(self.model_dir.history, self.history)

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.writer.flush()


def watch(evaluator: Evaluator, poll_seconds: float, timeout_s: Optional[float] = None) -> Optional[int]:
    """Evaluate checkpoints as they appear until training's final step is done (returned), or until
    `timeout_s` without a new checkpoint (None)."""
    last_news = time.time()
    while True:
        if os.path.exists(evaluator.model_dir.pause_file):
            time.sleep(poll_seconds)
            continue
        pending = evaluator.pending()
        for prefix in pending:
            evaluator.evaluate(prefix)
            last_news = time.time()
        final = final_step(evaluator.model_dir)
        if final is not None and str(final) in evaluator.history:
            return final
        if timeout_s is not None and time.time() - last_news > timeout_s:
            print(f"no new checkpoint for {timeout_s:.0f} s; stopping", flush=True)
            return None
        if not pending:
            time.sleep(poll_seconds)


def final_step(model_dir: ModelDir) -> Optional[int]:
    """The step of training's done marker, or None while training has not finished."""
    if not os.path.isfile(model_dir.done_marker):
        return None
    with open(model_dir.done_marker) as f:
        return json.load(f)["step"]


def split_cases(params: Params, model_dir: ModelDir, poll_seconds: float, split: str = "val") -> List[Case]:
    """The converted cases of a split (default: validation); waits while training still converts them."""
    if not read_filelist(model_dir, split):
        raise MedsegError(f"{model_dir.filelist(split)} is empty; set data.split.{split} > 0 or give "
                          f"explicit lists, or evaluate another folder with --data DIR")
    while True:
        try:
            files = split_record_paths(params, model_dir, split)
            break
        except DataError:
            print(f"waiting for the {split} subjects to be converted (medseg train converts them)", flush=True)
            time.sleep(max(poll_seconds, 1.0))
    return [case_from_record(volume) for volume in volume_inputs(params, files)]


def folder_cases(params: Params, data_dir: str, layout: Optional[str] = None) -> List[Case]:
    """The cases of any labelled folder, preprocessed like the model's own data (stored statistics)."""
    data_params = {**params.data.to_dict(), "source_dir": os.path.abspath(data_dir),
                   "layout": layout or params.data.layout}
    recipe = stored_recipe(params)
    return [subject_case(subject, recipe) for subject in find_subjects(data_params)]


def score_checkpoint(params: Params, model_dir: ModelDir, cases: Sequence[Case], tag: str,
                     checkpoint: str = "latest") -> Dict:
    """Score one checkpoint (latest, best or a path) on `cases` into eval/<step>-<tag>/; the history
    and the best checkpoints are not changed. Returns the summary."""
    trained = load_trained(model_dir, checkpoint, params)
    results = predict_cases(Predictor.from_params(trained.network, params), cases)
    summary = write_report(model_dir.report_dir(trained.step, tag), results, params, trained.step)
    metric = params.evaluation.metric
    print(f"step {trained.step} on {tag}: {metric} {summary.get(metric, math.nan):.4f}", flush=True)
    return summary


def evaluate_folder(params: Params, model_dir: ModelDir, data_dir: str, layout: Optional[str] = None,
                    checkpoint: str = "latest") -> Dict:
    """`score_checkpoint` on another labelled folder, tagged with the folder's name."""
    return score_checkpoint(params, model_dir, folder_cases(params, data_dir, layout),
                            os.path.basename(os.path.normpath(data_dir)), checkpoint)


def run_evaluation(params: Params, model_dir: ModelDir, once: bool = False, checkpoint: str = "latest",
                   data_dir: Optional[str] = None, layout: Optional[str] = None,
                   timeout_s: Optional[float] = None) -> Optional[Dict]:
    """`medseg evaluate`: watch the checkpoints (default), or evaluate one (`once`; with `data_dir`,
    on that folder). Returns the summary of the one evaluated checkpoint, None in watch mode."""
    if data_dir:
        return evaluate_folder(params, model_dir, data_dir, layout, checkpoint)
    evaluator = Evaluator(params, model_dir, split_cases(params, model_dir, params.evaluation.poll_seconds))
    try:
        if once:
            return evaluator.evaluate(resolve_checkpoint(model_dir, checkpoint))
        watch(evaluator, params.evaluation.poll_seconds, timeout_s)
        return None
    finally:
        evaluator.close()
