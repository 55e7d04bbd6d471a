"""The labelled cases one evaluation reads, one at a time: `EvaluationCases`.

    split_cases(params, model_dir, split, poll_seconds)   the converted cases of a split's file list (waits while
                                                         training still converts them)
    folder_cases(params, data_dir, layout)                the subjects of any labelled folder (`evaluate --data`),
                                                         preprocessed like the model's own data

Iterating reads each case when it is asked for and keeps nothing, so an evaluation holds one case whatever
their number; it may be iterated again (every checkpoint reads its cases again).
"""
import functools
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.data.cases import Case, CaseRecipe, case_from_volume, read_image, read_label, stored_recipe, subject_case
from medseg_dl.data.index import case_paths
from medseg_dl.data.subjects import Subject, find_subjects
from medseg_dl.errors import DataError, MedsegError
from medseg_dl.experiment.filelists import filelist_subjects
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.inference.original_grid import same_grid
from medseg_dl.pipeline.inputs import case_entries, intensity_vectors, read_case


@dataclass(frozen=True)
class EvaluationCases:
    """Labelled cases in order, each read from disk when iteration reaches it.

    subjects: the source files of the cases by id, in order; recipe: how those files are read (data/cases.py);
    read: () -> an iterator of their `Case`s on the model grid (image (X, Y, Z, C) float32, label (X, Y, Z) uint8),
    in the order of `subjects`, each read when it is asked for, none held once the next is asked for.
    """

    subjects: Mapping[str, Subject]
    recipe: CaseRecipe
    read: Callable[[], Iterator[Case]]

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[Case]:
        return self.read()

    def original_grid(self, case: Case) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image (X, Y, Z, C) float32, reference (X, Y, Z) uint8, affine (4, 4) float64) of `case` on the grid of
        its source files, where it is scored: its own arrays when the model grid is that grid, else the original
        image and label files of its subject, read again."""
        if same_grid(case.image.shape[:3], case.affine, case.original_shape, case.original_affine):
            return case.image, case.label, case.affine
        subject = self.subjects[case.subject_id]
        image, _, affine = read_image(subject, self.recipe)
        return image, read_label(subject, image.shape, affine, self.recipe), affine


def split_cases(params: Params, model_dir: ModelDir, split: str, poll_seconds: float,
                timeout_s: Optional[float] = None) -> EvaluationCases:
    """The converted cases of a split's file list; waits while training still converts them (at most `timeout_s`)."""
    subjects = filelist_subjects(model_dir, split)
    if not subjects:
        raise MedsegError(f"{model_dir.filelist(split)} is empty; set data.split.{split} > 0 or give "
                          f"explicit lists, or evaluate another folder with --data DIR")
    paths = _converted_paths(params, [s.id for s in subjects], split, poll_seconds, timeout_s)
    return EvaluationCases({s.id: s for s in subjects}, stored_recipe(params),
                           functools.partial(_converted_cases, params, paths))


def folder_cases(params: Params, data_dir: str, layout: Optional[str] = None) -> EvaluationCases:
    """The subjects of any labelled folder, preprocessed like the model's own data (its stored statistics)."""
    data_params = {**params.data.to_dict(), "source_dir": os.path.abspath(data_dir),
                   "layout": layout or params.data.layout}
    recipe = stored_recipe(params)
    subjects = find_subjects(data_params)
    return EvaluationCases({s.id: s for s in subjects}, recipe,
                           lambda: map(functools.partial(subject_case, recipe=recipe), subjects))


def _converted_cases(params: Params, paths: Sequence[str]) -> Iterator[Case]:
    """The converted case folders `paths`, read as the metrics pipeline reads them (pipeline.inputs.read_case in
    tf.data), each only when it is asked for (`one_at_a_time`)."""
    vectors = intensity_vectors(params)
    volumes = case_entries(params, paths, "evaluation").map(lambda entry: read_case(entry, params, vectors))
    return map(case_from_volume, volumes.with_options(one_at_a_time()))


def one_at_a_time() -> tf.data.Options:
    """tf.data options under which a pipeline reads nothing ahead: no parallel map, no prefetch (tf.data adds
    both by default)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.map_parallelization = False
    options.experimental_optimization.inject_prefetch = False
    return options


def _converted_paths(params: Params, subject_ids: Sequence[str], split: str, poll_seconds: float,
                     timeout_s: Optional[float]) -> Sequence[str]:
    """The case folders of the subjects of a split, once all are converted (at most `timeout_s` of waiting)."""
    started = time.time()
    while True:
        try:
            return case_paths(params.data.converted_dir, subject_ids)
        except DataError:
            if timeout_s is not None and time.time() - started > timeout_s:
                raise MedsegError(f"{params.data.converted_dir}: the {split} subjects are still not converted after "
                                  f"{timeout_s:.0f} s; start `medseg train` (it converts them) or `medseg convert`, "
                                  f"then evaluate again") from None
            print(f"waiting for the {split} subjects to be converted (medseg train converts them)", flush=True)
            time.sleep(max(poll_seconds, 1.0))
