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

On the host (a CPU), windows are cut out of the volume (numpy, one batch at a time) and each batch
goes through a TF function (the network). Its outputs are weighted and added into a numpy
accumulator in place, by one thread per core, each owning a slab of the accumulator along x, so
no voxel is written by two threads: on a CPU this is 3-10x faster than the TF alternatives measured
(tensor_scatter_nd_add, padding each window, strided-slice updates or XLA dynamic-update-slice
inside a TF while loop, TF broadcast multiplies), and memory stays at the accumulator plus one
batch. The division by the weight sum and an optional per-voxel transform (softmax, argmax) then
run XLA-fused over slabs of the accumulator, also one thread per core.

Windows are visited row by row along one axis (`recombined_slabs`): a row holds every window of one
start along that axis, and once it is added the voxels before the next row's start are touched by no
later window, so that slab is yielded and the live sums move on: they span one window along the axis,
not the volume. On an accelerator, graph_windows.py does the same in TensorFlow ops, so the volume stays
on the device and only the result is copied back; the SavedModel export traces the same function.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from medseg_dl.config import schema
from medseg_dl.pipeline.sampling import patch_positions

SLAB_VALUES = 1 << 22  # accumulator values per slab of the final pass (16 MB of float32)
CACHE_VALUES = 1 << 17  # float32 values of the weighting buffer of one thread (512 kB: stays in its cache)
THREADS = max(1, min(os.cpu_count() or 1, 8))  # host threads of extraction, accumulation and the final pass
_POOL = ThreadPoolExecutor(THREADS, thread_name_prefix="windows")


def window_starts(size_vox: int, window_vox: int, overlap: float) -> np.ndarray:
    """Start indices (n,) int64 of windows of `window_vox` covering an axis of `size_vox` >= window.

    Consecutive windows overlap by at least `overlap` (fraction of the window); the first starts at
    0 and the last ends at `size_vox`.
    """
    if size_vox < window_vox:
        raise ValueError(f"axis of {size_vox} voxels is smaller than the window ({window_vox}); pad it first")
    schema.check_argument("overlap", overlap, "evaluation.overlap")
    step_vox = window_vox * (1.0 - overlap)
    num = int(np.ceil((size_vox - window_vox) / step_vox - 1e-9)) + 1
    return np.unique(np.round(np.linspace(0, size_vox - window_vox, num)).astype(np.int64))


def padding_to_window(shape_vox: Sequence[int], patch_size_vox: Sequence[int]) -> np.ndarray:
    """Zero padding (3, 2) int64 (before, after) per axis that makes every axis at least the window."""
    missing = np.maximum(np.asarray(patch_size_vox) - np.asarray(shape_vox), 0)
    return np.stack([missing // 2, missing - missing // 2], axis=1).astype(np.int64)


def importance_profile(length_vox: int, blending: str, min_weight: float = 1e-3) -> np.ndarray:
    """1D window weights (length,) float32: Gaussian (sigma = length / 8) or constant, max 1, >= min_weight."""
    schema.check_argument("blending", blending, "evaluation.blending")
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

    def cropped_coverage(self) -> Tuple[np.ndarray, ...]:
        """The per-axis coverages (3 arrays (X,), (Y,), (Z,)) of the original region."""
        return tuple(c[region] for c, region in zip(self.coverage, self.original_region()))

    def original_region(self) -> Tuple[slice, ...]:
        """The three slices of the original volume in the padded one."""
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


def aligned_empty(shape: Sequence[int], dtype=np.float32, alignment_bytes: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `alignment_bytes` boundary (what
    TensorFlow's kernels expect of memory it borrows through DLPack)."""
    size_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size_bytes + alignment_bytes, np.uint8)
    offset = -raw.ctypes.data % alignment_bytes
    return raw[offset:offset + size_bytes].view(dtype).reshape(shape)


def extract_windows(padded: np.ndarray, starts_vox: np.ndarray, patch_size_vox: Sequence[int],
                    out: Optional[np.ndarray] = None) -> np.ndarray:
    """Windows (N, px, py, pz, C) cut out of a padded volume (X, Y, Z, C) at `starts_vox` (N, 3), one
    window per thread, into `out` (at least N windows; its first N are returned) or a new array."""
    px, py, pz = patch_size_vox
    if out is None:
        out = np.empty((len(starts_vox), px, py, pz, padded.shape[3]), padded.dtype)
    out = out[:len(starts_vox)]

    def cut(index):
        x, y, z = starts_vox[index]
        out[index] = padded[x:x + px, y:y + py, z:z + pz]

    list(_POOL.map(cut, range(len(starts_vox))))
    return out


def window_rows(grid: WindowGrid, axis: int) -> List[Tuple[int, int, np.ndarray]]:
    """The windows grouped in rows along `axis`: [(row start, row end, window indices (n,) int64)] in
    increasing start, a row holding every window of one start along `axis`; a row ends where the next
    begins (the last: at its start + the window), so the voxels before a row's end are touched by no later row."""
    starts = grid.starts_vox[:, axis]
    row_starts = np.unique(starts)
    ends = np.append(row_starts[1:], row_starts[-1] + grid.patch_size_vox[axis])
    return [(int(b), int(e), np.flatnonzero(starts == b)) for b, e in zip(row_starts, ends)]


def normalized_profiles(grid: WindowGrid, starts_vox: np.ndarray) -> Tuple[np.ndarray, ...]:
    """Per axis, the (N, P) float32 importance profiles of windows starting at `starts_vox` (N, 3) divided by
    the axis coverage under them: their outer product is each window's weight divided by the weight sum at
    each voxel, so these weights sum to 1 at every voxel (no tiny corner weights, which float16 cannot hold)."""
    profiles = []
    for axis, patch in enumerate(grid.patch_size_vox):
        profile = importance_profile(patch, grid.blending)
        under = np.stack([grid.coverage[axis][start:start + patch] for start in starts_vox[:, axis]])
        profiles.append((profile[None] / under).astype(np.float32))
    return tuple(profiles)


def recombined_slabs(predict_batch: Callable[..., Union[np.ndarray, tf.Tensor]], volume: np.ndarray,
                     grid: WindowGrid, batch_size: int, num_outputs: int, axis: int = 2, dtype=np.float32,
                     normalized: bool = False, progress: Optional[Callable[[int, int], None]] = None
                     ) -> Iterator[Tuple[int, np.ndarray, Tuple[np.ndarray, ...]]]:
    """Importance-weighted sums of the window outputs over `volume`, slab by slab along `axis`.

    Yields (begin_vox, sums, coverages) in increasing begin: sums (original X, Y, Z with `axis` cut to
    [begin_vox, begin_vox + n), K) of `dtype`, a view that is only valid until the next item; coverages: the
    three per-axis coverage vectors of that block (the weight sum at a voxel is their product). Windows are
    visited row by row along `axis` (`window_rows`), and a slab is yielded as soon as its row is done, so the
    live sums span one window along `axis` (the padded volume elsewhere): memory is that, one batch of windows
    and outputs, and the volume (padded only when smaller than the window).

    predict_batch: (windows (N, px, py, pz, C) float32 tensor, positions (N, 3) float32) -> outputs (N, px, py,
    pz, K) (numpy or tf), weighted here by the importance map; or, when `normalized`, (windows, positions,
    `normalized_profiles` of the batch) -> outputs already multiplied by the outer product of those profiles,
    so the sums are the weighted averages (the yielded coverages are then ones); volume: (X, Y, Z, C) float32;
    batch_size: windows per call (a batch stays within a row); dtype: of the sums (outputs are added in it);
    progress: called with (windows done, windows in total) after each batch.
    """
    padded = pad_volume(volume, grid)
    window_buffer = aligned_empty((batch_size,) + grid.patch_size_vox + (volume.shape[3],), np.float32)
    live_shape = list(grid.padded_shape_vox) + [num_outputs]
    live_shape[axis] = grid.patch_size_vox[axis]
    live = np.zeros(live_shape, dtype)
    weights = None if normalized or grid.blending == "constant" else importance_map(grid.patch_size_vox,
                                                                                    grid.blending)[..., None]
    done = 0
    for row_start, row_end, indices in window_rows(grid, axis):
        for begin in range(0, len(indices), batch_size):
            batch = indices[begin:begin + batch_size]
            cut = extract_windows(padded, grid.starts_vox[batch], grid.patch_size_vox, window_buffer)
            windows = tf.experimental.dlpack.from_dlpack(cut.__dlpack__())
            extra = normalized_profiles(grid, grid.starts_vox[batch]) if normalized else ()
            outputs = np.asarray(predict_batch(windows, grid.positions[batch], *extra))
            del windows
            relative_starts = grid.starts_vox[batch].copy()
            relative_starts[:, axis] -= row_start
            add_windows(live, outputs, relative_starts, weights)
            del outputs  # before the next batch is allocated
            done += len(batch)
            if progress is not None:
                progress(done, grid.num_windows)
        finished = _finished_block(live, grid, axis, row_start, row_end)
        if finished is not None:
            begin, sums, coverages = finished
            yield begin, sums, tuple(np.ones_like(c) for c in coverages) if normalized else coverages
        _shift(live, axis, row_end - row_start)


def _finished_block(live, grid, axis, row_start, row_end):
    """(begin_vox, sums view, coverages) of the original voxels in [row_start, row_end) (padded) along `axis`,
    or None when that range is all padding."""
    before = int(grid.padding_vox[axis, 0])
    low, high = max(row_start, before), min(row_end, before + grid.shape_vox[axis])
    if low >= high:
        return None
    region = list(grid.original_region())
    region[axis] = slice(low - row_start, high - row_start)
    coverages = list(grid.cropped_coverage())
    coverages[axis] = grid.coverage[axis][low:high]
    return low - before, live[tuple(region)], tuple(coverages)


def _shift(live, axis, step_vox):
    """Move the sums along `axis` back by `step_vox` planes (plane by plane, front first, so nothing is
    overwritten before it is read and no copy of the sums is made) and zero the freed planes at the end."""
    planes = np.moveaxis(live, axis, 0)
    for plane in range(len(planes) - step_vox):
        planes[plane] = planes[plane + step_vox]
    planes[max(0, len(planes) - step_vox):] = 0


def add_windows(accumulator: np.ndarray, outputs: np.ndarray, starts_vox: np.ndarray,
                weights: Optional[np.ndarray] = None) -> None:
    """Add window outputs (N, px, py, pz, K), times `weights` (px, py, pz, 1) if given, into
    `accumulator` (X, Y, Z, K) at `starts_vox` (N, 3), in place. The x range of the batch is split
    into one slab per thread; each thread walks its slab a few x rows at a time and adds the part of
    every window in those rows (weighted in a small buffer that stays in the core's cache), so the
    accumulator rows that overlapping windows share are loaded once per batch, not once per window.
    Each voxel receives the windows in batch order, as a window-by-window loop would add them."""
    px, py, pz, k = outputs.shape[1:]
    bounds = np.linspace(starts_vox[:, 0].min(), starts_vox[:, 0].max() + px, THREADS + 1).round().astype(int)
    rows = max(1, CACHE_VALUES // (py * pz * k))

    def add_slab(slab):
        begin, end = bounds[slab], bounds[slab + 1]
        buffer = np.empty((rows, py, pz, k), np.float32) if weights is not None else None
        for low in range(begin, end, rows):
            for output, (x, y, z) in zip(outputs, starts_vox):
                first, last = max(low, x), min(low + rows, end, x + px)
                if first >= last:
                    continue
                part = output[first - x:last - x]
                if weights is not None:
                    part = np.multiply(part, weights[first - x:last - x], out=buffer[:last - first])
                accumulator[first:last, y:y + py, z:z + pz] += part

    list(_POOL.map(add_slab, range(THREADS)))


def make_finisher(transform: Optional[Callable[[tf.Tensor], tf.Tensor]] = None, dtype=tf.float32
                  ) -> Callable[..., tf.Tensor]:
    """An XLA-compiled function (sums (n, Y, Z, K) of `dtype`, coverage_x (n,), coverage_y (Y,), coverage_z (Z,))
    -> result.

    The result is `transform(weighted average)` where the weighted average is sums / weight sum (the outer
    product of the coverages), in float32; transform (TF, per voxel over the last axis) defaults to the
    identity. Elementwise only, so XLA fuses it into one pass (compiled once per block shape).
    """
    @tf.function(jit_compile=True,
                 input_signature=[tf.TensorSpec([None] * 4, dtype)] + [tf.TensorSpec([None], tf.float32)] * 3)
    def finish(sums, coverage_x, coverage_y, coverage_z):
        weight_sum = coverage_x[:, None, None] * coverage_y[None, :, None] * coverage_z[None, None, :]
        average = tf.cast(sums, tf.float32) / weight_sum[..., None]
        return average if transform is None else transform(average)

    return finish


def finish_block(finish: Callable[..., tf.Tensor], sums: np.ndarray, coverages: Sequence[np.ndarray],
                 out: np.ndarray) -> np.ndarray:
    """Write `finish` of a block of sums (x, y, z, K) with its coverages ((x,), (y,), (z,)) into `out`
    (whose first three axes are the block's) a few x rows per thread at a time; returns `out`."""
    cx, cy, cz = coverages
    rows = max(1, SLAB_VALUES // max(1, sums[0].size))

    def finish_rows(x):
        out[x:x + rows] = finish(sums[x:x + rows], cx[x:x + rows], cy, cz).numpy()

    list(_POOL.map(finish_rows, range(0, sums.shape[0], rows)))
    return out
