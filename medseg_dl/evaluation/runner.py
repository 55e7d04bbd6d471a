"""Evaluating one checkpoint: restore its weights, segment the cases, write the report.

Two runners with one call, `runner(staged_prefix, step) -> summary`:
- `InProcessRunner` builds the network and loads the cases once and reuses them (the CPU default);
- `ChildProcessRunner` evaluates each checkpoint in a new process (`python -m
  medseg_dl.evaluation.runner PARAMS PREFIX STEP`), so that nothing stays in GPU memory between
  checkpoints: TensorFlow never hands GPU memory back while a process lives (the default when the
  evaluator uses a GPU; evaluation.checkpoint_process).
An unreadable checkpoint raises `CheckpointError` from both; the evaluator skips it.
"""
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.data.cases import Case, CaseRecipe, case_from_volume, read_image, read_label, stored_recipe, subject_case
from medseg_dl.data.io import spacing_from_affine
from medseg_dl.data.subjects import Subject, find_subjects
from medseg_dl.devices import configure_devices
from medseg_dl.errors import CheckpointError, DataError, MedsegError
from medseg_dl.evaluation.report import Segmentation, write_report
from medseg_dl.experiment.model_dir import ModelDir, filelist_subjects, read_filelist, split_case_paths
from medseg_dl.inference.predict import segment_case
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.trained import inference_network, restore_weights
from medseg_dl.pipeline.inputs import volume_inputs

UNREADABLE_EXIT = 3  # the child's exit code for an unreadable checkpoint
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def segment_cases(predictor: Predictor, cases: Sequence[Case], subjects: Dict[str, Subject],
                  recipe: CaseRecipe) -> List[Segmentation]:
    """Each case segmented on the model grid and scored on its original grid: when reorientation or
    resampling changed the grid, the probabilities are mapped back (as `medseg predict` does) and the
    reference is the original label file of `subjects[case.subject_id]`; otherwise both grids are one."""
    results = []
    for case in cases:
        if case.label.shape == tuple(case.original_shape) and np.allclose(case.affine, case.original_affine):
            results.append(Segmentation(case.subject_id, case.image, case.label, predictor.labels(case.image),
                                        case.spacing_mm, case.affine))
            continue
        subject = subjects[case.subject_id]
        prediction = segment_case(predictor, case)
        image, _, affine = read_image(subject, recipe)
        results.append(Segmentation(case.subject_id, image, read_label(subject, image.shape, affine, recipe),
                                    prediction, spacing_from_affine(affine), affine))
    return results


def split_subjects_of(model_dir: ModelDir, split: str) -> Dict[str, Subject]:
    """The subjects (with their source files) of a split's file list, by id."""
    return {subject.id: subject for subject in filelist_subjects(model_dir, split)}


def split_cases(params: Params, model_dir: ModelDir, split: str, poll_seconds: float,
                  timeout_s: Optional[float] = None) -> List[str]:
    """The case folders of a split; waits while training still converts them (at most `timeout_s`)."""
    if not read_filelist(model_dir, split):
        raise MedsegError(f"{model_dir.filelist(split)} is empty; set data.split.{split} > 0 or give "
                          f"explicit lists, or evaluate another folder with --data DIR")
    started = time.time()
    while True:
        try:
            return split_case_paths(params, model_dir, split)
        except DataError:
            if timeout_s is not None and time.time() - started > timeout_s:
                raise MedsegError(f"{params.data.converted_dir}: the {split} subjects are still not converted after "
                                  f"{timeout_s:.0f} s; start `medseg train` (it converts them) or `medseg convert`, "
                                  f"then evaluate again") from None
            print(f"waiting for the {split} subjects to be converted (medseg train converts them)", flush=True)
            time.sleep(max(poll_seconds, 1.0))


def converted_cases(params: Params, cases: Sequence[str]) -> List[Case]:
    """The `Case`s of converted case folders."""
    return [case_from_volume(volume) for volume in volume_inputs(params, cases)]


def folder_cases(params: Params, data_dir: str, layout: Optional[str] = None) -> Tuple[List[Case], Dict[str, Subject]]:
    """The cases of any labelled folder, preprocessed like the model's own data (stored statistics),
    and its subjects by id."""
    data_params = {**params.data.to_dict(), "source_dir": os.path.abspath(data_dir),
                   "layout": layout or params.data.layout}
    recipe = stored_recipe(params)
    subjects = find_subjects(data_params)
    return [subject_case(subject, recipe) for subject in subjects], {s.id: s for s in subjects}


class InProcessRunner:
    """Evaluates staged checkpoints in this process on `cases`; the network is built once."""

    def __init__(self, params: Params, model_dir: ModelDir, cases: Sequence[Case], subjects: Dict[str, Subject]):
        self.params, self.model_dir, self.cases, self.subjects = params, model_dir, cases, subjects
        self.recipe = stored_recipe(params)
        self.network = inference_network(params)
        self.predictor = Predictor.from_params(self.network, params)
        self.writer = tf.summary.create_file_writer(model_dir.eval_logs)

    def __call__(self, staged_prefix: str, step: int) -> Dict:
        restore_weights(self.network, staged_prefix)
        results = segment_cases(self.predictor, self.cases, self.subjects, self.recipe)
        return write_report(self.model_dir.report_dir(step), results, self.params, step, self.writer)

    def close(self) -> None:
        self.writer.flush()


class ChildProcessRunner:
    """Evaluates each staged checkpoint in a child process of this interpreter; `params_path` is the
    evaluator's resolved params, saved by the caller (the child reads them, not the folder's)."""

    def __init__(self, params_path: str):
        self.params_path = params_path

    def __call__(self, staged_prefix: str, step: int) -> Dict:
        command = [sys.executable, "-m", "medseg_dl.evaluation.runner", self.params_path, staged_prefix, str(step)]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        lines = done.stdout.strip().splitlines()
        for line in lines[:-1]:  # the child's progress; the last line is its summary
            print(line, flush=True)
        if done.returncode == UNREADABLE_EXIT:
            raise CheckpointError(f"{staged_prefix}: cannot read this checkpoint (see the message above)")
        if done.returncode != 0 or not lines:
            raise MedsegError(f"the evaluation process of checkpoint {step} stopped (exit code {done.returncode}); "
                              f"its message is above")
        return json.loads(lines[-1])

    def close(self) -> None:
        pass


def _die_with_parent():
    """In the child, before it runs: ask Linux to kill it when the evaluator dies (kill -9 included), so
    that no orphan keeps evaluating into the model folder. Elsewhere nothing is done."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str]) -> int:
    """The child: evaluate the staged checkpoint argv[1] at step argv[2] with the params file argv[0];
    prints the summary as the last line of stdout."""
    try:
        params = Params.load(argv[0])
        model_dir = ModelDir(params.experiment.model_dir)
        configure_devices(params.evaluation, "evaluation")
        runner = InProcessRunner(params, model_dir, converted_cases(params, split_case_paths(params, model_dir, "val")),
                                 split_subjects_of(model_dir, "val"))
        summary = runner(argv[1], int(argv[2]))
        runner.close()
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return UNREADABLE_EXIT
    except MedsegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
