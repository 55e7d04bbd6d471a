"""Sliding-window recombination in TensorFlow ops, slab by slab along x (accelerators, the SavedModel export).

The grid, padding, window positions, weights and window order are those of windows.py (`window_grid`):
a volume (X, Y, Z, C) smaller than the window along an axis is zero-padded symmetrically up to it, the
windows start at `window_starts` along each axis and are visited x-major. Here they are visited one row
at a time, a row being all the windows that share one x start, in batches of `batch_size` windows that
stay within the row. Once a row is added, no later window reaches below the next row's x start, so
that part of the accumulator is finished: it is cropped to the original region, turned into the
weighted average and passed through the per-voxel `transform` (softmax or sigmoid, arg-max or painting
of regions), then the accumulator moves on by the step. The live accumulator is (px, padded Y, padded
Z, K), one row of windows, not the volume: for a 512 x 512 x 600 CT, 14 classes and windows of 128
voxels along x, 1.9 GB of float32 (0.9 GB of float16) instead of 8.8 GB; the only volume-sized tensors
are the image and the result.

Accumulation "float32" adds the weighted window logits (weights of `importance_map`) and divides each
finished slab by the weight sum, the product of the three per-axis coverages: the values of the host
path of windows.py to float32 rounding. Accumulation "float16" halves the accumulator, for the
probabilities and labels (not the blended logits). Two changes keep it close:
- with `max_shift` (labels: softmax and arg-max), each window's logits are shifted per voxel by their
  maximum over the classes, which changes neither the softmax nor the arg-max of the weighted average
  (the same amount is subtracted from every class at a voxel) and keeps the values that decide them
  near 0, where float16 is finest; a sigmoid per region is not shift-invariant, so region logits are
  accumulated as they are (within 1e-3 of the float32 probabilities all the same);
- each window's weights are divided by the weight sum at each voxel in float32 before the cast (the
  coverages are known before the first window), so the accumulator holds the weighted average itself
  and every term lies between the window's shifted logits and 0. Accumulating the raw weights instead
  loses the borders: the Gaussian weight of a window corner is min_weight^3 = 1e-9, below float16's
  smallest value (6e-8), so a volume corner covered by one window would sum to 0.
The finished slab is cast back to float32 before the transform. Probabilities stay within about 1e-3
(6e-4 measured on logits up to +-20; 1.2e-3 on two BraTS subjects, benchmarks/accumulation.py); labels
are those of float32 accumulation except at near ties: float16
resolves a logit of 1 to 5e-4, so classes whose averages differ by less (1 voxel in 10^5 in the tests,
gaps under 4e-4) may swap.
"""
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from medseg_dl.inference.windows import importance_map, importance_profile
from medseg_dl.pipeline.sampling import patch_positions

ACCUMULATIONS = ("float32", "float16")
Transform = Callable[[tf.Tensor], tf.Tensor]


def window_starts_in_graph(size: tf.Tensor, window: int, overlap: float) -> tf.Tensor:
    """In-graph `window_starts`: int32 starts (n,) of windows of `window` voxels covering an axis of
    `size` (int32 scalar tensor, >= window), with numpy's float64 linspace arithmetic and round half to even."""
    span = tf.cast(size - window, tf.float64)
    count = tf.cast(tf.math.ceil(span / (window * (1.0 - overlap)) - 1e-9), tf.int32) + 1
    values = tf.range(count, dtype=tf.float64) * (span / tf.cast(tf.maximum(count - 1, 1), tf.float64))
    values = tf.concat([values[:-1], span[None]], 0)  # np.linspace ends exactly at its stop
    return tf.unique(tf.cast(tf.round(values), tf.int32))[0]


def axis_coverage_in_graph(starts: tf.Tensor, length: tf.Tensor, profile: np.ndarray) -> tf.Tensor:
    """In-graph `WindowGrid.coverage` of one axis: (length,) float32 sum of the 1D `profile` (P,) float32 of
    the windows starting at `starts` (n,) int32, summed in float64 as `window_grid` does."""
    index = tf.reshape(starts[:, None] + np.arange(len(profile), dtype=np.int32)[None], [-1, 1])
    updates = tf.tile(tf.constant(profile.astype(np.float64)), tf.shape(starts))
    return tf.cast(tf.tensor_scatter_nd_add(tf.zeros([length], tf.float64), index, updates), tf.float32)


class GraphGrid(NamedTuple):
    """The window grid of one image, as tensors (the in-graph `WindowGrid`).

    padded: (PX, PY, PZ, C) float32, the image zero-padded to at least the window; shape_vox: (3,) int32,
    the image's spatial shape; before_vox: (3,) int32, the padding before each axis; starts_vox: per axis
    x, y, z, (n_a,) int32 window starts in the padded volume; coverage: per axis, (padded length,) float32
    sum of the importance profiles of the windows (the weight sum at a voxel is their product);
    profiles: per axis, (p_a,) float32 numpy importance profile.
    """

    padded: tf.Tensor
    shape_vox: tf.Tensor
    before_vox: tf.Tensor
    starts_vox: List[tf.Tensor]
    coverage: List[tf.Tensor]
    profiles: List[np.ndarray]


def graph_grid(image: tf.Tensor, patch_size_vox: Sequence[int], overlap: float, blending: str) -> GraphGrid:
    """The `GraphGrid` of an image (X, Y, Z, C) float32 tensor for windows `patch_size_vox` (3,) ints."""
    patch = [int(p) for p in patch_size_vox]
    shape_vox = tf.shape(image)[:3]
    missing = tf.maximum(tf.constant(patch) - shape_vox, 0)
    before_vox = missing // 2
    padding = tf.stack([tf.concat([before_vox, [0]], 0), tf.concat([missing - before_vox, [0]], 0)], axis=1)
    padded = tf.ensure_shape(tf.pad(image, padding), [None, None, None, image.shape[-1]])  # C stays static
    padded_shape = tf.shape(padded)[:3]
    starts_vox = [window_starts_in_graph(padded_shape[a], patch[a], overlap) for a in range(3)]
    profiles = [importance_profile(p, blending) for p in patch]
    coverage = [axis_coverage_in_graph(starts_vox[a], padded_shape[a], profiles[a]) for a in range(3)]
    return GraphGrid(padded, shape_vox, before_vox, starts_vox, coverage, profiles)


def recombine_in_graph(window_function: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], image: tf.Tensor,
                       patch_size_vox: Sequence[int], overlap: float, blending: str, batch_size: int,
                       num_outputs: int, transform: Optional[Transform] = None,
                       accumulation: str = "float32", max_shift: bool = True) -> Any:
    """`transform` of the weighted average of the window outputs over an image, slab by slab along x.

    window_function: (windows (N, px, py, pz, C) float32, positions (N, 3) float32) -> logits
    (N, px, py, pz, K); image: (X, Y, Z, C) float32 tensor, C static, any X, Y, Z; patch_size_vox: (3,)
    window; overlap, blending: as `windows.window_grid`; batch_size: windows per call (a batch never
    spans two rows of windows); num_outputs: K; transform: per voxel over the last axis, (..., K) float32
    -> (..., [K']) any dtype (e.g. softmax -> float32 (..., K), argmax -> int32 (...)), or a tuple or dict
    of such (probabilities and labels from one pass over the windows); None returns the blended logits.
    accumulation: "float32" (sums of weighted logits) or "float16" (logits times normalised weights;
    ValueError with transform None); max_shift: with "float16", shift each window's logits by their maximum
    over K at each voxel first (the transform then sees the average less a per-voxel constant, so it must
    ignore one, as softmax and arg-max do; False for a sigmoid per region).
    Returns (X, Y, Z[, K']) with the transform's dtype and trailing axes (float32 (X, Y, Z, K) with None), or
    the transform's tuple or dict of such.
    Memory: one row of windows (px, PY, PZ, K) in the accumulation dtype, one batch, the result.
    """
    if accumulation not in ACCUMULATIONS:
        raise ValueError(f"accumulation = {accumulation!r}; expected one of {', '.join(ACCUMULATIONS)}")
    if accumulation == "float16" and transform is None:
        raise ValueError("accumulation = 'float16' keeps the probabilities and labels to 1e-3 but not the "
                         "blended logits (transform None): use accumulation = 'float32'")
    patch = tuple(int(p) for p in patch_size_vox)
    grid = graph_grid(image, patch, overlap, blending)
    finish = _slab_finisher(grid, transform, accumulation == "float16")
    add_row = _row_adder(window_function, grid, patch, blending, batch_size, num_outputs, accumulation, max_shift)
    starts_x = grid.starts_vox[0]
    num_rows = tf.size(starts_x)
    empty = tf.zeros([0, 0, 0, num_outputs], tf.float32)
    structure = empty if transform is None else transform(empty)  # the results' structure, dtypes, trailing axes
    probes = tf.nest.flatten(structure)
    shapes = [tf.TensorShape([None, None, None]).concatenate(probe.shape[3:]) for probe in probes]
    slabs = [tf.TensorArray(p.dtype, size=num_rows, infer_shape=False, element_shape=s) for p, s in zip(probes, shapes)]
    padded_shape = tf.shape(grid.padded)[:3]
    accumulator = tf.zeros(tf.concat([[patch[0]], padded_shape[1:], [num_outputs]], 0), tf.as_dtype(accumulation))
    accumulator.set_shape([patch[0], None, None, num_outputs])

    def next_row(row, accumulator, slabs):
        x_vox = starts_x[row]
        accumulator = add_row(x_vox, accumulator)
        step_vox = tf.where(row + 1 < num_rows, starts_x[tf.minimum(row + 1, num_rows - 1)] - x_vox, patch[0])
        finished = tf.nest.flatten(finish(accumulator[:step_vox], x_vox))
        slabs = [array.write(row, slab) for array, slab in zip(slabs, finished)]
        accumulator = tf.concat([accumulator[step_vox:], tf.zeros_like(accumulator[:step_vox])], 0)
        return row + 1, tf.ensure_shape(accumulator, [patch[0], None, None, num_outputs]), slabs

    _, _, slabs = tf.while_loop(lambda row, *_: row < num_rows, next_row, [tf.constant(0), accumulator, slabs])
    results = [tf.ensure_shape(array.concat(), shape) for array, shape in zip(slabs, shapes)]
    return tf.nest.pack_sequence_as(structure, results)


def _slab_finisher(grid: GraphGrid, transform: Optional[Transform], normalised: bool):
    """finish(sums (n, PY, PZ, K), x_vox) -> transform(weighted average) of the original voxels among the
    padded rows [x_vox, x_vox + n): (n', Y, Z[, K']), n' <= n. normalised: the sums are already averages
    (float16 accumulation), else they are divided by the weight sum (the product of the coverages)."""
    shape, before = grid.shape_vox, grid.before_vox

    def finish(sums, x_vox):
        first = tf.clip_by_value(before[0] - x_vox, 0, tf.shape(sums)[0])
        last = tf.clip_by_value(before[0] + shape[0] - x_vox, first, tf.shape(sums)[0])
        region = tf.cast(sums[first:last, before[1]:before[1] + shape[1], before[2]:before[2] + shape[2]], tf.float32)
        if not normalised:
            cx, cy, cz = (tf.slice(c, [b], [s]) for c, b, s in
                          zip(grid.coverage, (x_vox + first, before[1], before[2]), (last - first, shape[1], shape[2])))
            region = region / (cx[:, None, None] * cy[None, :, None] * cz[None, None, :])[..., None]
        return region if transform is None else transform(region)

    return finish


def _row_adder(window_function, grid: GraphGrid, patch: tuple, blending: str, batch_size: int, num_outputs: int,
               accumulation: str, max_shift: bool):
    """add_row(x_vox, accumulator (px, PY, PZ, K)) -> the accumulator plus the weighted outputs of the
    windows starting at x_vox (all y, z starts, y-major, in batches of `batch_size`), local x 0 = x_vox."""
    num_channels = int(grid.padded.shape[-1])
    yz_starts = tf.reshape(tf.stack(tf.meshgrid(grid.starts_vox[1], grid.starts_vox[2], indexing="ij"), -1), [-1, 2])
    num_windows = tf.shape(yz_starts)[0]
    offsets = tf.constant(np.stack(np.meshgrid(*[np.arange(p) for p in patch], indexing="ij"), -1).reshape(-1, 3),
                          tf.int32)
    weigh = _normalised_weigher(grid, patch, max_shift) if accumulation == "float16" else _weigher(patch, blending)
    window_spec = tf.TensorSpec(list(patch) + [num_channels], tf.float32)

    def add_row(x_vox, accumulator):
        row = tf.slice(grid.padded, tf.stack([x_vox, 0, 0, 0]), [patch[0], -1, -1, -1])

        def add_batch(begin, accumulator):
            batch_yz = yz_starts[begin:begin + batch_size]
            cut = tf.map_fn(lambda s: tf.slice(row, tf.concat([[0], s, [0]], 0), window_spec.shape), batch_yz,
                            fn_output_signature=window_spec)
            local_starts = tf.pad(batch_yz, [[0, 0], [1, 0]])  # x 0: the accumulator's first row
            starts = local_starts + tf.stack([x_vox, 0, 0])
            logits = tf.cast(window_function(cut, patch_positions(starts - grid.before_vox, patch, grid.shape_vox)),
                             tf.float32)
            values = tf.cast(weigh(logits, x_vox, batch_yz), accumulator.dtype)
            index = tf.reshape(local_starts[:, None, :] + offsets[None], [-1, 3])
            values = tf.reshape(values, [-1, num_outputs])
            return begin + batch_size, tf.tensor_scatter_nd_add(accumulator, index, values)

        return tf.while_loop(lambda begin, _: begin < num_windows, add_batch, [tf.constant(0), accumulator])[1]

    return add_row


def _weigher(patch: tuple, blending: str):
    """weigh(logits (N, px, py, pz, K) float32, x_vox, yz) -> logits times the importance map (px, py, pz)."""
    weights = tf.constant(importance_map(patch, blending)[..., None])
    return lambda logits, x_vox, yz: logits * weights


def _normalised_weigher(grid: GraphGrid, patch: tuple, max_shift: bool):
    """weigh(logits (N, px, py, pz, K) float32, x_vox, yz (N, 2) int32) -> the logits (less their max over K
    with `max_shift`) times the window's weights divided by the weight sum at each voxel, float32
    (N, px, py, pz, K)."""
    profiles = [tf.constant(p) for p in grid.profiles]
    ranges = [np.arange(p, dtype=np.int32) for p in patch]

    def weigh(logits, x_vox, yz):
        if max_shift:
            logits = logits - tf.reduce_max(logits, axis=-1, keepdims=True)
        wx = profiles[0] / tf.gather(grid.coverage[0], x_vox + ranges[0])  # (px,)
        wy = profiles[1] / tf.gather(grid.coverage[1], yz[:, :1] + ranges[1])  # (N, py)
        wz = profiles[2] / tf.gather(grid.coverage[2], yz[:, 1:] + ranges[2])  # (N, pz)
        weights = wx[None, :, None, None] * wy[:, None, :, None] * wz[:, None, None, :]
        return logits * weights[..., None]

    return weigh
