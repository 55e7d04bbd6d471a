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


def random_coordinates(middles, aug, size, seed):
    return spatial.spatial_coordinates(middles, size, spatial.draw_spatial(aug, middles.shape[0], seed))


def patches(centres, size, matrices=None, displacement=None, padding="constant"):
    coords = spatial.sampling_coordinates(middles_of(centres, size), size, matrices, displacement)
    return sample_linear(IMAGE, coords, padding).numpy(), sample_nearest(LABEL, coords, padding).numpy()


def aug_params(**sections):
    return Params.from_dict({"augmentation": sections}).augmentation


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
    aug = aug_params(elastic={"p": 1.0, "magnitude_vox": [0.0, 0.0]}, scale={"p": 1.0, "range": [1.0, 1.0]})
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
                                         [20, 24, 16]).numpy()
    assert field.shape == (3, 20, 24, 16, 3)
    rms = np.sqrt(np.mean(field ** 2, axis=(1, 2, 3, 4)))
    np.testing.assert_allclose(rms, magnitude, rtol=1e-4)
    step = np.abs(np.diff(field[1], axis=0)).max()
    assert 0 < step < 0.5 * np.abs(field[1]).max()  # neighbours move together


STRONG = {"flip": {"p": 0.5}, "rotate": {"p": 1.0, "max_deg": [30.0, 30.0, 30.0]},
          "scale": {"p": 1.0, "range": [0.8, 1.25], "anisotropic": True},
          "elastic": {"p": 1.0, "magnitude_vox": [1.0, 2.0]}}


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
    volume = inputs.prepare_volume({"image": coordinates, "label": label, "class_locations": np.zeros((0, 3), np.int32),
                                    "class_location_counts": np.zeros(5, np.int32), "subject": "s"}, padding)
    middles = tf.constant([[15.0, 17.0, 13.5], [4.0, 30.0, 20.0], [25.5, 8.0, 3.0]])
    images, labels = (t.numpy() for t in inputs.patch_function(params)(volume, middles, SEED))
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
