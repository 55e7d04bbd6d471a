"""The evaluation process: `medseg evaluate --params <model_dir>/params.yaml` / `python evaluate.py`.

Watch mode (default) polls the checkpoints training has finished writing every
`evaluation.poll_seconds`, evaluates each new one once on the validation list (whole volumes by
sliding window, metrics with voxel spacing), keeps the best `evaluation.keep_best` in
`<model_dir>/best/`, and stops once training's done marker names a step at least the current
`training.steps` of the folder's params.yaml (re-read at every poll, so an extended run is followed)
and that step is evaluated, or after `--timeout` seconds without news. It may be started before,
during or after training, and killed and restarted at will: it holds the folder's eval lock,
removes what a killed evaluator left (staging copies, partial reports), remembers evaluated steps in
`<model_dir>/eval/history.json` (an unreadable or vanished checkpoint is skipped with a warning and
remembered as skipped), and writes each `eval/<step>/` report atomically, reading, segmenting, scoring and
writing one validation case at a time (evaluate.py: memory does not grow with their number). Pause it with
`kill -STOP <pid>` / `kill -CONT`, or by creating the file `<model_dir>/eval/PAUSE`.

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
from typing import Callable, Dict, List, Optional

from medseg_dl.config.params import Params
from medseg_dl.errors import CheckpointError, MedsegError
from medseg_dl.evaluation.cases import EvaluationCases, folder_cases, split_cases
from medseg_dl.evaluation.evaluate import evaluate
from medseg_dl.evaluation.runner import ChildProcessRunner, InProcessRunner
from medseg_dl.experiment.checkpoints import (BestCheckpoints, CheckpointGone, checkpoint_step, completed_checkpoints,
                                              remove_checkpoint, stage_checkpoint)
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.trained import load_trained, resolve_checkpoint
from medseg_dl.runtime import atomic
from medseg_dl.runtime.devices import configure_devices, restrict_devices, uses_gpu
from medseg_dl.runtime.locks import ProcessLock


class Evaluator:
    """Evaluates the checkpoints of one model folder with `runner(staged_prefix, step) -> summary`, each
    step once (eval/history.json), keeping the best in best/."""

    def __init__(self, params: Params, model_dir: ModelDir, runner: Callable[[str, int], Dict], staging: str):
        self.params, self.model_dir, self.runner, self.staging = params, model_dir, runner, staging
        self.history = json.load(open(model_dir.history)) if os.path.isfile(model_dir.history) else {}
        self.best = BestCheckpoints(model_dir.best, model_dir.best_index, params.evaluation.keep_best,
                                    params.evaluation.metric)

    def evaluate(self, prefix: str) -> Optional[Dict]:
        """Evaluate one checkpoint; returns its summary, or None when it vanished or cannot be read."""
        step = checkpoint_step(prefix)
        try:
            staged = stage_checkpoint(prefix, self.staging)
        except CheckpointGone:
            return self._skip(step, f"checkpoint {prefix} was removed before it could be read")
        metric = self.params.evaluation.metric
        try:
            summary = self.runner(staged, step)
            self.best.offer(staged, step, summary.get(metric, math.nan))
        except CheckpointError as err:
            return self._skip(step, f"{err}")
        finally:
            remove_checkpoint(staged)
        self._remember(step, summary)
        print(f"step {step}: {metric} {summary.get(metric, math.nan):.4f}", flush=True)
        return summary

    def pending(self) -> List[str]:
        """Checkpoints of training not evaluated yet, oldest first."""
        return [p for p in completed_checkpoints(self.model_dir.checkpoints)
                if str(checkpoint_step(p)) not in self.history]

    def _skip(self, step, reason):
        print(f"warning: {reason}; skipped", flush=True)
        self._remember(step, None)
        return None

    def _remember(self, step, summary):
        self.history[str(step)] = {"mean_dice": None if summary is None else summary["mean_dice"],
                                   "skipped": summary is None}
        atomic.write_json(self.model_dir.history, self.history)


def watch(evaluator: Evaluator, poll_seconds: float, timeout_s: Optional[float] = None) -> Optional[int]:
    """Evaluate checkpoints as they appear until training's final step is done (returned), or until
    `timeout_s` without a new checkpoint (None)."""
    last_news = time.time()
    target = evaluator.params.training.steps
    while True:
        if os.path.exists(evaluator.model_dir.pause_file):
            time.sleep(poll_seconds)
            continue
        pending = evaluator.pending()
        for prefix in pending:
            evaluator.evaluate(prefix)
            last_news = time.time()
        target = _target_steps(evaluator.model_dir, target)
        final = final_step(evaluator.model_dir)
        if final is not None and final >= target and str(final) in evaluator.history:
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


def _target_steps(model_dir, previous):
    """training.steps of the folder's params.yaml now (a resume may have extended it); `previous` when
    the file cannot be read at this moment (a hand edit in progress)."""
    try:
        return Params.load(model_dir.params_path).training.steps
    except MedsegError:
        return previous


def score_checkpoint(params: Params, model_dir: ModelDir, cases: EvaluationCases, tag: str,
                     checkpoint: str = "latest") -> Dict:
    """Score one checkpoint (latest, best or a path) on `cases` into eval/<step>-<tag>/; the history and the best
    checkpoints are not changed. Returns the summary."""
    trained = load_trained(model_dir, checkpoint, params)
    summary = evaluate(Predictor.from_params(trained.network, params), cases, model_dir.report_dir(trained.step, tag),
                       params, trained.step, f"step {trained.step} on {tag}")
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
                   timeout_s: Optional[float] = None, split: str = "val") -> Optional[Dict]:
    """`medseg evaluate`: watch the checkpoints (default), or evaluate one (`once`; with `data_dir`,
    on that folder; with split "test", on the held-out test list, report eval/<step>-test/). Returns
    the summary of the one evaluated checkpoint, None in watch mode. A full disk while writing the
    staging copies, reports, history or best checkpoints is a `DiskFullError` naming eval/. Devices are
    configured first (evaluation.device; this process keeps off the GPUs when a child evaluates each checkpoint)."""
    in_children = not (data_dir or split == "test") and _in_child_processes(params)
    if in_children:
        restrict_devices("cpu", None, "evaluation.device")
    else:
        configure_devices(params.evaluation, "evaluation")
    with atomic.disk_full_reported(model_dir.eval_root, "the evaluation's files (staging copies, reports, history, "
                                   "best checkpoints)", "restart the evaluation: what is not in eval/history.json "
                                   "is evaluated again"):
        if data_dir or split == "test":
            if data_dir:
                return evaluate_folder(params, model_dir, data_dir, layout, checkpoint)
            cases = split_cases(params, model_dir, "test", params.evaluation.poll_seconds, timeout_s)
            return score_checkpoint(params, model_dir, cases, "test", checkpoint)
        return _watch_or_once(params, model_dir, once, checkpoint, timeout_s, in_children)


def _watch_or_once(params, model_dir, once, checkpoint, timeout_s, in_children):
    with ProcessLock(model_dir.eval_lock, "evaluator"):
        _remove_leftovers(model_dir)
        cases = split_cases(params, model_dir, "val", params.evaluation.poll_seconds, timeout_s)
        staging = tempfile.mkdtemp(prefix=ModelDir.STAGING_PREFIX, dir=model_dir.eval_root)
        runner = _make_runner(params, model_dir, cases, staging, in_children)
        try:
            evaluator = Evaluator(params, model_dir, runner, staging)
            if once:
                return evaluator.evaluate(resolve_checkpoint(model_dir, checkpoint))
            watch(evaluator, params.evaluation.poll_seconds, timeout_s)
            return None
        finally:
            runner.close()
            shutil.rmtree(staging, ignore_errors=True)


def _in_child_processes(params):
    """Whether each checkpoint is evaluated in a child process (evaluation.checkpoint_process; auto: when a
    GPU would be used, since TensorFlow never hands GPU memory back while a process lives)."""
    mode = params.evaluation.checkpoint_process
    return mode == "always" or (mode == "auto" and uses_gpu(params.evaluation.device))


def _make_runner(params, model_dir, cases, staging, in_children):
    """In this process, or one child process per checkpoint (`_in_child_processes`; it reads the cases itself)."""
    if in_children:
        staged_params = os.path.join(staging, ModelDir.PARAMS_NAME)
        params.save(staged_params)
        return ChildProcessRunner(staged_params)
    return InProcessRunner(params, model_dir, cases)


def _remove_leftovers(model_dir):
    """What a killed evaluator left: its staging copies and partial reports (we hold the eval lock)."""
    for folder in model_dir.staging_folders():
        shutil.rmtree(folder, ignore_errors=True)
    atomic.remove_stale_temporaries(model_dir.eval_root)
    atomic.remove_stale_temporaries(model_dir.best)
