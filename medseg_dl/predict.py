"""`medseg predict`: segment unlabelled images with a trained model.

Each input goes through the model's own preprocessing (reorientation, resampling, normalisation
with the statistics stored in `dataset.json`), is segmented by sliding window, and the class
probabilities are mapped back (trilinearly) onto the input's original voxel grid before the
arg-max, so the saved label map has exactly the input's shape, affine and header.
"""
import os

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg_dl.data.convert import conversion_settings, prepare_image, read_image
from medseg_dl.data.io import write_nifti
from medseg_dl.data.subjects import Subject, folder_channels, is_volume_path, match_one, strip_suffix
from medseg_dl.data.tfrecords import read_index
from medseg_dl.errors import DataError


def input_subjects(paths, data_params):
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


def to_original_grid(probabilities, grid_affine, original_shape, original_affine):
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


def predict_subject(segment, subject, params, ct_stats):
    """(labels (X, Y, Z) uint8 on the subject's original grid, its affine (4, 4))."""
    settings = conversion_settings(params)
    image, mask, affine = read_image(subject, settings)
    image_grid, _, grid_affine = prepare_image(image, mask, affine, settings, ct_stats, subject.id)
    probabilities = segment(image_grid)
    return to_original_grid(probabilities, grid_affine, image.shape[:3], affine), affine


def save_like(path, labels, reference_path, affine):
    """Save labels with the reference's affine and, for NIfTI references, its header."""
    header = None
    if reference_path.endswith((".nii", ".nii.gz")):
        header = nib.load(reference_path).header.copy()
        header.set_data_shape(labels.shape)
        header.set_slope_inter(1, 0)
    write_nifti(path, labels, affine, header)


def run_predict(params, segment, inputs, output_dir):
    """Predict every input with `segment` (image -> probabilities, evaluation.segmenter); returns the
    written paths."""
    ct_stats = read_index(params.data.tfrecords_dir).get("ct_stats") \
        if params.preprocessing.normalization == "ct" else None
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for subject in input_subjects(inputs, params.data):
        labels, affine = predict_subject(segment, subject, params, ct_stats)
        path = os.path.join(output_dir, f"{subject.id}.nii.gz")
        save_like(path, labels, subject.channels[0], affine)
        written.append(path)
        print(f"{subject.id}: {path}", flush=True)
    return written
