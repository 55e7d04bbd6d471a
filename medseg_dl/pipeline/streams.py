"""Named random streams of the augmentation: each transform draws from its own stream of the patch
draw's stateless seed, so switching one transform on or off leaves the draws of the others unchanged.

A stream's index is fixed by its place in `STREAMS`: append new names at the end, never reorder, or
seeded runs stop reproducing. Every seed is a (2,) int tensor; the generator is Philox.
"""
import tensorflow as tf

ALG = "philox"  # explicit: XLA's automatic choice on CPU is far slower

STREAMS = {name: i for i, name in enumerate(
    ["flip", "rotate", "rotate_angle", "scale", "scale_factor", "elastic", "elastic_sigma", "elastic_magnitude",
     "elastic_control", "noise", "noise_std", "noise_field", "gamma", "gamma_value", "bc", "bc_brightness",
     "bc_contrast", "blur", "blur_sigma"])}


def stream(seed, name):
    """(2,) seed of the stream `name` of the draw seeded by `seed` (2,)."""
    return tf.random.experimental.stateless_fold_in(seed, STREAMS[name], alg=ALG)


def uniform(seed, name, shape, bounds):
    """float32 values of `shape`, uniform in [bounds[0], bounds[1]), from stream `name`."""
    low, high = float(bounds[0]), float(bounds[1])
    return tf.random.stateless_uniform(shape, stream(seed, name), low, high, alg=ALG)


def switch(seed, name, count, probability):
    """(S,) bool: apply the transform to each of `count` patches with `probability`."""
    return tf.random.stateless_uniform([count], stream(seed, name), alg=ALG) < probability
