"""Geometry of `medseg predict`: a subject through `subject_case` onto the model grid and its
probabilities back onto the original grid land on the original voxels exactly."""
import numpy as np
import pytest

from conftest import write_nifti
from medseg_dl.data.cases import CaseRecipe, subject_case
from medseg_dl.data.subjects import Subject
from medseg_dl.inference.predict import to_original_grid

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
    assert mapped.shape == shape and mapped.dtype == np.uint8
    np.testing.assert_array_equal(mapped, label)
