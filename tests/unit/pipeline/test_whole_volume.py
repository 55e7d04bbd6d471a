"""Whole-volume deformation: the identity and 90-degree turns exactly, random warps against scipy on the
same coordinates, geometry in mm on anisotropic voxels, slab independence and input errors."""
import numpy as np
import pytest
from scipy import ndimage

from medseg_dl.errors import DataError
from medseg_dl.pipeline import whole_volume

RNG = np.random.default_rng(0)
IMAGE = RNG.normal(size=(14, 13, 11, 2)).astype(np.float32)
LABEL = RNG.integers(0, 5, size=(14, 13, 11)).astype(np.int32)
WARP = {"rotation_deg": (12.0, -9.0, 20.0), "elastic_sigma_mm": 6.0, "elastic_magnitude_mm": 1.5, "seed": 4}


def coordinates(shape, **transform):
    """(X, Y, Z, 3) input voxel coordinates of every output voxel of `whole_volume.volume_warp(**transform)`."""
    matrix, displacement = whole_volume.volume_warp(shape, **transform)
    return whole_volume.slab_coordinates(shape, 0, shape[0], matrix, displacement).numpy()


@pytest.mark.parametrize("padding", ["constant", "edge"])
def test_no_rotation_and_no_elastic_is_the_identity_exactly(padding):
    image, label = whole_volume.deform_volume(IMAGE, LABEL, elastic_magnitude_mm=0.0, padding=padding)
    assert image.dtype == np.float32 and label.dtype == np.int32
    np.testing.assert_array_equal(image, IMAGE)
    np.testing.assert_array_equal(label, LABEL)


def test_90_degrees_about_z_equals_numpy_rot90_also_on_anisotropic_voxels():
    image, label = IMAGE[:13], LABEL[:13]  # x and y of one size and spacing
    for spacing_mm in ((1.0, 1.0, 1.0), (0.8, 0.8, 2.5)):
        turned, turned_label = whole_volume.deform_volume(image, label, spacing_mm=spacing_mm,
                                                          rotation_deg=(0.0, 0.0, 90.0), elastic_magnitude_mm=0.0)
        np.testing.assert_allclose(turned, np.rot90(image, 1, axes=(0, 1)), atol=1e-5)
        np.testing.assert_array_equal(turned_label, np.rot90(label, 1, axes=(0, 1)))


def test_random_warp_equals_scipy_on_the_same_coordinates():
    """Linear samples are scipy's order-1 interpolation of the zero-padded volume; labels are those of
    the nearest voxel (away from ties). The elastic field has the requested RMS in mm."""
    image, label = whole_volume.deform_volume(IMAGE, LABEL, **WARP)
    coords = coordinates(IMAGE.shape[:3], **WARP)
    for c in range(2):
        reference = ndimage.map_coordinates(np.pad(IMAGE[..., c], 1), np.moveaxis(coords, -1, 0) + 1, order=1)
        np.testing.assert_allclose(image[..., c], reference, atol=1e-4)
    nearest = np.floor(coords + 0.5).astype(int)
    inside = np.all((nearest >= 0) & (nearest < IMAGE.shape[:3]), axis=-1)
    checked = inside & np.all(np.abs(coords - np.floor(coords) - 0.5) > 1e-3, axis=-1)
    assert checked.mean() > 0.5
    np.testing.assert_array_equal(label[checked], LABEL[tuple(nearest[checked].T)])
    assert np.all(label[~inside] == 0)
    rigid = coordinates(IMAGE.shape[:3], **{**WARP, "elastic_magnitude_mm": 0.0})
    np.testing.assert_allclose(np.sqrt(np.mean((coords - rigid) ** 2)), 1.5, rtol=1e-4)


def test_rotation_about_x_turns_a_sphere_in_mm_on_anisotropic_voxels():
    """A 7 mm sphere 10 mm from the middle along y, on 1 x 1 x 3 mm voxels, turned by 30 degrees about x:
    its centre moves toward z to (0, 10 cos 30, 10 sin 30) mm and its volume stays."""
    spacing = np.array([1.0, 1.0, 3.0])
    shape = (32, 48, 24)
    offsets_mm = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)],
                                      indexing="ij"), axis=-1)
    sphere = (np.linalg.norm(offsets_mm - [0.0, 10.0, 0.0], axis=-1) <= 7.0).astype(np.int32)
    image, label = whole_volume.deform_volume(sphere[..., None].astype(np.float32), sphere, spacing_mm=spacing,
                                              rotation_deg=(30.0, 0.0, 0.0), elastic_magnitude_mm=0.0)
    for turned in (image[..., 0], label):
        centre_mm = np.sum(offsets_mm * turned[..., None], axis=(0, 1, 2)) / turned.sum()
        np.testing.assert_allclose(centre_mm, [0.0, 10 * np.cos(np.pi / 6), 10 * np.sin(np.pi / 6)], atol=0.3)
        np.testing.assert_allclose(turned.sum() / sphere.sum(), 1.0, atol=0.04)


def test_the_result_does_not_depend_on_the_slab_size():
    whole = whole_volume.deform_volume(IMAGE, LABEL, **WARP, slab_voxels=IMAGE[..., 0].size)
    for slab_voxels in (1, 3 * 13 * 11):  # slabs of one x-row; of 3 rows, the last overlapping its neighbour
        image, label = whole_volume.deform_volume(IMAGE, LABEL, **WARP, slab_voxels=slab_voxels)
        np.testing.assert_allclose(image, whole[0], atol=1e-5)
        assert np.mean(label == whole[1]) > 0.999  # coordinates round differently: a tie may tip


def test_bad_inputs_raise_one_line_errors_naming_the_expected_shape():
    with pytest.raises(DataError, match=r"has shape \(14, 13, 11\); expected \(X, Y, Z, C\)") as error:
        whole_volume.deform_volume(IMAGE[..., 0])
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match=r"label map has shape \(14, 13\); expected the image's \(14, 13, 11\)"):
        whole_volume.deform_volume(IMAGE, LABEL[..., 0])
    with pytest.raises(ValueError, match="expected 'constant' or 'edge'"):
        whole_volume.deform_volume(IMAGE, padding="reflect")


def test_a_seed_gives_one_field_and_another_seed_another():
    first, again = (whole_volume.deform_volume(IMAGE, **WARP)[0] for _ in range(2))
    other = whole_volume.deform_volume(IMAGE, **{**WARP, "seed": 5})[0]
    np.testing.assert_array_equal(first, again)
    assert np.abs(other - first).max() > 0.1
