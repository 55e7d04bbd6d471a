"""Geometry of `medseg predict`: a subject through `subject_case` onto the model grid and its
probabilities back onto the original grid, slab by slab, land on the original voxels exactly; the
post-processing decision is applied to the final label map on the original grid, with the original
spacing; probabilities are streamed to disk in uint8 or float16; with regions, the region probabilities
are mapped back and saved, and the regions painted from them on the original grid."""
import os
import weakref

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from helpers import write_dicom_series, write_nifti
from medseg_dl.data.cases import Case, CaseRecipe, subject_case
from medseg_dl.data.io import read_volume
from medseg_dl.data.subjects import Subject
from medseg_dl.data.targets import Region, Targets
from medseg_dl.inference import postprocess
from medseg_dl.inference.original_grid import model_axis_of, original_slabs
from medseg_dl.inference.predict import _predict_subjects, input_subjects, segment_case
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.probability_files import ProbabilityWriter

CLASSES = Targets(3, ("background", "one", "two"))
# BraTS's nested regions over labels 1 (edema), 2 (necrosis), 3 (enhancing), painted in this order
REGIONS = Targets(4, ("background", "edema", "necrosis", "enhancing"),
                  (Region("whole", (1, 2, 3), 1), Region("core", (2, 3), 2), Region("enhancing", (3,), 3)))


def slabs_of(volume, axis, thickness):
    """(begin, block) slabs of `volume` (X, Y, Z, K) along `axis`, `thickness` planes each, as the
    Predictor yields them."""
    for begin in range(0, volume.shape[axis], thickness):
        index = [slice(None)] * 3
        index[axis] = slice(begin, begin + thickness)
        yield begin, volume[tuple(index)].copy()


def mapped_back(probabilities, model_affine, original_shape, original_affine, thickness=2):
    """The slab-wise mapping assembled into (X, Y, Z, K); each original slice must come exactly once."""
    out = np.full(tuple(original_shape) + probabilities.shape[-1:], np.nan, np.float32)
    axis = model_axis_of(model_affine, original_affine)
    for z_begin, block in original_slabs(slabs_of(probabilities, axis, thickness), probabilities.shape[:3],
                                         model_affine, original_shape, original_affine):
        assert np.isnan(out[:, :, z_begin:z_begin + block.shape[2]]).all()
        out[:, :, z_begin:z_begin + block.shape[2]] = block
    return out


def whole_volume_reference(probabilities, model_affine, original_shape, original_affine):
    """Each class interpolated over the whole model volume at once (order 1, nearest edge)."""
    to_model = np.linalg.inv(model_affine) @ original_affine
    return np.stack([ndimage.affine_transform(probabilities[..., k], to_model[:3, :3], to_model[:3, 3],
                                              output_shape=tuple(original_shape), order=1, mode="nearest")
                     for k in range(probabilities.shape[-1])], axis=-1)

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
    for thickness in (1, 2, 5):
        mapped = mapped_back(probabilities, case.affine, case.original_shape, case.original_affine, thickness)
        assert mapped.shape == shape + (3,) and mapped.dtype == np.float32
        np.testing.assert_allclose(mapped.sum(axis=-1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(np.argmax(mapped, axis=-1), label)


@pytest.mark.parametrize("reorient_ras, target_spacing_mm", [(True, None), (True, [0.9, 1.3, 0.7]),
                                                             (False, [1.7, 0.6, 1.1])])
def test_slab_wise_mapping_equals_the_whole_volume_interpolation(tmp_path, reorient_ras, target_spacing_mm):
    """Smooth random probabilities on a model grid at spacings that are no multiple of the original ones,
    reoriented (the original z runs along a flipped model axis): slab by slab equals one interpolation of the
    whole volume, for slabs of 1, 3 and 8 planes."""
    shape = (11, 9, 13)
    write_nifti(tmp_path / "image.nii.gz", np.zeros(shape, np.float32), OBLIQUE)
    case = subject_case(Subject("s", [str(tmp_path / "image.nii.gz")]), recipe(reorient_ras, target_spacing_mm))
    logits = ndimage.gaussian_filter(np.random.default_rng(1).normal(size=case.image.shape[:3] + (4,)), (2, 2, 2, 0))
    probabilities = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    reference = whole_volume_reference(probabilities, case.affine, shape, case.original_affine)
    for thickness in (1, 3, 8):
        mapped = mapped_back(probabilities, case.affine, shape, case.original_affine, thickness)
        np.testing.assert_allclose(mapped, reference, rtol=0, atol=1e-6)


def test_original_slices_are_interpolated_as_their_model_planes_arrive():
    """Original slices come out while the model slabs still arrive, and model planes no pending slice samples
    are dropped: the mapping never waits for, nor keeps, the whole model volume."""
    probabilities = np.random.default_rng(2).random((6, 5, 40, 2)).astype(np.float32)
    consumed = []

    def counted():
        for begin, block in slabs_of(probabilities, 2, 4):
            consumed.append(weakref.ref(block))
            yield begin, block

    mapped = original_slabs(counted(), (6, 5, 40), np.eye(4), (6, 5, 20), np.diag([1.0, 1.0, 2.0, 1.0]))
    assert next(mapped)[0] == 0 and len(consumed) == 1
    for _ in mapped:
        assert sum(ref() is not None for ref in consumed) <= 2  # the slab in hand and at most one before it


class OneHotPredictor:
    """A stub `Predictor` whose probabilities are the one-hot of fixed model labels (X, Y, Z), in slabs of 3."""

    targets = CLASSES

    def __init__(self, model_labels):
        self.probabilities = np.eye(3, dtype=np.float32)[model_labels]

    def slabs(self, image, output, axis, progress=None):
        assert output == "probabilities"
        yield from slabs_of(self.probabilities, axis, 3)


def half_resolution_case(model_labels):
    """A case whose model grid (8, 8, 8) at 1 mm has twice the x resolution of its original grid (4, 8, 8) at
    (2, 1, 1) mm: original voxel (i, j, k) is model voxel (2i, j, k); a stub predictor returns the one-hot of
    `model_labels` (8, 8, 8) as its probabilities."""
    case = Case("s", np.zeros((8, 8, 8, 1), np.float32), None, np.eye(4), (4, 8, 8), np.diag([2.0, 1.0, 1.0, 1.0]))
    return case, OneHotPredictor(model_labels)


def test_post_processing_applies_to_the_final_label_map_on_the_original_grid(tmp_path):
    """Class 1 is two components on the model grid (x 0-2 and 4-7, the gap at the odd x = 3 that no original
    voxel samples) and one on the original grid: the largest-component step, applied to the final labels,
    keeps it whole (applied on the model grid it would delete x 0-2, original x 0-1)."""
    model = np.zeros((8, 8, 8), np.int64)
    model[0:3, 0:3, 0:3] = 1
    model[4:8, 0:3, 0:3] = 1
    case, predictor = half_resolution_case(model)
    decision = {**postprocess.NOTHING, "foreground_largest_component": True}
    writer = ProbabilityWriter(str(tmp_path / "s"), (4, 8, 8, 3), np.diag([2.0, 1.0, 1.0, 1.0]), "float16")
    labels = segment_case(predictor, case, decision, probabilities=writer)
    probabilities = np.load(writer.close())
    assert labels.dtype == np.uint8 and labels.shape == (4, 8, 8) and probabilities.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(labels, model[::2])
    assert postprocess.apply(model, decision, (1, 1, 1), CLASSES)[:3].sum() == 0  # what the model grid would give
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


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_probabilities_stream_to_disk_in_any_slab_order_and_read_back(tmp_path, dtype):
    """Slabs written out of order give the whole volume back: NIfTI uint8 with scl_slope 1/255 (within 1/510),
    or .npy float16 (within float16 rounding), with the affine kept; the file appears only when closed."""
    probabilities = np.random.default_rng(3).dirichlet(np.ones(4), size=(5, 6, 9)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    writer = ProbabilityWriter(str(tmp_path / "case"), probabilities.shape, affine, dtype)
    for begin in (6, 0, 3):
        writer.write(begin, probabilities[:, :, begin:begin + 3])
    assert not list(tmp_path.glob("case_*"))
    path = writer.close()
    if dtype == "uint8":
        image = nib.load(path)
        assert path.endswith("_probabilities.nii.gz") and image.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.affine, affine)
        np.testing.assert_allclose(image.get_fdata(), probabilities, atol=1 / 510 + 1e-6)
    else:
        saved = np.load(path)
        assert path.endswith("_probabilities.npy") and saved.dtype == np.float16
        np.testing.assert_allclose(saved, probabilities, rtol=1e-3, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.rsplit("/", 1)[1]]


def test_an_abandoned_probability_file_leaves_nothing(tmp_path):
    writer = ProbabilityWriter(str(tmp_path / "case"), (4, 4, 4, 2), np.eye(4), "uint8")
    writer.write(0, np.full((4, 4, 2, 2), 0.5, np.float32))
    writer.abandon()
    assert not list(tmp_path.iterdir())


def test_predict_saves_the_region_probabilities_mapped_back_and_paints_the_regions_from_them(tmp_path):
    """With regions, `medseg predict --save-probabilities` writes one channel per region on the original grid
    (the model grid's sigmoids interpolated back), and the label map paints the regions from those mapped-back
    probabilities (p > 0.5, in order), not from the model grid's labels."""
    shape = (7, 9, 6)
    write_nifti(tmp_path / "image.nii.gz", np.random.default_rng(4).normal(size=shape).astype(np.float32), OBLIQUE)
    recipe_values = recipe(True, [0.9, 1.3, 0.7])
    case = subject_case(Subject("s", [str(tmp_path / "image.nii.gz")]), recipe_values)
    offsets = tf.constant([3.0, 0.0, -6.0])  # whole, core, enhancing where the image is over -0.5, 0, 1
    predictor = Predictor(lambda inputs: 6.0 * inputs["image"] + offsets, (8, 8, 8), REGIONS, recombination="host")
    written = _predict_subjects(predictor, None, recipe_values, [Subject("s", [str(tmp_path / "image.nii.gz")])],
                                str(tmp_path / "out"), "float16")
    assert [p.rsplit("/", 1)[1] for p in written] == ["s.nii.gz", "s_probabilities.npy"]
    saved = np.load(written[1]).astype(np.float32)
    expected = whole_volume_reference(predictor.probabilities(case.image), case.affine, shape, case.original_affine)
    assert saved.shape == shape + (3,)
    np.testing.assert_allclose(saved, expected, atol=1e-3)
    labels = np.asanyarray(nib.load(written[0]).dataobj)
    decided = np.abs(expected - 0.5).min(axis=-1) > 1e-3
    assert decided.mean() > 0.95 and set(np.unique(labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(labels[decided], REGIONS.labels_of(expected - 0.5)[decided])
    to_model = np.linalg.inv(case.affine) @ case.original_affine
    painted_first = ndimage.affine_transform(predictor.labels(case.image), to_model[:3, :3], to_model[:3, 3],
                                             output_shape=shape, order=0, mode="nearest")
    assert (painted_first != labels).sum() > 10  # painting on the model grid, then mapping back, differs


def test_a_dicom_series_is_one_input_whatever_its_files_are_named(tmp_path):
    """Scanners write IM0001 or names without a suffix: the folder is still one DICOM series to predict (read
    with its NIfTI-equal voxels), and a folder of NIfTI files is still one input per file."""
    series = tmp_path / "series"
    data = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    for path in write_dicom_series(str(series), data, np.diag([0.7, 0.9, 2.5, 1.0])):
        os.rename(path, path[:-len(".dcm")])
    assert not [n for n in os.listdir(series) if n.endswith(".dcm")]
    subjects = input_subjects([str(series)], {"layout": "images_labels"})
    assert [(s.id, s.channels) for s in subjects] == [("series", [str(series)])]
    np.testing.assert_array_equal(read_volume(str(series)).data, data)
    (tmp_path / "volumes").mkdir()
    for name in ("a", "b"):
        write_nifti(tmp_path / "volumes" / f"{name}.nii.gz", np.zeros((3, 3, 3), np.float32))
    assert [s.id for s in input_subjects([str(tmp_path / "volumes")], {"layout": "images_labels"})] == ["a", "b"]
