"""Augmentation: exact crops, flips and 90-degree turns against numpy, elastic identity and magnitude,
image/label alignment under random warps, intensity transforms against numpy/scipy references."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage, stats

from medseg_dl.params import Params
from medseg_dl.pipeline import augment, sampling

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


def patches(centres, size, matrices=None, displacement=None, padding="constant"):
    middles = sampling.patch_middles(tf.constant(centres, tf.int32), size)
    coords = augment.sampling_coordinates(middles, size, matrices, displacement)
    return (augment.sample_linear(IMAGE, coords, padding).numpy(),
            augment.sample_nearest(LABEL, coords, padding).numpy())


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
    middles = sampling.patch_middles(tf.constant([[4, 5, 5]]), [6, 6, 6])
    coords = augment.random_coordinates(middles, aug_params(), [6, 6, 6], SEED).numpy()
    np.testing.assert_array_equal(coords, np.stack(np.meshgrid(*[np.arange(2, 8)] * 3, indexing="ij"), -1)[None]
                                  + np.array([-1, 0, 0]))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flip_equals_numpy_flip(axis):
    centre, size = [4, 5, 5], [6, 7, 5]
    flips = np.zeros((1, 3), bool)
    flips[0, axis] = True
    image, label = patches([centre], size, augment.flip_matrices(tf.constant(flips)))
    np.testing.assert_array_equal(image[0], np.flip(crop(IMAGE, centre, size, "constant"), axis))
    np.testing.assert_array_equal(label[0], np.flip(crop(LABEL, centre, size, "constant"), axis))


@pytest.mark.parametrize("axis,plane", [(0, (1, 2)), (1, (2, 0)), (2, (0, 1))])
def test_rotation_by_90_degrees_equals_numpy_rot90(axis, plane):
    centre, size = [4, 5, 5], [6, 6, 6]
    angles = np.zeros((1, 3), np.float32)
    angles[0, axis] = np.pi / 2
    image, label = patches([centre], size, augment.rotation_matrices(tf.constant(angles)))
    np.testing.assert_allclose(image[0], np.rot90(crop(IMAGE, centre, size, "constant"), 1, plane), atol=1e-5)
    np.testing.assert_array_equal(label[0], np.rot90(crop(LABEL, centre, size, "constant"), 1, plane))


def test_scale_factor_two_enlarges_about_the_middle():
    size = [5, 5, 5]
    image, _ = patches([[4, 5, 5]], size, augment.scale_matrices(tf.constant([[2.0, 2.0, 2.0]])))
    middle = sampling.patch_middles(tf.constant([[4, 5, 5]]), size).numpy()[0]
    offsets = (np.arange(5) - 2) / 2.0
    reference = ndimage.map_coordinates(IMAGE[..., 1], np.stack(np.meshgrid(
        *[middle[i] + offsets for i in range(3)], indexing="ij")), order=1)
    np.testing.assert_allclose(image[0, ..., 1], reference, atol=1e-5)


def test_elastic_with_zero_magnitude_and_scale_one_is_the_identity():
    aug = aug_params(elastic={"p": 1.0, "magnitude_vox": [0.0, 0.0]}, scale={"p": 1.0, "range": [1.0, 1.0]})
    centres, size = [[4, 5, 5], [2, 3, 1]], [6, 7, 5]
    middles = sampling.patch_middles(tf.constant(centres), size)
    coords = augment.random_coordinates(middles, aug, size, SEED)
    images = augment.sample_linear(IMAGE, coords, "constant").numpy()
    for s, centre in enumerate(centres):
        np.testing.assert_allclose(images[s], crop(IMAGE, centre, size, "constant"), atol=1e-6)


def test_elastic_displacement_has_the_requested_rms_and_is_smooth():
    magnitude = np.array([0.5, 2.0, 0.0], np.float32)
    control = tf.constant(RNG.normal(size=(3, 7, 7, 7, 3)).astype(np.float32))
    field = augment.elastic_displacement(control, tf.constant([5.0, 8.0, 6.0]), tf.constant(magnitude),
                                         [20, 24, 16]).numpy()
    assert field.shape == (3, 20, 24, 16, 3)
    rms = np.sqrt(np.mean(field ** 2, axis=(1, 2, 3, 4)))
    np.testing.assert_allclose(rms, magnitude, rtol=1e-4)
    step = np.abs(np.diff(field[1], axis=0)).max()
    assert 0 < step < 0.5 * np.abs(field[1]).max()  # neighbours move together


def blob_volume():
    """An anisotropic Gaussian blob (smooth image) and its thresholds as labels 0, 1, 2."""
    grid = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), -1).astype(np.float32)
    distance2 = (((grid - [20, 18, 21]) / [4.5, 3.0, 4.0]) ** 2).sum(-1)
    image = np.exp(-distance2 / 2)[..., None].astype(np.float32)
    return image, ((image[..., 0] > 0.4).astype(np.int32) + (image[..., 0] > 0.75))


STRONG = {"flip": {"p": 0.5}, "rotate": {"p": 1.0, "max_deg": [30.0, 30.0, 30.0]},
          "scale": {"p": 1.0, "range": [0.8, 1.25], "anisotropic": True},
          "elastic": {"p": 1.0, "magnitude_vox": [1.0, 2.0]}}


@pytest.mark.parametrize("padding", ["constant", "edge"])
def test_image_and_label_stay_aligned_and_labels_valid_under_random_warps(padding):
    image, label = blob_volume()
    size = [32, 32, 32]
    centres = tf.constant([[24, 15, 18], [17, 21, 23], [20, 18, 21], [4, 36, 20]], tf.int32)
    middles = sampling.patch_middles(centres, size)
    coords = augment.random_coordinates(middles, aug_params(**STRONG), size, SEED)
    images = augment.sample_linear(image, coords, padding).numpy()[..., 0]
    labels = augment.sample_nearest(label, coords, padding).numpy()
    assert set(np.unique(labels)) <= {0, 1, 2}
    thresholded = (images > 0.4).astype(np.int32) + (images > 0.75)
    for s in range(3):
        assert labels[s].max() == 2  # the blob is in view
        assert np.mean(labels[s] == thresholded[s]) >= 0.99
    assert np.mean(labels == thresholded) >= 0.99


def test_linear_sampling_matches_scipy_at_random_points():
    points = RNG.uniform(-2.0, 12.0, size=(500, 3)).astype(np.float32)
    ours = augment.sample_linear(IMAGE, tf.constant(points), "constant").numpy()
    for c in range(2):
        reference = ndimage.map_coordinates(np.pad(IMAGE[..., c], 1), points.T + 1, order=1, mode="constant")
        np.testing.assert_allclose(ours[:, c], reference, atol=1e-5)
    edge = augment.sample_linear(IMAGE, tf.constant(points), "edge").numpy()
    np.testing.assert_allclose(edge[:, 0], ndimage.map_coordinates(IMAGE[..., 0], points.T, order=1, mode="nearest"),
                               atol=1e-5)


def batch_of_patches():
    return tf.constant(RNG.normal(size=(3, 12, 10, 8, 2)).astype(np.float32))


def test_noise_has_the_requested_std_and_zero_std_is_exact():
    images = batch_of_patches()
    noise = tf.random.stateless_normal(images.shape, SEED)
    noisy = augment.add_noise(images, tf.constant([0.0, 0.1, 0.5]), noise).numpy()
    np.testing.assert_array_equal(noisy[0], images[0])
    for s, std in ((1, 0.1), (2, 0.5)):
        np.testing.assert_allclose(np.std(noisy[s] - images[s]), std, rtol=0.05)


def test_standard_normal_noise_is_gaussian_and_seeded():
    values = augment.standard_normal(tf.constant([50, 41, 49]), SEED).numpy()
    assert values.shape == (50, 41, 49) and values.dtype == np.float32
    assert abs(values.mean()) < 0.01 and abs(values.std() - 1.0) < 0.01
    assert stats.kstest(values.ravel()[::3], "norm").pvalue > 0.001
    np.testing.assert_array_equal(values, augment.standard_normal(tf.constant([50, 41, 49]), SEED).numpy())
    assert not np.array_equal(values, augment.standard_normal(tf.constant([50, 41, 49]), SEED + 1).numpy())


def test_gamma_keeps_the_range_and_matches_numpy():
    images = batch_of_patches().numpy()
    out = augment.adjust_gamma(images, tf.constant([1.0, 0.5, 2.0])).numpy()
    for s, gamma in enumerate([1.0, 0.5, 2.0]):
        low, high = images[s].min(axis=(0, 1, 2)), images[s].max(axis=(0, 1, 2))
        reference = ((images[s] - low) / (high - low)) ** gamma * (high - low) + low
        np.testing.assert_allclose(out[s], reference, atol=1e-5)
        np.testing.assert_allclose(out[s].min(axis=(0, 1, 2)), low, atol=1e-5)
        np.testing.assert_allclose(out[s].max(axis=(0, 1, 2)), high, atol=1e-5)


def test_brightness_contrast_matches_numpy():
    images = batch_of_patches().numpy()
    out = augment.brightness_contrast(images, tf.constant([0.0, 0.1, -0.2]), tf.constant([1.0, 1.2, 0.8])).numpy()
    for s, (shift, factor) in enumerate([(0.0, 1.0), (0.1, 1.2), (-0.2, 0.8)]):
        mean = images[s].mean(axis=(0, 1, 2))
        np.testing.assert_allclose(out[s], (images[s] - mean) * factor + mean + shift, atol=1e-5)


def test_blur_matches_scipy_and_zero_sigma_is_exact():
    images = batch_of_patches().numpy()
    sigmas = [0.0, 0.7, 1.0]
    out = augment.gaussian_blur(tf.constant(images), tf.constant(sigmas), radius_vox=3).numpy()
    np.testing.assert_array_equal(out[0], images[0])
    for s in (1, 2):
        for c in range(2):
            reference = ndimage.gaussian_filter(images[s, ..., c], sigmas[s], mode="reflect",
                                                truncate=3 / sigmas[s])
            np.testing.assert_allclose(out[s, ..., c], reference, atol=1e-5)


def test_per_patch_switches_follow_their_probability():
    images = tf.zeros([400, 2, 2, 2, 1])
    noisy = augment.random_intensity(images, aug_params(noise={"p": 0.3, "std": [0.5, 1.0]}), SEED).numpy()
    changed = np.any(noisy != 0, axis=(1, 2, 3, 4))
    assert 0.22 < changed.mean() < 0.38
    coords_on = augment.random_coordinates(tf.zeros([400, 3]), aug_params(flip={"p": 1.0, "axes": [1]}), [2, 2, 2],
                                           SEED).numpy()
    np.testing.assert_array_equal(coords_on[:, 0, 0, 0], np.tile([[-0.5, 0.5, -0.5]], (400, 1)))
