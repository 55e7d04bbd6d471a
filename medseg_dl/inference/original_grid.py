"""Mapping probabilities from the model grid back to a case's original grid, slab by slab.

A case predicted on a resampled or reoriented grid (the model grid) is returned on the grid of its
source files: each original voxel's position is mapped into the model grid (the affine `inverse(model
affine) @ original affine`) and the probabilities are interpolated there, each channel alone (order 1,
so class probabilities still sum to 1 and region probabilities stay in [0, 1]; outside the model volume
the nearest edge value); the caller takes the arg-max or paints the regions afterwards. Both grids share
their world space, so reorientation is a permutation and flip of the axes and resampling a scale, and
the original grid's third axis runs along one model axis (`model_axis_of`). The model grid's
probabilities arrive as slabs along that axis (`Predictor.slabs`); an original slice along its third
axis is interpolated as soon as every model plane it samples has arrived, and model planes are dropped
once no pending original slice samples them. So no volume-sized array of all classes exists on either
grid: memory is the few model slabs in flight and a group of original slices (`GROUP_VALUES`).
"""
from typing import Iterator, List, Sequence, Tuple

import numpy as np
from scipy import ndimage

GROUP_VALUES = 1 << 24  # float32 values of the original slices interpolated at once (64 MB)


def model_axis_of(model_affine: np.ndarray, original_affine: np.ndarray) -> int:
    """The model-grid axis (0, 1 or 2) along which the original grid's third axis runs (the largest component
    of its direction in model voxels); both affines (4, 4) float64 voxel -> world mm."""
    to_model = np.linalg.inv(model_affine) @ original_affine
    return int(np.argmax(np.abs(to_model[:3, 2])))


def same_grid(model_shape: Sequence[int], model_affine: np.ndarray, original_shape: Sequence[int],
              original_affine: np.ndarray) -> bool:
    """Whether the model grid is the original grid (nothing to map back)."""
    return tuple(model_shape) == tuple(original_shape) and np.allclose(model_affine, original_affine)


def original_slabs(model_slabs: Iterator[Tuple[int, np.ndarray]], model_shape: Sequence[int],
                   model_affine: np.ndarray, original_shape: Sequence[int], original_affine: np.ndarray
                   ) -> Iterator[Tuple[int, np.ndarray]]:
    """Probabilities on the original grid, slab by slab along its third axis.

    model_slabs: (begin_vox, probabilities (.., K) float32) of the model grid in increasing begin along
    `model_axis_of` (every other axis whole), as `Predictor.slabs` yields them; model_shape: (3,) of the model
    grid; affines (4, 4) float64. Yields (z_begin, probabilities (X, Y, n, K) float32) for the original slices
    [z_begin, z_begin + n), each slice once, in the order their model planes arrive (decreasing z when the
    reorientation flips that axis).
    """
    axis = model_axis_of(model_affine, original_affine)
    to_model = np.linalg.inv(model_affine) @ original_affine
    matrix, offset = to_model[:3, :3], to_model[:3, 3]
    low, high = _planes_sampled(matrix[axis], offset[axis], original_shape, model_shape[axis])
    pending = np.ones(original_shape[2], bool)
    kept: List[Tuple[int, np.ndarray]] = []
    for begin, block in model_slabs:
        kept.append((begin, block))
        arrived = begin + block.shape[axis]
        group = max(1, GROUP_VALUES // (original_shape[0] * original_shape[1] * block.shape[-1]))
        for z_begin, z_end in _runs(pending & (high < arrived), group):
            first, last = int(low[z_begin:z_end].min()), int(high[z_begin:z_end].max())
            planes = _planes(kept, axis, first, last + 1)
            shifted = offset + matrix[:, 2] * z_begin - np.eye(3)[axis] * first
            output_shape = (original_shape[0], original_shape[1], z_end - z_begin)
            yield z_begin, _interpolate(planes, matrix, shifted, output_shape)
            pending[z_begin:z_end] = False
        if pending.any():
            needed = int(low[pending].min())
            kept = [(b, a) for b, a in kept if b + a.shape[axis] > needed]


def _planes_sampled(row: np.ndarray, offset: float, original_shape, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per original slice z: the first and last model plane (int, inclusive, within [0, size)) that order-1
    interpolation reads along the model axis whose coordinate is `row` (3,) . (x, y, z) + `offset`."""
    x, y = np.meshgrid([0, original_shape[0] - 1], [0, original_shape[1] - 1], indexing="ij")
    z = np.arange(original_shape[2])
    coordinate = row[0] * x.reshape(-1, 1) + row[1] * y.reshape(-1, 1) + row[2] * z[None] + offset
    low = np.clip(np.floor(coordinate.min(axis=0)), 0, size - 1).astype(np.int64)
    high = np.clip(np.floor(coordinate.max(axis=0)) + 1, 0, size - 1).astype(np.int64)
    return low, high


def _runs(ready: np.ndarray, longest: int) -> List[Tuple[int, int]]:
    """[begin, end) runs of True in `ready` (1D bool), each at most `longest` long."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ready.astype(np.int8), [0]])))
    runs = []
    for begin, end in zip(edges[::2], edges[1::2]):
        runs += [(int(b), int(min(b + longest, end))) for b in range(begin, end, longest)]
    return runs


def _planes(kept, axis, first, stop) -> np.ndarray:
    """The model planes [first, stop) along `axis`, cut from the kept (begin, block) slabs."""
    parts = []
    for begin, block in kept:
        low, high = max(first, begin), min(stop, begin + block.shape[axis])
        if low < high:
            index = [slice(None)] * 3
            index[axis] = slice(low - begin, high - begin)
            parts.append(block[tuple(index)])
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def _interpolate(planes, matrix, offset, output_shape) -> np.ndarray:
    """(X, Y, n, K) float32: each channel of `planes` (.., K) sampled at `matrix` @ index + `offset`."""
    out = np.empty(tuple(output_shape) + (planes.shape[-1],), np.float32)
    for k in range(planes.shape[-1]):
        out[..., k] = ndimage.affine_transform(planes[..., k], matrix, offset, output_shape=tuple(output_shape),
                                               order=1, mode="nearest")
    return out
