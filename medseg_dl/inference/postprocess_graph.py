"""The post-processing decision in TensorFlow ops, traced into the exported SavedModel (export.py).

It must equal inference/postprocess.py, the numpy reference (scipy.ndimage.label), voxel for voxel: the
same steps in the same order (largest component of the foreground, largest component of each listed
structure, removal of each structure's islands under its mm^3 threshold), 26-connectivity, the same
value for a removed voxel (0, or with regions the paint of `postprocess.structure_tables`), and among equally
large components the first (scipy numbers components in raster (C) order of their first voxel; numpy's
argmax takes the first).

Connected components: each foreground voxel starts with the id (its linear C index + 1); a 3x3x3
minimum over the ids of the mask (separable along x, y, z; background holds `NO_ID`) alternates with
pointer jumping (id <- id of the voxel that id names) until nothing changes. Ids only move within a
component and only decrease, so every voxel ends with the id of its component's first voxel in
raster order: the order of scipy's numbering. Ids are int32: volumes of fewer than 2^31 - 1 voxels.
"""
from typing import Callable, Dict

import tensorflow as tf

from medseg_dl.data.targets import Targets
from medseg_dl.inference.postprocess import structure_tables

NO_ID = tf.int32.max  # the id of background voxels: never the minimum of a neighbourhood with a foreground voxel


def _neighbourhood_min(ids: tf.Tensor) -> tf.Tensor:
    """The minimum (X, Y, Z) int32 of `ids` (X, Y, Z) int32 over each voxel's 3x3x3 neighbourhood (outside
    the volume counts as `NO_ID`): one minimum of three shifted slices per axis."""
    ids = tf.pad(ids, [[1, 1], [0, 0], [0, 0]], constant_values=NO_ID)
    ids = tf.minimum(tf.minimum(ids[:-2], ids[1:-1]), ids[2:])
    ids = tf.pad(ids, [[0, 0], [1, 1], [0, 0]], constant_values=NO_ID)
    ids = tf.minimum(tf.minimum(ids[:, :-2], ids[:, 1:-1]), ids[:, 2:])
    ids = tf.pad(ids, [[0, 0], [0, 0], [1, 1]], constant_values=NO_ID)
    return tf.minimum(tf.minimum(ids[:, :, :-2], ids[:, :, 1:-1]), ids[:, :, 2:])


def component_ids(mask: tf.Tensor) -> tf.Tensor:
    """The 26-connected components of `mask` (X, Y, Z) bool as ids (X, Y, Z) int32: each foreground voxel
    holds 1 + the linear C index of the first voxel (raster order) of its component; background `NO_ID`."""
    shape = tf.shape(mask)
    first_ids = tf.reshape(tf.range(1, tf.reduce_prod(shape) + 1, dtype=tf.int32), shape)

    def step(ids, _):
        lowered = tf.where(mask, _neighbourhood_min(ids), NO_ID)
        jumped = tf.gather(tf.reshape(lowered, [-1]), tf.where(mask, lowered, 1) - 1)
        new_ids = tf.where(mask, jumped, NO_ID)
        return new_ids, tf.reduce_any(new_ids != ids)

    ids, _ = tf.while_loop(lambda ids, changed: changed, step, (tf.where(mask, first_ids, NO_ID), tf.reduce_any(mask)))
    return ids


def component_sizes(mask: tf.Tensor):
    """(`component_ids(mask)` (X, Y, Z) int32, the size in voxels (X, Y, Z) int32 of each voxel's component,
    0 on background) of `mask` (X, Y, Z) bool."""
    ids = component_ids(mask)
    unique_ids, index = tf.unique(tf.boolean_mask(ids, mask))
    sizes = tf.math.unsorted_segment_sum(tf.ones_like(index), index, tf.size(unique_ids))
    return ids, tf.scatter_nd(tf.where(mask), tf.gather(sizes, index), tf.shape(mask, out_type=tf.int64))


def largest_component(mask: tf.Tensor) -> tf.Tensor:
    """The largest 26-connected component (X, Y, Z) bool of `mask` (X, Y, Z) bool, the first in raster order
    of equally large ones (postprocess.largest_component); an empty mask stays empty."""
    ids, voxel_sizes = component_sizes(mask)
    largest_id = tf.reduce_min(tf.where(mask & (voxel_sizes == tf.reduce_max(voxel_sizes)), ids, NO_ID))
    return mask & (ids == largest_id)


def remove_islands(mask: tf.Tensor, min_voxels: tf.Tensor) -> tf.Tensor:
    """`mask` (X, Y, Z) bool without its 26-connected components of fewer than `min_voxels` () float64
    voxels (postprocess.remove_islands: sizes compared as float64)."""
    _, voxel_sizes = component_sizes(mask)
    return mask & (tf.cast(voxel_sizes, tf.float64) >= min_voxels)


def apply(labels: tf.Tensor, decision: Dict, spacing_mm: tf.Tensor, targets: Targets) -> tf.Tensor:
    """`labels` (X, Y, Z) int32 in 0..255 after the steps of `decision` (postprocess.py format, read when tracing: a
    decision without steps adds no op), as postprocess.apply. spacing_mm: (3,) float32 voxel size in mm of
    the grid of `labels`, for the island thresholds in mm^3 (`voxel_mm3`); targets: the classes or regions
    that the decision's structure numbers name."""
    if decision.get("foreground_largest_component"):
        labels = tf.where(largest_component(labels > 0), labels, 0)
    for s in decision.get("largest_component_classes", []):
        labels = _filter_structure(labels, targets, int(s), largest_component)
    for s, threshold_mm3 in decision.get("min_island_mm3", {}).items():
        min_voxels = float(threshold_mm3) / voxel_mm3(spacing_mm)
        labels = _filter_structure(labels, targets, int(s), lambda mask: remove_islands(mask, min_voxels))
    return labels


def _filter_structure(labels: tf.Tensor, targets: Targets, structure: int,
                      keep: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """`labels` (X, Y, Z) int32 in 0..255 whose voxels of structure number `structure` outside keep(its mask
    (X, Y, Z) bool) leave it, taking their leaving value (`postprocess.structure_tables`)."""
    inside, leaving = structure_tables(targets, structure)
    mask = tf.gather(tf.constant(inside), labels)
    return tf.where(mask & ~keep(mask), tf.gather(tf.constant(leaving), labels), labels)


def voxel_mm3(spacing_mm: tf.Tensor) -> tf.Tensor:
    """The voxel volume () float64 in mm^3 of spacing_mm (3,) float32: x * y * z in float64, in this order
    (as postprocess.apply's np.prod of the same values in float64)."""
    spacing_mm = tf.cast(spacing_mm, tf.float64)
    return spacing_mm[0] * spacing_mm[1] * spacing_mm[2]
