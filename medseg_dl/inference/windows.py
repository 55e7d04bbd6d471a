"""Sliding-window geometry: window grid, importance weights, extraction and weighted recombination.

Whole-volume prediction cuts a volume (X, Y, Z, C) into overlapping windows of `patch_size_vox`,
maps each batch of windows through a TF function and recombines the outputs into one volume by a
weighted average. A volume smaller than the window along an axis is first padded symmetrically with
zeros up to the window. Window starts along an axis of (padded) size S for a window P are
`round(linspace(0, S - P, n))` with `n = ceil((S - P) / (P * (1 - overlap))) + 1`: evenly spread,
the first at 0 and the last touching the far border.

Weights are separable: the 3D importance map is the outer product of one 1D profile per axis
(Gaussian with sigma = P / 8, or constant), each normalised to max 1 and clipped below at
`min_weight`. The grid being a Cartesian product of per-axis starts, the sum of the weights of all
windows at a voxel is the product of three 1D coverage sums (`WindowGrid.coverage`), so no
weight-sum volume is ever stored.

Windows are cut out on the host (numpy views, stacked one batch at a time) and each batch goes
through a TF function (the network, on the GPU when there is one). Its outputs are weighted and
added into a host numpy accumulator in place: on a CPU this is 3-10x faster than the TF
alternatives measured (tensor_scatter_nd_add, padding each window, strided-slice updates or XLA
dynamic-update-slice inside a TF while loop, TF broadcast multiplies), and memory stays at the
accumulator plus one batch. The division by the weight sum and an optional per-voxel transform
(softmax, argmax) then run XLA-fused over slabs of the accumulator.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from medseg_dl.config import schema
from medseg_dl.pipeline.sampling import patch_positions

SLAB_VALUES = 1 << 22  # accumulator values per slab of the final pass (16 MB of float32)


def window_starts(size_vox: int, window_vox: int, overlap: float) -> np.ndarray:
    """Start indices (n,) int64 of windows of `window_vox` covering an axis of `size_vox` >= window.

    Consecutive windows overlap by at least `overlap` (fraction of the window); the first starts at
    0 and the last ends at `size_vox`.
    """
    if size_vox < window_vox:
        raise ValueError(f"axis of {size_vox} voxels is smaller than the window ({window_vox}); pad it first")
    schema.check("evaluation.overlap", overlap)
    step_vox = window_vox * (1.0 - overlap)
    num = int(np.ceil((size_vox - window_vox) / step_vox - 1e-9)) + 1
    return np.unique(np.round(np.linspace(0, size_vox - window_vox, num)).astype(np.int64))


def padding_to_window(shape_vox: Sequence[int], patch_size_vox: Sequence[int]) -> np.ndarray:
    """Zero padding (3, 2) int64 (before, after) per axis that makes every axis at least the window."""
    missing = np.maximum(np.asarray(patch_size_vox) - np.asarray(shape_vox), 0)
    return np.stack([missing // 2, missing - missing // 2], axis=1).astype(np.int64)


def importance_profile(length_vox: int, blending: str, min_weight: float = 1e-3) -> np.ndarray:
    """1D window weights (length,) float32: Gaussian (sigma = length / 8) or constant, max 1, >= min_weight."""
    schema.check("evaluation.blending", blending)
    if blending == "constant":
        return np.ones(length_vox, np.float32)
    offset_vox = np.arange(length_vox) - (length_vox - 1) / 2.0
    profile = np.exp(-0.5 * (offset_vox / (length_vox / 8.0)) ** 2)
    return np.maximum(profile / profile.max(), min_weight).astype(np.float32)


def importance_map(patch_size_vox: Sequence[int], blending: str, min_weight: float = 1e-3) -> np.ndarray:
    """3D window weights (px, py, pz) float32: outer product of the per-axis profiles (max 1, > 0)."""
    px, py, pz = (importance_profile(p, blending, min_weight) for p in patch_size_vox)
    return px[:, None, None] * py[None, :, None] * pz[None, None, :]


@dataclass(frozen=True)
class WindowGrid:
    """Windows covering one volume.

    shape_vox: (3,) the original volume shape; padding_vox: (3, 2) zero padding before/after each
    axis; patch_size_vox: (3,); blending: window weighting; starts_vox: (W, 3) int32 window starts in
    the padded volume; positions: (W, 3) float32 positions of the windows in the original volume
    (`pipeline.sampling.patch_positions`, the rule of the training patches); coverage: per axis,
    (padded length,) float32 sum of the importance profiles of the windows along that axis (the weight
    sum at a voxel is their product).
    """

    shape_vox: tuple
    padding_vox: np.ndarray
    patch_size_vox: tuple
    blending: str
    starts_vox: np.ndarray
    positions: np.ndarray
    coverage: tuple

    @property
    def padded_shape_vox(self) -> Tuple[int, ...]:
        return tuple(len(c) for c in self.coverage)

    @property
    def num_windows(self) -> int:
        return len(self.starts_vox)

    def crop(self, padded: np.ndarray) -> np.ndarray:
        """The original region (a view) of an array whose first three axes are the padded volume."""
        return padded[self._original_region()]

    def cropped_coverage(self) -> Tuple[np.ndarray, ...]:
        """The per-axis coverages (3 arrays (X,), (Y,), (Z,)) of the original region."""
        return tuple(c[region] for c, region in zip(self.coverage, self._original_region()))

    def _original_region(self):
        return tuple(slice(b, b + s) for b, s in zip(self.padding_vox[:, 0], self.shape_vox))


def window_grid(shape_vox: Sequence[int], patch_size_vox: Sequence[int], overlap: float, blending: str) -> WindowGrid:
    """The `WindowGrid` of a volume of spatial shape `shape_vox` (3,) for windows `patch_size_vox` (3,)."""
    shape_vox = tuple(int(s) for s in shape_vox)
    patch_size_vox = tuple(int(p) for p in patch_size_vox)
    padding_vox = padding_to_window(shape_vox, patch_size_vox)
    axis_starts, coverage = [], []
    for size, patch in zip(np.asarray(shape_vox) + padding_vox.sum(axis=1), patch_size_vox):
        starts = window_starts(int(size), patch, overlap)
        profile = importance_profile(patch, blending)
        axis_coverage = np.zeros(size, np.float64)
        for start in starts:
            axis_coverage[start:start + patch] += profile
        axis_starts.append(starts)
        coverage.append(axis_coverage.astype(np.float32))
    starts_vox = np.stack(np.meshgrid(*axis_starts, indexing="ij"), -1).reshape(-1, 3)
    positions = patch_positions(starts_vox - padding_vox[:, 0], patch_size_vox, shape_vox).numpy()
    return WindowGrid(shape_vox, padding_vox, patch_size_vox, blending, starts_vox.astype(np.int32),
                      positions, tuple(coverage))


def pad_volume(volume: np.ndarray, grid: WindowGrid) -> np.ndarray:
    """The volume (X, Y, Z, C) zero-padded to the grid's padded shape (the volume itself when no padding)."""
    if not grid.padding_vox.any():
        return volume
    return np.pad(volume, np.concatenate([grid.padding_vox, [[0, 0]]]))


def extract_windows(padded: np.ndarray, starts_vox: np.ndarray, patch_size_vox: Sequence[int]) -> np.ndarray:
    """Windows (N, px, py, pz, C) cut out of a padded volume (X, Y, Z, C) at `starts_vox` (N, 3)."""
    px, py, pz = patch_size_vox
    return np.stack([padded[x:x + px, y:y + py, z:z + pz] for x, y, z in starts_vox])


def accumulate(predict_batch: Callable[[tf.Tensor, np.ndarray], Union[np.ndarray, tf.Tensor]], volume: np.ndarray,
               grid: WindowGrid, batch_size: int, num_outputs: int) -> np.ndarray:
    """Importance-weighted sum (padded X, Y, Z, K) float32 numpy of the window outputs over `volume`.

    predict_batch: (windows (N, px, py, pz, C) float32 tensor, positions (N, 3) float32) -> outputs
    (N, px, py, pz, K) (numpy or tf); volume: (X, Y, Z, C) float32 numpy; grid: its `WindowGrid`;
    batch_size: windows per call; num_outputs: K. Memory: this sum plus one batch (windows and
    outputs). Extraction, weighting and overlap-add run on the host, in place.
    """
    padded = pad_volume(volume, grid)
    accumulator = np.zeros(grid.padded_shape_vox + (num_outputs,), np.float32)
    weights = None if grid.blending == "constant" else importance_map(grid.patch_size_vox, grid.blending)[..., None]
    scratch = np.empty(grid.patch_size_vox + (num_outputs,), np.float32)
    for begin in range(0, grid.num_windows, batch_size):
        starts_vox = grid.starts_vox[begin:begin + batch_size]
        windows = tf.convert_to_tensor(extract_windows(padded, starts_vox, grid.patch_size_vox))
        outputs = np.asarray(predict_batch(windows, grid.positions[begin:begin + batch_size]))
        del windows
        add_windows(accumulator, outputs, starts_vox, weights, scratch)
        del outputs  # before the next batch is allocated
    return accumulator


def add_windows(accumulator: np.ndarray, outputs: np.ndarray, starts_vox: np.ndarray,
                weights: Optional[np.ndarray] = None, scratch: Optional[np.ndarray] = None) -> None:
    """Add window outputs (N, px, py, pz, K), times `weights` (px, py, pz, 1) if given, into
    `accumulator` (X, Y, Z, K) at `starts_vox` (N, 3), in place; `scratch` (px, py, pz, K) holds
    the weighted window."""
    px, py, pz = outputs.shape[1:4]
    for output, (x, y, z) in zip(outputs, starts_vox):
        if weights is not None:
            output = np.multiply(output, weights, out=scratch)
        accumulator[x:x + px, y:y + py, z:z + pz] += output


def make_finisher(transform: Optional[Callable[[tf.Tensor], tf.Tensor]] = None) -> Callable[..., tf.Tensor]:
    """An XLA-compiled function (sums (n, Y, Z, K), coverage_x (n,), coverage_y (Y,), coverage_z (Z,)) -> result.

    The result is `transform(weighted average)` where the weighted average is sums / weight sum
    (the outer product of the coverages); transform (TF, per voxel over the last axis) defaults to
    the identity. Elementwise only, so XLA fuses it into one pass (compiled once per slab shape).
    """
    @tf.function(jit_compile=True,
                 input_signature=[tf.TensorSpec([None] * 4, tf.float32)] + [tf.TensorSpec([None], tf.float32)] * 3)
    def finish(sums, coverage_x, coverage_y, coverage_z):
        weight_sum = coverage_x[:, None, None] * coverage_y[None, :, None] * coverage_z[None, None, :]
        average = sums / weight_sum[..., None]
        return average if transform is None else transform(average)

    return finish


def finish_slabs(finish: Callable[..., tf.Tensor], accumulator: np.ndarray, grid: WindowGrid,
                 out: np.ndarray) -> np.ndarray:
    """Write `finish` of the original region of `accumulator` into `out` slab by slab along x.

    accumulator: (padded X, Y, Z, K) from `accumulate`; out: numpy array whose first three axes are
    the original volume (may be `grid.crop(accumulator)` itself, to finish in place).
    """
    region = grid.crop(accumulator)
    cx, cy, cz = grid.cropped_coverage()
    rows = max(1, SLAB_VALUES // max(1, region[0].size))
    for x in range(0, region.shape[0], rows):
        out[x:x + rows] = finish(region[x:x + rows], cx[x:x + rows], cy, cz).numpy()
    return out
