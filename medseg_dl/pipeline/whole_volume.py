"""Deformation of a whole volume (offline augmentation, or wherever the full deformed image is needed):
one rotation and one smooth random elastic field, with the patch machinery of spatial.py.

The whole volume is spatial.py's patch: one sampling grid of the volume's shape around its middle
((n - 1) / 2 voxels per axis), mapped through the rotation's sampling matrix (in mm: S^-1 M S on
voxels), plus an elastic displacement from a coarse control grid spanning the volume
(`spatial.elastic_displacement`, computed once), sampled linearly for the image channels and nearest
for a label map. Directions, units and padding are those of spatial.py. The output is made in slabs
along x, one XLA-compiled call each (one compilation per volume shape, under a second), so that the
memory beyond input and output is the border-padded copy of the volume, the displacement field (12
bytes per voxel) and one slab's coordinates and samples.
"""
import functools

import numpy as np
import tensorflow as tf

from medseg_dl.errors import DataError
from medseg_dl.pipeline import spatial
from medseg_dl.pipeline.streams import ALG, stream

SLAB_VOXELS = 1 << 19  # output voxels per slab (6 MB of coordinates)


def volume_warp(shape_vox, *, spacing_mm=(1.0, 1.0, 1.0), rotation_deg=(0.0, 0.0, 0.0), elastic_sigma_mm=6.5,
                elastic_magnitude_mm=2.0, elastic_grid_points=7, seed=0):
    """(matrix (3, 3) float32, displacement (X, Y, Z, 3) float32 or None) of a volume of `shape_vox` (3
    ints) on voxels of `spacing_mm` (3 floats): the voxel sampling matrix of the rotation by `rotation_deg`
    (3 floats, degrees about x, then y, then z) and the elastic displacement in voxels (None for magnitude
    0): `elastic_grid_points`^3 standard normal control points of the stream "elastic_control" of the
    stateless seed (seed, 0), smoothed by a Gaussian of `elastic_sigma_mm` mm, RMS `elastic_magnitude_mm`
    mm (over the voxels and the 3 components)."""
    spacing = tf.constant(spacing_mm, tf.float32)
    angles = tf.constant(np.deg2rad([rotation_deg]), tf.float32)
    matrix = spatial.voxel_matrices(spatial.rotation_matrices(angles), spacing)[0]
    if elastic_magnitude_mm == 0:
        return matrix, None
    points = elastic_grid_points
    control = tf.random.stateless_normal([1, points, points, points, 3],
                                         stream(tf.constant([seed, 0], tf.int64), "elastic_control"), alg=ALG)
    displacement = spatial.elastic_displacement(control, tf.constant([elastic_sigma_mm], tf.float32),
                                                tf.constant([elastic_magnitude_mm], tf.float32),
                                                list(shape_vox), spacing)
    return matrix, displacement[0]


def slab_coordinates(shape_vox, x_start, rows, matrix, displacement):
    """(rows, Y, Z, 3) float32 input voxel coordinates of the output voxels x_start .. x_start + rows - 1
    of a volume of `shape_vox` (3 ints) under `volume_warp`'s matrix (3, 3) and the same rows of its
    displacement, (rows, Y, Z, 3) float32 or None. x_start: int or int32 scalar."""
    middle_vox = (tf.constant(shape_vox, tf.float32) - 1.0) / 2.0
    slab_offset = tf.cast(x_start, tf.float32) + (rows - 1) / 2.0 - middle_vox[0]  # slab middle, from the middle
    middle = middle_vox + slab_offset * matrix[:, 0]
    if displacement is not None:
        displacement = displacement[None]
    return spatial.sampling_coordinates(middle[None], [rows, *shape_vox[1:]], matrix[None], displacement)[0]


@functools.lru_cache(maxsize=None)
def _slab_function(shape_vox, rows, padding, with_label):
    """The XLA-compiled sampler of slabs of `rows` x-rows of a volume of `shape_vox`: (flat image, flat
    label or None, matrix, displacement rows or None, x_start) -> (image slab (rows, Y, Z, C) float32,
    label slab (rows, Y, Z) int32 or None). Kept, so that later volumes of that shape reuse it; x_start is
    a tensor argument, so one compilation serves every slab (the displacement comes sliced: a slice inside
    would compile once per x_start). XLA makes `deform_volume` 3x faster than plain TF ops on 2 CPU cores."""
    @tf.function(jit_compile=True, autograph=False)
    def sample(flat_image, flat_label, matrix, displacement, x_start):
        coords = slab_coordinates(shape_vox, x_start, rows, matrix, displacement)
        shape = tf.constant(shape_vox, tf.int32)
        image = spatial.sample_linear_flat(flat_image, shape, coords, padding)
        label = spatial.sample_nearest_flat(flat_label, shape, coords, padding) if with_label else None
        return image, label

    return sample


def _checked(image, label, padding):
    image = np.asarray(image)
    if image.ndim != 4:
        raise DataError(f"the image to deform has shape {image.shape}; expected (X, Y, Z, C) channels-last "
                        f"(add a trailing channel axis to a single-channel volume)")
    if label is not None and np.shape(label) != image.shape[:3]:
        raise DataError(f"the label map has shape {np.shape(label)}; expected the image's {image.shape[:3]}")
    if padding not in ("constant", "edge"):
        raise ValueError(f"padding {padding!r}: expected 'constant' or 'edge'")
    label = None if label is None else np.asarray(label).astype(np.int32, copy=False)
    return image.astype(np.float32, copy=False), label


def deform_volume(image, label=None, *, spacing_mm=(1.0, 1.0, 1.0), rotation_deg=(0.0, 0.0, 0.0),
                  elastic_sigma_mm=6.5, elastic_magnitude_mm=2.0, elastic_grid_points=7, seed=0,
                  padding="constant", slab_voxels=SLAB_VOXELS):
    """(image (X, Y, Z, C) float32, label (X, Y, Z) int32 or None): `image` (X, Y, Z, C) sampled linearly
    and `label` (X, Y, Z) ints (or None) nearest under one rotation and one elastic field (`volume_warp`,
    deterministic for a `seed` int). padding: "constant" (image 0, label 0) or "edge"; slab_voxels: output
    voxels computed per call (the memory of one slab's coordinates and samples, not the result)."""
    image, label = _checked(image, label, padding)
    shape_vox = list(image.shape[:3])
    matrix, displacement = volume_warp(shape_vox, spacing_mm=spacing_mm, rotation_deg=rotation_deg,
                                       elastic_sigma_mm=elastic_sigma_mm, elastic_magnitude_mm=elastic_magnitude_mm,
                                       elastic_grid_points=elastic_grid_points, seed=seed)
    flat_image, _ = spatial.flatten_padded(image, padding)
    flat_label = None if label is None else spatial.flatten_padded(label, padding)[0]
    rows = min(shape_vox[0], max(1, slab_voxels // (shape_vox[1] * shape_vox[2])))
    sample = _slab_function(tuple(shape_vox), rows, padding, label is not None)
    out_image = np.empty(image.shape, np.float32)
    out_label = None if label is None else np.empty(shape_vox, np.int32)
    for x_start in range(0, shape_vox[0], rows):
        x_start = min(x_start, shape_vox[0] - rows)  # the last slab overlaps its neighbour: one slab size
        rows_displacement = None if displacement is None else displacement[x_start:x_start + rows]
        slab_image, slab_label = sample(flat_image, flat_label, matrix, rows_displacement,
                                        tf.constant(x_start, tf.int32))
        out_image[x_start:x_start + rows] = slab_image.numpy()
        if label is not None:
            out_label[x_start:x_start + rows] = slab_label.numpy()
    return out_image, out_label
