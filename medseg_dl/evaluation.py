"""The evaluation process: `medseg evaluate --params <model_dir>/params.yaml` / `python evaluate.py`.

Watch mode (default) polls `<model_dir>/checkpoints` every `evaluation.poll_seconds`, evaluates each
new checkpoint once on the validation list (whole volumes by sliding window, metrics with voxel
spacing), keeps the best `evaluation.keep_best` in `<model_dir>/best/`, and stops after the
checkpoint named by training's `done.json` (or after `--timeout` seconds without a new checkpoint).
It may be started before, during or after training, and killed and restarted at will: evaluated
steps are remembered in `<model_dir>/eval/history.json`, and each `eval/<step>/` report is built
in a temporary folder and renamed when complete. Pause it with `kill -STOP <pid>` / `kill -CONT`,
or by creating the file `<model_dir>/eval/PAUSE` (removing it resumes).
"""
import json
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

from medseg_dl import checkpoints as ckpt
from medseg_dl.data.convert import conversion_settings, preprocess_subject
from medseg_dl.data.subjects import find_subjects, load_filelist
from medseg_dl.data.tfrecords import read_index, record_paths
from medseg_dl.evaluation_report import write_report
from medseg_dl.inference import Predictor
from medseg_dl.errors import DataError, MedsegError
from medseg_dl.model.model_fn import model_fn
from medseg_dl.pipeline.inputs import volume_inputs


def build_network(params):
    """The network of the params with its variables created (restore targets)."""
    spec = model_fn(params)
    spec.network({"image": tf.zeros((1, *params.sampling.patch_size, len(params.data.channels))),
                  "position": tf.zeros((1, 3))}, training=False)
    return spec.network


def restore(network, prefix):
    """Load the model weights of a training checkpoint (optimizer slots are ignored)."""
    tf.train.Checkpoint(model=network).restore(prefix).expect_partial().assert_existing_objects_matched()


def segmenter(network, params):
    """image (X, Y, Z, C) float32 -> probabilities (X, Y, Z, K) float32 numpy, by sliding window with
    the evaluation settings; one `Predictor`, so its traced function is reused across volumes."""
    predictor = Predictor.from_params(network, params)
    return lambda image: np.asarray(predictor.probabilities(image))


def evaluate_cases(segment, cases):
    """Segment each case dict (image, label, spacing_mm, affine, subject); returns a list of
    (case, prediction (X, Y, Z) int32) pairs, for `write_report`."""
    return [(case, np.argmax(segment(case["image"]), axis=-1).astype(np.int32)) for case in cases]


class Evaluator:
    """Evaluates checkpoints of one model folder on `cases`, remembering what it did. With a `tag`
    (another data folder) reports go to eval/<step>-<tag>/ and neither history nor best-K change."""

    def __init__(self, params, model_dir, cases, tag=None):
        self.params, self.model_dir, self.cases, self.tag = params, model_dir, cases, tag
        self.network = build_network(params)
        self.segment = segmenter(self.network, params)
        self.history_path = model_dir.path("eval", "history.json")
        self.history = json.load(open(self.history_path)) if os.path.isfile(self.history_path) else {}
        self.best = ckpt.BestCheckpoints(model_dir.best, params.evaluation.keep_best, params.evaluation.metric)
        self.writer = tf.summary.create_file_writer(model_dir.logs("eval"))
        self.staging = tempfile.mkdtemp(prefix="staging-", dir=model_dir.path("eval"))

    def evaluate(self, prefix):
        """Evaluate one checkpoint; returns its summary, or None if it vanished before it was read."""
        step = ckpt.checkpoint_step(prefix)
        try:
            staged = ckpt.stage_checkpoint(prefix, self.staging)
        except ckpt.CheckpointGone:
            print(f"warning: checkpoint {prefix} was removed before it could be read; skipped", flush=True)
            self._remember(step, None)
            return None
        try:
            restore(self.network, staged)
            results = evaluate_cases(self.segment, self.cases)
            report_dir = self.model_dir.eval_dir(step if self.tag is None else f"{step}-{self.tag}")
            summary = write_report(report_dir, results, self.params, step, self.writer if self.tag is None else None)
            value = summary.get(self.params.evaluation.metric, float("nan"))
            if self.tag is None:
                self.best.offer(staged, step, value)
        finally:
            ckpt.remove_checkpoint(staged)
        if self.tag is None:
            self._remember(step, summary)
        print(f"step {step}: {self.params.evaluation.metric} {value:.4f}", flush=True)
        return summary

    def pending(self):
        """Checkpoints of training not evaluated yet, oldest first."""
        return [p for p in ckpt.list_checkpoints(self.model_dir.checkpoints)
                if str(ckpt.checkpoint_step(p)) not in self.history]

    def _remember(self, step, summary):
        self.history[str(step)] = {"mean_dice": None if summary is None else summary["mean_dice"],
                                   "skipped": summary is None}
        with open(self.history_path + ".tmp", "w") as f:
            json.dump(self.history, f, indent=1)
        os.replace(self.history_path + ".tmp", self.history_path)

    def close(self):
        shutil.rmtree(self.staging, ignore_errors=True)
        self.writer.flush()


def watch(evaluator, poll_seconds, timeout_s=None):
    """Evaluate checkpoints as they appear until training's final step is done (or a timeout)."""
    last_news = time.time()
    pause_file = evaluator.model_dir.path("eval", "PAUSE")
    while True:
        if os.path.exists(pause_file):
            time.sleep(poll_seconds)
            continue
        pending = evaluator.pending()
        for prefix in pending:
            evaluator.evaluate(prefix)
            last_news = time.time()
        final_step = _final_step(evaluator.model_dir)
        if final_step is not None and str(final_step) in evaluator.history:
            return final_step
        if timeout_s is not None and time.time() - last_news > timeout_s:
            print(f"no new checkpoint for {timeout_s:.0f} s; stopping", flush=True)
            return None
        if not pending:
            time.sleep(poll_seconds)


def _final_step(model_dir):
    if not os.path.isfile(model_dir.done_marker):
        return None
    with open(model_dir.done_marker) as f:
        return json.load(f)["step"]


def resolve_checkpoint(model_dir, which):
    """The checkpoint prefix for `--checkpoint latest|best|PATH`."""
    if which == "best":
        prefix = ckpt.BestCheckpoints(model_dir.best, 1, "").best_prefix()
    elif which == "latest":
        found = ckpt.list_checkpoints(model_dir.checkpoints)
        prefix = found[-1] if found else None
    else:
        prefix = which[: -len(".index")] if which.endswith(".index") else which
        prefix = prefix if os.path.isfile(prefix + ".index") else None
    if prefix is None:
        raise MedsegError(f"{model_dir.root}: no '{which}' checkpoint found; train first, or give the path of a "
                          f"checkpoint prefix (…/ckpt-<step>)")
    return prefix


def _numpy_case(volume):
    return {"subject": volume["subject"].numpy().decode(), "image": volume["image"].numpy(),
            "label": volume["label"].numpy(), "spacing_mm": volume["spacing_mm"].numpy().astype(np.float64),
            "affine": volume["affine"].numpy()}


def split_cases(params, model_dir, poll_seconds, split="val"):
    """The decoded subjects of a split (default: validation); waits while training still converts them."""
    ids = load_filelist(model_dir.filelists, split)
    if not ids:
        raise MedsegError(f"{model_dir.filelists}/{split}.json is empty; set data.split.{split} > 0 or give "
                          f"explicit lists, or evaluate another folder with --data DIR")
    while True:
        try:
            files = record_paths(params.data.tfrecords_dir, ids)
            break
        except DataError:
            print("waiting for the validation subjects to be converted (medseg train converts them)", flush=True)
            time.sleep(max(poll_seconds, 1.0))
    return [_numpy_case(v) for v in volume_inputs(params, files)]


def folder_cases(params, data_dir, layout=None):
    """Cases of any labelled folder, preprocessed like the model's own data (stored statistics)."""
    overrides = {"source_dir": os.path.abspath(data_dir), "layout": layout or params.data.layout}
    data_params = {**params.data.to_dict(), **overrides}
    settings = conversion_settings(params)
    ct_stats = read_index(params.data.tfrecords_dir).get("ct_stats") \
        if params.preprocessing.normalization == "ct" else None
    return [preprocess_subject(s, settings, ct_stats) for s in find_subjects(data_params)]
