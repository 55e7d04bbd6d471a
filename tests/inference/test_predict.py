"""Geometry of `medseg predict`: a subject through `subject_case` onto the model grid and its
probabilities back onto the original grid land on the original voxels exactly; the post-processing
decision is applied to the final label map on the original grid, with the original spacing."""
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import write_nifti
from medseg_dl.data.cases import Case, CaseRecipe, subject_case
from medseg_dl.data.subjects import Subject
from medseg_dl.inference import postprocess
from medseg_dl.inference.predict import segment_case, to_original_grid

# voxel axes (0, 1, 2) along (A, -S, -L) with spacings 2.0, 1.6, 2.4 mm: reorientation permutes and flips
OBLIQUE = np.array([[0.0, 0.0, -2.4, 30.0], [2.0, 0.0, 0.0, -10.0], [0.0, -1.6, 0.0, 5.0], [0.0, 0.0, 0.0, 1.0]])


def recipe(reorient_ras, target_spacing_mm):
    preprocessing = {"reorient_ras": reorient_ras, "target_spacing_mm": target_spacing_mm,
                     "normalization": "none", "affine_tolerance": 1e-3}
    return CaseRecipe(num_channels=1, num_classes=3, preprocessing=preprocessing)


@pytest.mark.parametrize("reorient_ras, target_spacing_mm", [
    (True, None),              # permutation and flips only
    (True, [1.2, 1.0, 0.8]),   # and half the spacing (RAS order): original voxel i is model voxel 2i
    (False, [1.0, 0.8, 1.2]),  # half the spacing in the file's own axes
])
def test_one_hot_of_the_model_grid_label_maps_back_onto_the_original_label_exactly(
        tmp_path, reorient_ras, target_spacing_mm):
    shape = (7, 9, 6)
    label = np.random.default_rng(0).integers(0, 3, size=shape).astype(np.uint8)
    write_nifti(tmp_path / "image.nii.gz", label.astype(np.float32), OBLIQUE)
    write_nifti(tmp_path / "label.nii.gz", label, OBLIQUE)
    subject = Subject("s", [str(tmp_path / "image.nii.gz")], str(tmp_path / "label.nii.gz"))
    case = subject_case(subject, recipe(reorient_ras, target_spacing_mm))
    assert case.original_shape == shape
    np.testing.assert_allclose(case.original_affine, OBLIQUE)
    if target_spacing_mm:
        np.testing.assert_allclose(case.spacing_mm, target_spacing_mm)
        assert case.label.size == 8 * label.size
    every = 2 if target_spacing_mm else 1  # the model voxels that are original voxels: image = label there
    np.testing.assert_allclose(case.image[::every, ::every, ::every, 0], case.label[::every, ::every, ::every],
                               atol=1e-4)
    probabilities = np.eye(3, dtype=np.float32)[case.label]
    mapped = to_original_grid(probabilities, case.affine, case.original_shape, case.original_affine)
    assert mapped.shape == shape + (3,) and mapped.dtype == np.float32
    np.testing.assert_allclose(mapped.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(mapped, axis=-1), label)


def half_resolution_case(model_labels):
    """A case whose model grid (8, 8, 8) at 1 mm has twice the x resolution of its original grid (4, 8, 8) at
    (2, 1, 1) mm: original voxel (i, j, k) is model voxel (2i, j, k); a stub predictor returns the one-hot of
    `model_labels` (8, 8, 8) as its probabilities."""
    case = Case("s", np.zeros((8, 8, 8, 1), np.float32), None, np.eye(4), (4, 8, 8), np.diag([2.0, 1.0, 1.0, 1.0]))
    predictor = SimpleNamespace(probabilities=lambda image: np.eye(3, dtype=np.float32)[model_labels])
    return case, predictor


def test_post_processing_applies_to_the_final_label_map_on_the_original_grid():
    """Class 1 is two components on the model grid (x 0-2 and 4-7, the gap at the odd x = 3 that no original
    voxel samples) and one on the original grid: the largest-component step, applied to the final labels,
    keeps it whole (applied on the model grid it would delete x 0-2, original x 0-1)."""
    model = np.zeros((8, 8, 8), np.int64)
    model[0:3, 0:3, 0:3] = 1
    model[4:8, 0:3, 0:3] = 1
    case, predictor = half_resolution_case(model)
    decision = {**postprocess.NOTHING, "foreground_largest_component": True}
    labels = segment_case(predictor, case, decision)
    assert labels.dtype == np.uint8 and labels.shape == (4, 8, 8) and probabilities.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(labels, model[::2])
    assert postprocess.apply(model, decision, (1, 1, 1))[:3].sum() == 0  # what the model grid would give
    np.testing.assert_array_equal(np.argmax(probabilities, axis=-1), model[::2])  # saved before post-processing


def test_post_processing_thresholds_use_the_original_spacing():
    """Islands of class 2 of 3 and 2 original voxels (6 and 4 mm^3 at 2 x 1 x 1 mm) with a 5 mm^3 threshold:
    the 6 mm^3 island stays (with 1 mm voxels it would be 3 mm^3 and go), the 4 mm^3 one goes."""
    model = np.zeros((8, 8, 8), np.int64)
    model[0:8, 0:4, 0:4] = 1
    model[0:6, 6, 6] = 2  # original x 0, 1, 2
    model[0:4, 6, 0] = 2  # original x 0, 1
    case, predictor = half_resolution_case(model)
    labels = segment_case(predictor, case, {**postprocess.NOTHING, "min_island_mm3": {"2": 5.0}})
    expected = model[::2].copy()
    expected[:, 6, 0] = 0
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(segment_case(predictor, case, None), model[::2])
