"""Spatial augmentation: exact crops, flips and 90-degree turns against numpy, elastic identity and
magnitude, the samplers against scipy, and image/label alignment under random warps through the
pipeline's own patch function (exact reference: an image of voxel coordinates)."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from medseg_dl.config.params import Params
from medseg_dl.pipeline import inputs, sampling, spatial

SEED = tf.constant([3, 5], tf.int64)
RNG = np.random.default_rng(0)
IMAGE = RNG.normal(size=(9, 10, 11, 2)).astype(np.float32)
LABEL = RNG.integers(0, 4, size=(9, 10, 11)).astype(np.int32)


def crop(volume, centre, size, mode):
    """Plain numpy crop around `centre` with the pipeline's convention (start = centre - size // 2)."""
    margin = max(size)
    padded = np.pad(volume, [(margin, margin)] * 3 + [(0, 0)] * (volume.ndim - 3), mode=mode)
    start = np.asarray(centre) - np.asarray(size) // 2 + margin
    return padded[start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]]


def sample_linear(volume, coords, padding):
    return spatial.sample_linear_flat(*spatial.flatten_padded(volume, padding), coords, padding)


def sample_nearest(volume, coords, padding):
    return spatial.sample_nearest_flat(*spatial.flatten_padded(volume, padding), coords, padding)


def middles_of(centres, size):
    return sampling.patch_middles(sampling.patch_starts(tf.constant(centres, tf.int32), size), size)


ONE_MM = tf.ones([3])


def random_coordinates(middles, aug, size, seed, spacing_mm=ONE_MM):
    return spatial.spatial_coordinates(middles, size, spatial.draw_spatial(aug, middles.shape[0], seed), spacing_mm)


def patches(centres, size, matrices=None, displacement=None, padding="constant"):
    coords = spatial.sampling_coordinates(middles_of(centres, size), size, matrices, displacement)
    return sample_linear(IMAGE, coords, padding).numpy(), sample_nearest(LABEL, coords, padding).numpy()


def aug_params(**sections):
    return Params.from_dict({"augmentation": sections}).augmentation


def volume_dict(image, label, spacing_mm):
    """A volume dict (pipeline/inputs.py `read_case`) of `image` (X, Y, Z, C) and `label` (X, Y, Z) on voxels of
    `spacing_mm` (3 floats), with no class locations."""
    return {"image": image, "label": label, "spacing_mm": np.asarray(spacing_mm, np.float32),
            "class_locations": np.zeros((0, 3), np.int32), "class_location_counts": np.zeros(5, np.int32),
            "class_voxels": np.zeros(5, np.int64), "subject": "s"}


@pytest.mark.parametrize("padding,mode", [("constant", "constant"), ("edge", "edge")])
def test_no_transform_is_the_plain_crop_exactly(padding, mode):
    centres, size = [[4, 5, 5], [0, 0, 0], [8, 9, 10]], [6, 7, 4]
    identity = tf.eye(3, batch_shape=[3])  # the linear sampler at integer coordinates must be exact too
    for matrices in (None, identity):
        images, labels = patches(centres, size, matrices, padding=padding)
        for s, centre in enumerate(centres):
            np.testing.assert_array_equal(images[s], crop(IMAGE, centre, size, mode))
            np.testing.assert_array_equal(labels[s], crop(LABEL, centre, size, mode))


def test_random_coordinates_with_everything_off_are_the_integer_grid():
    middles = middles_of([[4, 5, 5]], [6, 6, 6])
    coords = random_coordinates(middles, aug_params(), [6, 6, 6], SEED).numpy()
    np.testing.assert_array_equal(coords, np.stack(np.meshgrid(*[np.arange(2, 8)] * 3, indexing="ij"), -1)[None]
                                  + np.array([-1, 0, 0]))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flip_equals_numpy_flip(axis):
    centre, size = [4, 5, 5], [6, 7, 5]
    flips = np.zeros((1, 3), bool)
    flips[0, axis] = True
    image, label = patches([centre], size, spatial.flip_matrices(tf.constant(flips)))
    np.testing.assert_array_equal(image[0], np.flip(crop(IMAGE, centre, size, "constant"), axis))
    np.testing.assert_array_equal(label[0], np.flip(crop(LABEL, centre, size, "constant"), axis))


@pytest.mark.parametrize("axis,plane", [(0, (1, 2)), (1, (2, 0)), (2, (0, 1))])
def test_rotation_by_90_degrees_equals_numpy_rot90(axis, plane):
    centre, size = [4, 5, 5], [6, 6, 6]
    angles = np.zeros((1, 3), np.float32)
    angles[0, axis] = np.pi / 2
    image, label = patches([centre], size, spatial.rotation_matrices(tf.constant(angles)))
    np.testing.assert_allclose(image[0], np.rot90(crop(IMAGE, centre, size, "constant"), 1, plane), atol=1e-5)
    np.testing.assert_array_equal(label[0], np.rot90(crop(LABEL, centre, size, "constant"), 1, plane))


def test_scale_factor_two_enlarges_about_the_middle():
    size = [5, 5, 5]
    image, _ = patches([[4, 5, 5]], size, spatial.scale_matrices(tf.constant([[2.0, 2.0, 2.0]])))
    middle = middles_of([[4, 5, 5]], size).numpy()[0]
    offsets = (np.arange(5) - 2) / 2.0
    reference = ndimage.map_coordinates(IMAGE[..., 1], np.stack(np.meshgrid(
        *[middle[i] + offsets for i in range(3)], indexing="ij")), order=1)
    np.testing.assert_allclose(image[0, ..., 1], reference, atol=1e-5)


def test_elastic_with_zero_magnitude_and_scale_one_is_the_identity():
    aug = aug_params(elastic={"p": 1.0, "magnitude_mm": [0.0, 0.0]}, scale={"p": 1.0, "range": [1.0, 1.0]})
    centres, size = [[4, 5, 5], [2, 3, 1]], [6, 7, 5]
    middles = middles_of(centres, size)
    coords = random_coordinates(middles, aug, size, SEED)
    images = sample_linear(IMAGE, coords, "constant").numpy()
    for s, centre in enumerate(centres):
        np.testing.assert_allclose(images[s], crop(IMAGE, centre, size, "constant"), atol=1e-6)


def test_elastic_displacement_has_the_requested_rms_and_is_smooth():
    magnitude = np.array([0.5, 2.0, 0.0], np.float32)
    control = tf.constant(RNG.normal(size=(3, 7, 7, 7, 3)).astype(np.float32))
    field = spatial.elastic_displacement(control, tf.constant([5.0, 8.0, 6.0]), tf.constant(magnitude),
                                         [20, 24, 16], ONE_MM).numpy()
    assert field.shape == (3, 20, 24, 16, 3)
    rms = np.sqrt(np.mean(field ** 2, axis=(1, 2, 3, 4)))
    np.testing.assert_allclose(rms, magnitude, rtol=1e-4)
    step = np.abs(np.diff(field[1], axis=0)).max()
    assert 0 < step < 0.5 * np.abs(field[1]).max()  # neighbours move together


def test_elastic_displacement_is_in_mm_on_anisotropic_voxels():
    """On 0.7 x 0.7 x 5 mm voxels the field (voxels) times the spacing is a field in mm of RMS magnitude_mm
    per patch (exactly) and per axis (pooled over 64 patches: within 10 %, observed 3 %), so in voxels
    the z component is 5 / 0.7 times smaller than x and y. It is smooth in mm on every axis: a patch of
    21 x 21 x 5 voxels of 1 x 1 x 5 mm spans the 20 mm of a 21^3 patch of 1 mm voxels, and with the same
    control points its field in mm is the 1 mm field at every fifth z slice, up to the RMS gain."""
    spacing, magnitude = np.array([0.7, 0.7, 5.0], np.float32), 1.5
    control = tf.constant(RNG.normal(size=(64, 7, 7, 7, 3)).astype(np.float32))
    field_mm = spatial.elastic_displacement(control, tf.fill([64], 6.0), tf.fill([64], magnitude), [24, 24, 6],
                                            tf.constant(spacing)).numpy() * spacing
    np.testing.assert_allclose(np.sqrt(np.mean(field_mm ** 2, axis=(1, 2, 3, 4))), magnitude, rtol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.mean(field_mm ** 2, axis=(0, 1, 2, 3))), magnitude, rtol=0.1)
    control, sigma_mm, ones = control[:2], tf.constant([4.0, 7.0]), tf.ones([2])
    isotropic = spatial.elastic_displacement(control, sigma_mm, ones, [21, 21, 21], ONE_MM).numpy()[:, :, :, ::5]
    slices = spatial.elastic_displacement(control, sigma_mm, ones, [21, 21, 5], tf.constant([1.0, 1.0, 5.0]))
    slices_mm = slices.numpy() * [1.0, 1.0, 5.0]
    for anisotropic, reference in zip(slices_mm, isotropic):
        gain = np.sum(anisotropic * reference) / np.sum(reference ** 2)
        np.testing.assert_allclose(anisotropic, gain * reference, atol=1e-5)


STRONG = {"flip": {"p": 0.5}, "rotate": {"p": 1.0, "max_deg": [30.0, 30.0, 30.0]},
          "scale": {"p": 1.0, "range": [0.8, 1.25], "anisotropic": True},
          "elastic": {"p": 1.0, "magnitude_mm": [1.0, 2.0]}}


@pytest.mark.parametrize("padding", ["constant", "edge"])
def test_labels_are_sampled_exactly_where_the_image_is_under_random_warps(padding):
    """The image channels hold each voxel's own coordinates (and 1), so the pipeline's linearly sampled
    image patch reads out where every patch voxel was sampled (where the last channel is 1, no
    padding took part); the label patch must hold, voxel by voxel, the label of the nearest source
    voxel there. A label shifted by one voxel fails."""
    shape = (30, 34, 28)
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    coordinates = np.stack([*grid, np.ones(shape)], -1).astype(np.float32)
    label = RNG.integers(0, 5, size=shape).astype(np.int32)
    params = Params.from_dict({"sampling": {"patch_size": [16, 18, 14], "padding": padding},
                               "augmentation": STRONG})
    volume = inputs.prepare_volume(volume_dict(coordinates, label, [1.0, 1.0, 1.0]), padding)
    middles = tf.constant([[15.0, 17.0, 13.5], [4.0, 30.0, 20.0], [25.5, 8.0, 3.0]])
    images, labels, _ = (t.numpy() for t in inputs.patch_function(params)(volume, middles, SEED))
    sampled = images[..., :3]
    inside = np.abs(images[..., 3] - 1.0) < 1e-6
    away_from_ties = np.all(np.abs(sampled - np.floor(sampled) - 0.5) > 1e-3, axis=-1)
    checked = inside & away_from_ties
    assert checked.mean() > 0.5 and np.any(sampled != np.round(sampled))  # warped, mostly inside
    nearest = np.floor(sampled[checked] + 0.5).astype(int)
    np.testing.assert_array_equal(labels[checked], label[tuple(nearest.T)])


def test_linear_sampling_matches_scipy_at_random_points():
    points = RNG.uniform(-2.0, 12.0, size=(500, 3)).astype(np.float32)
    ours = sample_linear(IMAGE, tf.constant(points), "constant").numpy()
    for c in range(2):
        reference = ndimage.map_coordinates(np.pad(IMAGE[..., c], 1), points.T + 1, order=1, mode="constant")
        np.testing.assert_allclose(ours[:, c], reference, atol=1e-5)
    edge = sample_linear(IMAGE, tf.constant(points), "edge").numpy()
    np.testing.assert_allclose(edge[:, 0], ndimage.map_coordinates(IMAGE[..., 0], points.T, order=1, mode="nearest"),
                               atol=1e-5)


def test_flip_switch_follows_its_probability_and_allowed_axes():
    coords_on = random_coordinates(tf.zeros([400, 3]), aug_params(flip={"p": 1.0, "axes": [1]}), [2, 2, 2],
                                   SEED).numpy()
    np.testing.assert_array_equal(coords_on[:, 0, 0, 0], np.tile([[-0.5, 0.5, -0.5]], (400, 1)))


def test_one_mm_isotropic_patches_are_those_of_the_voxel_formulas():
    """On 1 mm isotropic voxels mm and voxels coincide (S = I): seeded patches under every spatial
    transform are those of the voxel-space augmentation before spacing was taken into account. The
    expected sums were computed with that code (sums of the image patches of voxel coordinates per patch
    and axis; of the label patches); any change of a stream, a composition order or a formula moves them
    by far more than the tolerance, which only allows for float rounding on another CPU."""
    shape = (30, 34, 28)
    coordinates = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    label = (np.arange(np.prod(shape)) % 5).reshape(shape).astype(np.int32)
    params = Params.from_dict({"sampling": {"patch_size": [16, 18, 14]}, "augmentation": STRONG})
    volume = inputs.prepare_volume(volume_dict(coordinates, label, [1.0, 1.0, 1.0]), "constant")
    middles = tf.constant([[15.0, 17.0, 13.5], [10.0, 20.0, 12.0]])
    seed = tf.constant([3, 1], tf.int64)  # flips on some axes only: flip and rotation do not commute
    images, labels, _ = (t.numpy() for t in inputs.patch_function(params)(volume, middles, seed))
    np.testing.assert_allclose(images.astype(np.float64).sum(axis=(1, 2, 3)),
                               [[56825.01936674, 70850.80522823, 42759.21875334],
                                [33888.70262194, 81041.90813372, 52170.20505471]], rtol=0, atol=1e-2)
    np.testing.assert_array_equal(labels.sum(axis=(1, 2, 3)), [8042, 7863])


SPHERE_SPACING = np.array([0.7, 0.7, 5.0])
SPHERE_SHAPE = (64, 64, 10)


def surface_voxels(label):
    """The number of voxels of `label` (X, Y, Z) with a 6-neighbour outside it (the volume border counts
    as outside), as medseg_dl.evaluation.scoring counts surfaces."""
    mask = label.astype(bool)
    return int((mask & ~ndimage.binary_erosion(mask, border_value=0)).sum())


@pytest.mark.parametrize("max_deg", [[30.0, 0.0, 0.0], [0.0, 30.0, 0.0], [0.0, 0.0, 30.0], [30.0, 30.0, 30.0]])
def test_a_rotated_sphere_stays_a_sphere_in_mm(max_deg):
    """A sphere of radius 15 mm on 0.7 x 0.7 x 5 mm voxels, its label rotated through the pipeline's
    patch function (nearest neighbour) about x, y, z, or all three, by angles the seed draws between 21
    and 30 degrees per axis. The image channels hold each voxel's mm coordinates, so the linearly
    sampled patch reads out the map from output to input mm: it must be a rotation (orthogonal to 1e-5;
    observed 2e-7). The rotated label's volume (voxel count x voxel volume) stays within 3 % of the
    unrotated one and its surface (surface voxel count) within 6 % (observed at most 2.4 % and 4.7 %:
    nearest-neighbour resampling on 5 mm slices changes the digitisation). Rotating the voxel grid
    instead (a shear in mm) shrinks volume and surface by 20 to 45 % and is far from orthogonal; about z
    (x and y equally spaced) the two agree, the case [0, 0, a] of anisotropic data."""
    middle = (np.array(SPHERE_SHAPE) - 1) / 2
    mm = np.stack(np.meshgrid(*[(np.arange(n) - m) * s for n, m, s in zip(SPHERE_SHAPE, middle, SPHERE_SPACING)],
                              indexing="ij"), -1)
    label = (np.linalg.norm(mm, axis=-1) <= 15.0).astype(np.int32)
    image = np.concatenate([mm, np.ones(SPHERE_SHAPE + (1,))], -1).astype(np.float32)
    params = Params.from_dict({"sampling": {"patch_size": list(SPHERE_SHAPE)},
                               "augmentation": {"rotate": {"p": 1.0, "max_deg": max_deg}}})
    volume = inputs.prepare_volume(volume_dict(image, label, SPHERE_SPACING), "constant")
    middles, seed = tf.constant([middle] * 3, tf.float32), tf.constant([10807, 0], tf.int64)
    images, labels, _ = (t.numpy() for t in inputs.patch_function(params)(volume, middles, seed))
    for patch_image, patch_label in zip(images, labels):
        inside = np.abs(patch_image[..., 3] - 1.0) < 1e-6  # sampled without padding: linear in mm exactly
        mapping = np.linalg.lstsq(mm[inside], patch_image[inside][:, :3], rcond=None)[0].T
        np.testing.assert_allclose(mapping.T @ mapping, np.eye(3), atol=1e-5)
        angle_deg = np.degrees(np.arccos((np.trace(mapping) - 1.0) / 2.0))
        assert angle_deg >= 21.0
        np.testing.assert_allclose(patch_label.sum(), label.sum(), rtol=0.03)
        np.testing.assert_allclose(surface_voxels(patch_label), surface_voxels(label), rtol=0.06)
