"""Intensity augmentation of image patches in TF ops: Gaussian blur, brightness/contrast, gamma and
additive Gaussian noise, each switched per patch by its own draw (streams.py).

The random parameters are small tensors drawn with plain TF ops (`draw_intensity`; the noise field
is drawn from its seed inside the transform); `apply_intensity` is a deterministic function of them,
XLA-compiled by the pipeline.
"""
import numpy as np
import tensorflow as tf
from scipy import special

from medseg_dl.pipeline.streams import ALG, stream, switch, uniform

# --- intensity transforms (image patches only) --------------------------------------------------


def _per_patch(values):
    """(S,) -> (S, 1, 1, 1, 1) to broadcast over (S, px, py, pz, C)."""
    return tf.reshape(values, [-1, 1, 1, 1, 1])


def _normal_quantiles(levels=65536):
    """(levels,) float32 standard normal quantiles at (i + 0.5) / levels, rescaled to unit variance."""
    quantiles = special.ndtri((np.arange(levels) + 0.5) / levels)
    return (quantiles / quantiles.std()).astype(np.float32)


NORMAL_QUANTILES = _normal_quantiles()


def standard_normal(shape, seed):
    """Gaussian noise of `shape` (1-D int tensor), float32, mean 0 and variance 1: 16-bit uniform
    integers (two per stateless Philox uint32) looked up in 65,536 equiprobable normal quantiles
    (inverse-CDF sampling; |values| <= 4.2). About 3x faster on CPU than Box-Muller, and for additive
    augmentation noise indistinguishable from it."""
    count = tf.reduce_prod(shape)
    bits = tf.random.stateless_uniform([(count + 1) // 2], seed, minval=None, maxval=None, dtype=tf.uint32,
                                       alg=ALG)
    halves = tf.stack([tf.bitwise.bitwise_and(bits, 0xFFFF), tf.bitwise.right_shift(bits, 16)], axis=-1)
    index = tf.reshape(tf.cast(halves, tf.int32), [-1])[:count]
    return tf.reshape(tf.gather(NORMAL_QUANTILES, index), shape)


def add_noise(images, std, noise):
    """images (S, px, py, pz, C) float32 plus `noise` (same shape, standard normal) scaled by `std` (S,)
    float32 (intensity units; 0 leaves a patch exactly unchanged)."""
    return images + _per_patch(std) * noise


def adjust_gamma(images, gamma):
    """images (S, px, py, pz, C) float32 with x -> x^gamma applied per patch and channel to values
    min-max rescaled to [0, 1], then mapped back to the original range. gamma (S,) float32 > 0."""
    low = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
    span = tf.maximum(tf.reduce_max(images, axis=[1, 2, 3], keepdims=True) - low, 1e-8)
    return tf.pow((images - low) / span, _per_patch(gamma)) * span + low


def brightness_contrast(images, brightness, contrast):
    """images (S, px, py, pz, C) float32 scaled by `contrast` (S,) about each patch's channel mean, then
    shifted by `brightness` (S,) (intensity units)."""
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    return (images - mean) * _per_patch(contrast) + mean + _per_patch(brightness)


def gaussian_blur(images, sigma_vox, radius_vox):
    """images (S, px, py, pz, C) float32 smoothed by a separable Gaussian of `sigma_vox` (S,) float32
    voxels per patch (0: unchanged), truncated at `radius_vox` (int) voxels, borders mirrored."""
    taps = tf.range(-radius_vox, radius_vox + 1, dtype=tf.float32)
    sigma = tf.maximum(sigma_vox, 1e-3)[:, None]
    kernel = tf.exp(-tf.square(taps)[None] / (2.0 * tf.square(sigma)))
    kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)  # (S, 2r + 1)
    for axis in (1, 2, 3):
        size = images.shape[axis]
        radius = min(radius_vox, size - 1)
        weights = kernel[:, radius_vox - radius: radius_vox + radius + 1]
        weights = weights / tf.reduce_sum(weights, axis=1, keepdims=True)
        pads = [[0, 0]] * 5
        pads[axis] = [radius, radius]
        padded = tf.pad(images, pads, mode="SYMMETRIC")
        blurred = 0.0
        for tap in range(2 * radius + 1):
            begin, extent = [0] * 5, [-1] * 5
            begin[axis], extent[axis] = tap, size
            blurred += _per_patch(weights[:, tap]) * tf.slice(padded, begin, extent)
        images = blurred
    return images


# --- random intensity parameters ----------------------------------------------------------------


def intensity_enabled(aug):
    """Whether any intensity transform (blur, brightness/contrast, gamma, noise) has p > 0."""
    return any(aug[name].p > 0 for name in ("blur", "brightness_contrast", "gamma", "noise"))


def draw_intensity(aug, image_shape, seed):
    """Random intensity parameters for patches of `image_shape` (S, px, py, pz, C), as a dict with the
    keys of the transforms that have p > 0: "blur_sigma_vox" (S,) (0: off); "brightness", "contrast",
    "gamma" (S,) float32 with "brightness_contrast_on", "gamma_on" (S,) bool; "noise_std" (S,) (0: off)
    and "noise_seed" (2,) of the noise field (see `standard_normal`)."""
    count, drawn = image_shape[0], {}
    if aug.blur.p > 0:
        sigma = uniform(seed, "blur_sigma", [count], aug.blur.sigma_vox)
        drawn["blur_sigma_vox"] = tf.where(switch(seed, "blur", count, aug.blur.p), sigma, 0.0)
    if aug.brightness_contrast.p > 0:
        bc = aug.brightness_contrast
        drawn["brightness_contrast_on"] = switch(seed, "bc", count, bc.p)
        drawn["brightness"] = uniform(seed, "bc_brightness", [count], bc.brightness)
        drawn["contrast"] = uniform(seed, "bc_contrast", [count], bc.contrast)
    if aug.gamma.p > 0:
        drawn["gamma_on"] = switch(seed, "gamma", count, aug.gamma.p)
        drawn["gamma"] = uniform(seed, "gamma_value", [count], aug.gamma.range)
    if aug.noise.p > 0:
        std = uniform(seed, "noise_std", [count], aug.noise.std)
        drawn["noise_std"] = tf.where(switch(seed, "noise", count, aug.noise.p), std, 0.0)
        drawn["noise_seed"] = stream(seed, "noise_field")
    return drawn


def apply_intensity(images, aug, drawn):
    """images (S, px, py, pz, C) float32 through blur, brightness/contrast, gamma and noise, in this
    order, with the parameters `drawn` (see `draw_intensity`); patches switched off stay unchanged."""
    if "blur_sigma_vox" in drawn:
        images = gaussian_blur(images, drawn["blur_sigma_vox"], int(np.ceil(3.0 * max(aug.blur.sigma_vox))))
    if "brightness_contrast_on" in drawn:
        changed = brightness_contrast(images, drawn["brightness"], drawn["contrast"])
        images = tf.where(_per_patch(drawn["brightness_contrast_on"]), changed, images)
    if "gamma_on" in drawn:
        images = tf.where(_per_patch(drawn["gamma_on"]), adjust_gamma(images, drawn["gamma"]), images)
    if "noise_seed" in drawn:
        images = add_noise(images, drawn["noise_std"], standard_normal(tf.shape(images), drawn["noise_seed"]))
    return images
