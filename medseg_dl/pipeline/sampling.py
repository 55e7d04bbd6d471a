"""Patch centres (uniform, or class-balanced over stored class locations) and patch positions (TF ops).

A centre is an integer voxel (x, y, z). The patch drawn around centre `c` starts at
`c - patch // 2` on each axis and covers `patch` voxels, so it always contains `c`; its geometric
middle is `start + (patch - 1) / 2` (a half voxel before `c` for even sizes). Rotations and flips
turn about the middle, and the position a network is given (`patch_positions`) is the middle
divided by (shape - 1): the one rule for training patches and inference windows alike. A patch
or window mirrored on an axis gets the mirrored position 1 - p there (`mirror_positions`).
All randomness is stateless: a `seed` is an int32/int64 tensor of shape (2,).
"""
import tensorflow as tf


def uniform_centres(shape_vox, count, seed):
    """(count, 3) int32 voxels drawn uniformly from a volume of spatial shape `shape_vox` (3,) int32."""
    unit = tf.random.stateless_uniform([count, 3], seed, dtype=tf.float32)
    shape = tf.cast(shape_vox, tf.float32)
    return tf.minimum(tf.cast(tf.floor(unit * shape), tf.int32), tf.cast(shape_vox, tf.int32) - 1)


def class_weights(class_location_counts, class_probabilities=None):
    """(K,) float32 weights of drawing each class: `class_probabilities` (K floats; None: equal)
    with classes that have no stored location set to 0. Not normalised; may be all zero."""
    present = tf.cast(class_location_counts > 0, tf.float32)
    if class_probabilities is None:
        return present
    return present * tf.constant(class_probabilities, tf.float32)


def class_balanced_centres(class_locations, class_location_counts, weights, count, seed, fallback):
    """(count, 3) int32 centres: a class drawn with `weights` (K,) float32 (not normalised; zero where a class has
    no stored location), then one of its stored locations uniformly; `fallback(seed)` gives the centres when
    every weight is zero. class_locations (M, 3) int32 sorted by class; class_location_counts (K,) int32."""
    class_seed, member_seed, fallback_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))

    def located():
        classes = tf.random.stateless_categorical(tf.math.log(weights)[None], count, class_seed,
                                                  dtype=tf.int32)[0]
        counts = tf.gather(class_location_counts, classes)
        starts = tf.gather(tf.cumsum(class_location_counts, exclusive=True), classes)
        unit = tf.random.stateless_uniform([count], member_seed, dtype=tf.float32)
        members = tf.minimum(tf.cast(unit * tf.cast(counts, tf.float32), tf.int32), counts - 1)
        return tf.gather(class_locations, starts + members)

    return tf.cond(tf.reduce_sum(weights) > 0, located, lambda: fallback(fallback_seed))


def patch_centres(volume, sampling_params, count, seed, ignore_label=None):
    """(count, 3) int32 centres for one volume dict (pipeline/inputs.py `read_case`), following
    `sampling.class_probabilities`: [] uniform; null equal over present classes; a list per class
    (classes absent from the volume renormalised away; none present: uniform).

    With an `ignore_label` no centre is an ignored voxel: "uniform" is then uniform over the annotated
    voxels, a class drawn in proportion to its voxels in the volume (volume["class_voxels"] (K,)) and
    then one of its stored locations."""
    def uniform(uniform_seed):
        if ignore_label is None:
            return uniform_centres(volume["shape"], count, uniform_seed)
        counts = volume["class_location_counts"]
        annotated = tf.cast(counts > 0, tf.float32) * tf.cast(volume["class_voxels"], tf.float32)
        return class_balanced_centres(volume["class_locations"], counts, annotated, count, uniform_seed,
                                      lambda s: uniform_centres(volume["shape"], count, s))

    probabilities = sampling_params.class_probabilities
    if probabilities is not None and len(probabilities) == 0:
        return uniform(seed)
    counts = volume["class_location_counts"]
    return class_balanced_centres(volume["class_locations"], counts, class_weights(counts, probabilities), count,
                                  seed, uniform)


def patch_starts(centres, patch_size_vox):
    """(S, 3) int32 first voxel of each patch around `centres` (S, 3) int32: centre - patch // 2."""
    return centres - tf.constant([p // 2 for p in patch_size_vox], tf.int32)


def patch_middles(starts_vox, patch_size_vox):
    """(S, 3) float32 geometric middle of each patch starting at `starts_vox` (S, 3) int:
    start + (patch - 1) / 2 voxels."""
    offset = tf.constant([(p - 1) / 2 for p in patch_size_vox], tf.float32)
    return tf.cast(starts_vox, tf.float32) + offset


def patch_positions(starts_vox, patch_size_vox, shape_vox):
    """(S, 3) float32 positions in [0, 1] of patches starting at `starts_vox` (S, 3) int (voxels of a
    volume of spatial shape `shape_vox` (3,); a start may be negative where the patch reaches past the
    border): the geometric middle start + (patch - 1) / 2 divided by (shape - 1) per axis (0 on a
    1-voxel axis), clipped to [0, 1]. MedPatchNet's position input, for training and inference."""
    extent = tf.maximum(tf.cast(shape_vox, tf.float32) - 1.0, 1.0)
    return tf.clip_by_value(patch_middles(starts_vox, patch_size_vox) / extent, 0.0, 1.0)


def mirror_positions(positions, flips):
    """(S, 3) float32 positions of patches whose content is mirrored on the axes where `flips` ((S, 3) or
    (3,) bool) is true: 1 - p there (the mirrored anatomy's side), p elsewhere. positions (S, 3) float32
    in [0, 1] (`patch_positions`)."""
    return tf.where(flips, 1.0 - positions, positions)
