"""One subject -> one preprocessed `Case`: the only path from raw files to what the model sees.

Conversion (`medseg convert`), evaluation of another labelled folder (`medseg evaluate --data`) and
prediction (`medseg predict`) all call `subject_case`: read and check the channels (and mask and
label), reorient (preprocessing.reorient_ras), resample (preprocessing.target_spacing_mm; order 3
for images, nearest for labels) and normalise (preprocessing.normalization). The validation split,
already converted, comes back as `Case`s from its records (`case_from_volume`).
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

from medseg_dl.config.params import Params
from medseg_dl.data import preprocess
from medseg_dl.data.index import read_index
from medseg_dl.data.io import read_volume, spacing_from_affine
from medseg_dl.data.subjects import Subject
from medseg_dl.errors import DataError


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: the largest normalised intensity a stored case holds


@dataclass(frozen=True, eq=False)
class Case:
    """One subject on the model grid, with the geometry of its source files.

    image (X, Y, Z, C) float32, normalised and rounded to float16 (the precision of the stored cases, so that
    training, evaluation and prediction see the same values); label (X, Y, Z) uint8 in [0, num_classes) (or the ignore label), or None
    for an unlabelled subject; affine (4, 4) float64 voxel -> RAS mm of the model grid; original_shape (3,)
    and original_affine (4, 4) float64 of the source grid (before reorientation and resampling).
    """

    subject_id: str
    image: np.ndarray
    label: Optional[np.ndarray]
    affine: np.ndarray
    original_shape: Tuple[int, int, int]
    original_affine: np.ndarray

    @property
    def spacing_mm(self) -> np.ndarray:
        """(3,) float64 voxel size of the model grid in mm."""
        return spacing_from_affine(self.affine)


@dataclass(frozen=True)
class CaseRecipe:
    """How a subject becomes a case: the channel and class counts it must have, the `preprocessing`
    params section as a plain dict, for normalization "ct" the dataset statistics (one dict per
    channel: low, high, mean, std; see preprocess.ct_statistics), and the label value a label map may
    hold beside its classes (data.ignore_label)."""

    num_channels: int
    num_classes: int
    preprocessing: dict
    ct_stats: Optional[list] = None
    ignore_label: Optional[int] = None


def recipe_from_params(params: Params, ct_stats: Optional[list] = None) -> CaseRecipe:
    """The `CaseRecipe` of an experiment's params, with the given CT statistics."""
    return CaseRecipe(len(params.data.channels), params.data.num_classes, params.preprocessing.to_dict(), ct_stats,
                      params.data.ignore_label)


def stored_recipe(params: Params) -> CaseRecipe:
    """The recipe of a converted experiment: for normalization "ct", with the statistics stored in
    its `dataset.json` at conversion, so new subjects are normalised exactly like the training data."""
    ct_stats = read_index(params.data.converted_dir).get("ct_stats") if uses(params.preprocessing, "ct") else None
    return recipe_from_params(params, ct_stats)


def uses(preprocessing, method: str) -> bool:
    """Whether `preprocessing.normalization` applies `method` to any channel."""
    return method in preprocess.channel_methods(preprocessing["normalization"], 1)


def read_image(subject: Subject, recipe: CaseRecipe) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """Read and check the channels (and mask) of one subject, one file at a time. Returns (image (X, Y, Z, C)
    float32, mask (X, Y, Z) bool or None, affine (4, 4) float64). Raises `DataError` naming the file."""
    image, tolerance = None, recipe.preprocessing["affine_tolerance"]
    for path in subject.channels:
        volume = read_volume(path)
        check_volume_dims(volume.data.shape, path)
        preprocess.check_finite(volume.data, path)
        if image is None:
            shape, affine = volume.data.shape, volume.affine
            image = np.empty(shape[:3] + (0,), np.float32)
        preprocess.check_same_grid(shape, affine, volume.data.shape, volume.affine, path, subject.channels[0],
                                   tolerance)
        image = _appended(image, volume.data[..., None] if volume.data.ndim == 3 else volume.data)
        del volume
    if image.shape[-1] != recipe.num_channels:
        raise DataError(f"{subject.channels[0]}: subject '{subject.id}' has {image.shape[-1]} channels but "
                        f"data.channels lists {recipe.num_channels}; every subject needs the same channels")
    mask = None
    if subject.mask:
        mask_volume = read_volume(subject.mask)
        preprocess.check_same_grid(shape, affine, mask_volume.data.shape, mask_volume.affine, subject.mask,
                                   subject.channels[0], tolerance)
        mask = mask_volume.data > 0.5
    return image, mask, affine


def _appended(image: np.ndarray, data: np.ndarray) -> np.ndarray:
    """(X, Y, Z, C + c) float32: `image` (X, Y, Z, C) float32 with `data` (X, Y, Z, c) of any type after it; the
    usual single file is converted into float32 without an intermediate copy."""
    if image.shape[-1] == 0:
        return data.astype(np.float32, copy=data.dtype != np.float32)
    out = np.empty(image.shape[:3] + (image.shape[-1] + data.shape[-1],), np.float32)
    out[..., :image.shape[-1]] = image
    out[..., image.shape[-1]:] = data
    return out


def check_volume_dims(shape: Sequence[int], path: str) -> None:
    """Raise `DataError` naming `path` unless a channel file's `shape` is (X, Y, Z) or (X, Y, Z, C)."""
    if len(shape) not in (3, 4):
        raise DataError(f"{path}: image of shape {tuple(shape)}; medseg_dl segments 3D volumes, give an "
                        f"(X, Y, Z) file per channel or one (X, Y, Z, C) file")


def label_map(data: np.ndarray, path: str) -> np.ndarray:
    """The label `data` (X, Y, Z) as is; an (X, Y, Z, 1) map loses its last axis; more axes raise `DataError`
    naming `path` (fewer are left to the grid check against the image)."""
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise DataError(f"{path}: label map of shape {data.shape}; a label map must be (X, Y, Z) integer "
                        f"classes, one class index per voxel; save it as a 3D volume")
    return data


def read_label(subject: Subject, image_shape: Sequence[int], affine: np.ndarray, recipe: CaseRecipe) -> np.ndarray:
    """The subject's label map (X, Y, Z) uint8, checked against the image grid and the class range."""
    label_volume = read_volume(subject.label)
    data = label_map(np.asarray(label_volume.data), subject.label)
    preprocess.check_same_grid(image_shape, affine, data.shape, label_volume.affine, subject.label,
                               subject.channels[0], recipe.preprocessing["affine_tolerance"])
    return preprocess.to_labels(data, recipe.num_classes, subject.label, recipe.ignore_label)


def to_model_grid(array: np.ndarray, affine: np.ndarray, preprocessing: dict,
                  order: int) -> Tuple[np.ndarray, np.ndarray]:
    """Reorient (reorient_ras) and resample (target_spacing_mm) one array (X, Y, Z[, C]) with spline
    `order`; returns (array, affine (4, 4)) on the grid the model sees."""
    if preprocessing["reorient_ras"]:
        array, affine = preprocess.reorient_to_ras(array, affine)
    if preprocessing["target_spacing_mm"]:
        array, affine = preprocess.resample(array, affine, preprocessing["target_spacing_mm"], order)
    return array, affine


def prepare_image(image: np.ndarray, mask: Optional[np.ndarray], affine: np.ndarray, recipe: CaseRecipe,
                  subject_id: str) -> Tuple[np.ndarray, np.ndarray]:
    """Image (X, Y, Z, C) on the model grid as it is stored (preprocess.normalize: ct channels in whole HU), rounded
    to float16 (float32 values), and its affine (4, 4). `DataError` when a value is beyond float16's range
    (possible with normalization none). Works in place where it can: `image` may be changed."""
    prep = recipe.preprocessing
    if uses(prep, "zscore_mask") and mask is None:
        raise DataError(f"subject '{subject_id}': preprocessing.normalization is zscore_mask but it has no "
                        f"mask; set data.mask_pattern or use zscore")
    image_grid, grid_affine = to_model_grid(image, affine, prep, order=3)
    mask_grid = to_model_grid(mask.view(np.uint8), affine, prep, 0)[0] > 0 if mask is not None else None
    normalised = preprocess.normalize(image_grid, prep["normalization"], mask_grid)
    largest = max(float(normalised.max(initial=0.0)), -float(normalised.min(initial=0.0)))
    if largest > FLOAT16_MAX:
        raise DataError(f"subject '{subject_id}': normalised intensities reach {largest:g}, beyond the {FLOAT16_MAX:g} "
                        f"that the stored float16 holds; use preprocessing.normalization zscore or ct")
    for s in preprocess.slabs(normalised.shape):
        normalised[s] = normalised[s].astype(np.float16)
    return normalised, grid_affine


def stored_case(subject: Subject, recipe: CaseRecipe) -> Case:
    """Read, check, reorient, resample and normalise one subject (its label too, when it has one) as a converted
    case stores it: ct channels in whole HU (`subject_case` applies the dataset statistics). Memory: the source
    file, the float32 image and the uint8 label, plus the resampled copies when resampling."""
    image, mask, affine = read_image(subject, recipe)
    label = read_label(subject, image.shape, affine, recipe) if subject.label else None
    original_shape = tuple(int(n) for n in image.shape[:3])
    image_grid, grid_affine = prepare_image(image, mask, affine, recipe, subject.id)
    del image
    label_grid = None if label is None else to_model_grid(label, affine, recipe.preprocessing, order=0)[0]
    return Case(subject.id, image_grid, label_grid, grid_affine, original_shape, affine)


def subject_case(subject: Subject, recipe: CaseRecipe) -> Case:
    """One subject as the network sees it: `stored_case` with the CT statistics applied (preprocess.apply_ct),
    exactly as the pipelines apply them to a converted case (pipeline/inputs.py `read_case`)."""
    case = stored_case(subject, recipe)
    vectors = preprocess.ct_vectors(recipe.preprocessing["normalization"], recipe.ct_stats, recipe.num_channels)
    return dataclasses.replace(case, image=preprocess.apply_ct(case.image, vectors))


def case_from_volume(volume: Mapping[str, Any]) -> Case:
    """The `Case` of one converted case read back (a dict of tensors or arrays: pipeline/inputs.py
    `volume_inputs`)."""
    value = {k: np.asarray(v) for k, v in volume.items()}
    return Case(value["subject"].item().decode(), value["image"], value["label"].astype(np.uint8),
                value["affine"].astype(np.float64), tuple(int(n) for n in value["original_shape"]),
                value["original_affine"].astype(np.float64))
