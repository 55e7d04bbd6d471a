"""Intensity augmentation against numpy/scipy references, seeded noise, per-patch switches."""
import numpy as np
import tensorflow as tf
from scipy import ndimage, stats

from medseg_dl.config.params import Params
from medseg_dl.pipeline import intensity

SEED = tf.constant([3, 5], tf.int64)
RNG = np.random.default_rng(0)


def aug_params(**sections):
    return Params.from_dict({"augmentation": sections}).augmentation


def random_intensity(images, aug, seed):
    return intensity.apply_intensity(images, aug, intensity.draw_intensity(aug, tf.shape(images), seed))


def batch_of_patches():
    return tf.constant(RNG.normal(size=(3, 12, 10, 8, 2)).astype(np.float32))


def test_noise_has_the_requested_std_and_zero_std_is_exact():
    images = batch_of_patches()
    noise = tf.random.stateless_normal(images.shape, SEED)
    noisy = intensity.add_noise(images, tf.constant([0.0, 0.1, 0.5]), noise).numpy()
    np.testing.assert_array_equal(noisy[0], images[0])
    for s, std in ((1, 0.1), (2, 0.5)):
        np.testing.assert_allclose(np.std(noisy[s] - images[s]), std, rtol=0.05)


def test_standard_normal_noise_is_gaussian_and_seeded():
    values = intensity.standard_normal(tf.constant([50, 41, 49]), SEED).numpy()
    assert values.shape == (50, 41, 49) and values.dtype == np.float32
    assert abs(values.mean()) < 0.01 and abs(values.std() - 1.0) < 0.01
    assert stats.kstest(values.ravel()[::3], "norm").pvalue > 0.001
    np.testing.assert_array_equal(values, intensity.standard_normal(tf.constant([50, 41, 49]), SEED).numpy())
    assert not np.array_equal(values, intensity.standard_normal(tf.constant([50, 41, 49]), SEED + 1).numpy())


def test_gamma_keeps_the_range_and_matches_numpy():
    images = batch_of_patches().numpy()
    out = intensity.adjust_gamma(images, tf.constant([1.0, 0.5, 2.0])).numpy()
    for s, gamma in enumerate([1.0, 0.5, 2.0]):
        low, high = images[s].min(axis=(0, 1, 2)), images[s].max(axis=(0, 1, 2))
        reference = ((images[s] - low) / (high - low)) ** gamma * (high - low) + low
        np.testing.assert_allclose(out[s], reference, atol=1e-5)
        np.testing.assert_allclose(out[s].min(axis=(0, 1, 2)), low, atol=1e-5)
        np.testing.assert_allclose(out[s].max(axis=(0, 1, 2)), high, atol=1e-5)


def test_brightness_contrast_matches_numpy():
    images = batch_of_patches().numpy()
    out = intensity.brightness_contrast(images, tf.constant([0.0, 0.1, -0.2]), tf.constant([1.0, 1.2, 0.8])).numpy()
    for s, (shift, factor) in enumerate([(0.0, 1.0), (0.1, 1.2), (-0.2, 0.8)]):
        mean = images[s].mean(axis=(0, 1, 2))
        np.testing.assert_allclose(out[s], (images[s] - mean) * factor + mean + shift, atol=1e-5)


def test_blur_matches_scipy_and_zero_sigma_is_exact():
    images = batch_of_patches().numpy()
    sigmas = [0.0, 0.7, 1.0]
    out = intensity.gaussian_blur(tf.constant(images), tf.constant(sigmas), radius_vox=3).numpy()
    np.testing.assert_array_equal(out[0], images[0])
    for s in (1, 2):
        for c in range(2):
            reference = ndimage.gaussian_filter(images[s, ..., c], sigmas[s], mode="reflect",
                                                truncate=3 / sigmas[s])
            np.testing.assert_allclose(out[s, ..., c], reference, atol=1e-5)


def test_per_patch_switches_follow_their_probability():
    images = tf.zeros([400, 2, 2, 2, 1])
    noisy = random_intensity(images, aug_params(noise={"p": 0.3, "std": [0.5, 1.0]}), SEED).numpy()
    changed = np.any(noisy != 0, axis=(1, 2, 3, 4))
    assert 0.22 < changed.mean() < 0.38
