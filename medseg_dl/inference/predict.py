"""`medseg predict`: segment unlabelled images with a trained model, or an ensemble of several.

Each input goes through the model's own preprocessing (reorientation, resampling, normalisation
with the statistics stored in `dataset.json`), is segmented by sliding window (one network, or the
mean softmax of the ensemble's members), and the class probabilities are mapped back (trilinearly)
onto the input's original voxel grid before the arg-max, so the saved label map has exactly the
input's shape, affine and header. The post-processing decision of the experiment
(`<model_dir>/postprocessing.json`, inference/postprocess.py) is applied last, as in nnU-Net: to that
final label map on the original grid, with the original voxel spacing (its thresholds are in mm^3).
`--save-probabilities` also writes the mapped-back probabilities (before the arg-max, so before
post-processing).
"""
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg_dl import atomic
from medseg_dl.config.params import Params
from medseg_dl.data.cases import Case, stored_recipe, subject_case
from medseg_dl.data.io import spacing_from_affine, write_nifti
from medseg_dl.data.subjects import Subject, folder_channels, is_volume_path, match_one, strip_suffix
from medseg_dl.devices import configure_devices
from medseg_dl.errors import DataError
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.inference import postprocess
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.trained import TrainedEnsemble, load_ensemble, resolve_members


def input_subjects(paths: List[str], data_params: Mapping) -> List[Subject]:
    """Subjects to predict: volume files (one channel each, or one 4D file with all channels), or
    folders: a subject folder (layout subject_folders) or a folder of volume files."""
    subjects = []
    for path in map(os.path.abspath, paths):
        if not os.path.exists(path):
            raise DataError(f"{path}: input not found; give image files or folders")
        if os.path.isdir(path) and data_params["layout"] == "subject_folders":
            channels = folder_channels(path, data_params["channels"])
            if channels is None:
                raise DataError(f"{path}: no file for each channel pattern {list(data_params['channels'])}")
            mask = match_one(path, data_params["mask_pattern"], "mask") if data_params["mask_pattern"] else None
            subjects.append(Subject(os.path.basename(path), channels, mask=mask))
        elif os.path.isdir(path) and not _is_dicom_folder(path):
            subjects.extend(Subject(strip_suffix(n), [os.path.join(path, n)])
                            for n in sorted(os.listdir(path)) if is_volume_path(os.path.join(path, n)))
        else:
            subjects.append(Subject(strip_suffix(os.path.basename(path)), [path]))
    if not subjects:
        raise DataError(f"{paths}: no images found to predict")
    return subjects


def _is_dicom_folder(path):
    return any(n.lower().endswith(".dcm") for n in os.listdir(path))


def to_original_grid(probabilities: np.ndarray, grid_affine: np.ndarray, original_shape: Sequence[int],
                     original_affine: np.ndarray) -> np.ndarray:
    """Probabilities (X, Y, Z, K) float32 on the original grid (shape `original_shape`, affine
    `original_affine` (4, 4)) from probabilities (x, y, z, K) on the model grid (`grid_affine` (4, 4)):
    each original voxel's position is mapped into the model grid and the probabilities are interpolated
    there (order 1, so they still sum to 1). The input itself when both grids are the same."""
    if tuple(original_shape) == probabilities.shape[:3] and np.allclose(grid_affine, original_affine):
        return probabilities
    to_grid = np.linalg.inv(grid_affine) @ original_affine
    return np.stack([ndimage.affine_transform(probabilities[..., k], to_grid[:3, :3], to_grid[:3, 3],
                                              output_shape=tuple(original_shape), order=1, mode="nearest")
                     for k in range(probabilities.shape[-1])], axis=-1).astype(np.float32, copy=False)


def segment_case(predictor: Predictor, case: Case, decision: Optional[Dict] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Labels (X, Y, Z) uint8 of one case on its original grid: the predictor's probabilities on the model
    grid mapped back (`to_original_grid`; no mapping when both grids are one), their arg-max, then the
    post-processing `decision` (None: none) applied to those labels with the original spacing. progress:
    called with (windows done, windows in total) as the case is segmented."""
    if tuple(case.original_shape) == case.image.shape[:3] and np.allclose(case.affine, case.original_affine):
        labels = predictor.labels(case.image).astype(np.uint8)
    else:
        probabilities = to_original_grid(predictor.probabilities(case.image), case.affine, case.original_shape,
                                         case.original_affine)
        labels = np.argmax(probabilities, axis=-1).astype(np.uint8)
    if decision is not None:
        labels = postprocess.apply(labels, decision, spacing_from_affine(case.original_affine))
    return labels


def save_like(path: str, data: np.ndarray, reference_path: str, affine: np.ndarray) -> None:
    """Save `data` (X, Y, Z) labels or (X, Y, Z, K) probabilities with the reference's affine and, for NIfTI
    references, its header (with the shape and data type of `data`)."""
    header = None
    if reference_path.endswith((".nii", ".nii.gz")):
        header = nib.load(reference_path).header.copy()
        header.set_data_shape(data.shape)
        header.set_slope_inter(1, 0)
    write_nifti(path, data, affine, header)


def load_predictor(model_dirs: Union[str, Sequence[str]], checkpoint: Union[str, Sequence[str]],
                   folds: Union[None, str, Sequence[int]] = None, overrides: Sequence[str] = ()
                   ) -> Tuple[Predictor, TrainedEnsemble, Optional[Dict]]:
    """(the Predictor, the loaded ensemble, the post-processing decision or None) of `--model-dir D [D ...]
    [--folds ...] [--checkpoint ...]` (trained.py `resolve_members`, `load_ensemble`), with the devices of
    the first member's evaluation section; overrides apply to every member's params."""
    folders, decision_dir = resolve_members([model_dirs] if isinstance(model_dirs, str) else model_dirs, folds)
    member_params = [Params.load(ModelDir(f).params_path, overrides) for f in folders]
    configure_devices(member_params[0].evaluation, "evaluation")
    ensemble = load_ensemble(folders, checkpoint, member_params)
    decision = postprocess.read_decision(decision_dir)
    if decision is not None:
        steps = {k: decision[k] for k in postprocess.NOTHING}
        print(f"post-processing ({os.path.join(decision_dir, postprocess.DECISION_NAME)}): {steps}", flush=True)
    return Predictor.from_params(ensemble.networks, ensemble.params), ensemble, decision


def run_prediction(model_dirs: Union[str, Sequence[str]], checkpoint: Union[str, Sequence[str]], inputs: List[str],
                   output_dir: str, overrides: Sequence[str] = (), folds: Union[None, str, Sequence[int]] = None,
                   save_probabilities: bool = False) -> List[str]:
    """`medseg predict`: segment every input with the network of one model folder, or the ensemble of several
    (`model_dirs`) or of the folds of one experiment root (`folds`: "all" or fold numbers; trained.py
    `resolve_members`), each at `checkpoint` (auto, best, latest, or one of these or a path per folder), and save
    `<output_dir>/<subject>.nii.gz` (uint8 labels) on each input's own grid, post-processed by the
    decision of the (root) model folder when it has one; with `save_probabilities` also
    `<subject>_probabilities.nii.gz` (X, Y, Z, K) float32. Returns the written paths. overrides:
    `section.key=value` applied to every folder's params (e.g. evaluation.*); the window and evaluation
    settings are the first member's. An `output_dir` that is a file is a `DataError`, raised before any work."""
    if os.path.isfile(output_dir):
        raise DataError(f"{output_dir}: the output is a file; give a folder for the label maps")
    predictor, ensemble, decision = load_predictor(model_dirs, checkpoint, folds, overrides)
    recipe = stored_recipe(ensemble.params)
    with atomic.disk_full_reported(output_dir, "the label maps", "predict again (each file is written whole or "
                                   "not at all)"):
        return _predict_subjects(predictor, decision, recipe, input_subjects(inputs, ensemble.params.data),
                                 output_dir, save_probabilities)


def _predict_subjects(predictor, decision, recipe, subjects, output_dir, save_probabilities):
    """`run_prediction`'s loop: segment and save each subject; returns the written paths."""
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for subject in subjects:
        case = subject_case(subject, recipe)
        labels = segment_case(predictor, case, decision)
        path = os.path.join(output_dir, f"{subject.id}.nii.gz")
        save_like(path, labels, subject.channels[0], case.original_affine)
        written.append(path)
        if save_probabilities:
            written.append(os.path.join(output_dir, f"{subject.id}_probabilities.nii.gz"))
            probabilities = to_original_grid(predictor.probabilities(case.image), case.affine, case.original_shape,
                                             case.original_affine)
            save_like(written[-1], probabilities, subject.channels[0], case.original_affine)
        print(f"{subject.id}: {path}", flush=True)
    return written
