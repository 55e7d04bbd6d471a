"""`medseg predict`: segment unlabelled images with a trained model.

Each input goes through the model's own preprocessing (reorientation, resampling, normalisation
with the statistics stored in `dataset.json`), is segmented by sliding window, and the class
probabilities are mapped back (trilinearly) onto the input's original voxel grid before the
arg-max, so the saved label map has exactly the input's shape, affine and header.
"""
import os
from typing import List, Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg_dl.config.params import Params
from medseg_dl.data.cases import stored_recipe, subject_case
from medseg_dl.data.io import write_nifti
from medseg_dl.data.subjects import Subject, folder_channels, is_volume_path, match_one, strip_suffix
from medseg_dl.devices import configure_devices
from medseg_dl.errors import DataError
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.trained import load_trained


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
    """Labels (X, Y, Z) uint8 on the original grid from probabilities (x, y, z, K) on the model grid:
    each original voxel's position is mapped into the model grid and the probabilities are
    interpolated there (order 1) before the arg-max."""
    if tuple(original_shape) == probabilities.shape[:3] and np.allclose(grid_affine, original_affine):
        return np.argmax(probabilities, axis=-1).astype(np.uint8)
    to_grid = np.linalg.inv(grid_affine) @ original_affine
    resampled = np.stack([ndimage.affine_transform(probabilities[..., k], to_grid[:3, :3], to_grid[:3, 3],
                                                   output_shape=tuple(original_shape), order=1, mode="nearest")
                          for k in range(probabilities.shape[-1])], axis=-1)
    return np.argmax(resampled, axis=-1).astype(np.uint8)


def save_like(path: str, labels: np.ndarray, reference_path: str, affine: np.ndarray) -> None:
    """Save labels with the reference's affine and, for NIfTI references, its header."""
    header = None
    if reference_path.endswith((".nii", ".nii.gz")):
        header = nib.load(reference_path).header.copy()
        header.set_data_shape(labels.shape)
        header.set_slope_inter(1, 0)
    write_nifti(path, labels, affine, header)


def run_prediction(model_dir_path: str, checkpoint: str, inputs: List[str], output_dir: str,
                   overrides: Sequence[str] = ()) -> List[str]:
    """`medseg predict`: segment every input with the model folder's network at `checkpoint` (best,
    latest or a path) and save `<output_dir>/<subject>.nii.gz` on each input's own grid; returns the
    written paths. overrides: `section.key=value` applied to the folder's params (e.g. evaluation.*).
    An `output_dir` that is a file is a `DataError`, raised before any work."""
    if os.path.isfile(output_dir):
        raise DataError(f"{output_dir}: the output is a file; give a folder for the label maps")
    model_dir = ModelDir(os.path.abspath(model_dir_path))
    params = Params.load(model_dir.params_path, overrides)
    configure_devices(params.evaluation, "evaluation")
    trained = load_trained(model_dir, checkpoint, params)
    predictor = Predictor.from_params(trained.network, params)
    recipe = stored_recipe(params)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for subject in input_subjects(inputs, params.data):
        case = subject_case(subject, recipe)
        labels = to_original_grid(predictor.probabilities(case.image), case.affine, case.original_shape,
                                  case.original_affine)
        path = os.path.join(output_dir, f"{subject.id}.nii.gz")
        save_like(path, labels, subject.channels[0], case.original_affine)
        written.append(path)
        print(f"{subject.id}: {path}", flush=True)
    return written
