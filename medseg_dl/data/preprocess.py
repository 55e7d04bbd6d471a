"""Offline preprocessing at conversion (numpy/scipy): checks, reorientation, resampling,
intensity normalisation, and per-class voxel locations for class-balanced sampling."""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg_dl.data.io import spacing_from_affine
from medseg_dl.errors import DataError


def check_finite(image: np.ndarray, path: str) -> None:
    """Raise `DataError` if `image` holds NaN or Inf."""
    if not np.all(np.isfinite(image)):
        count = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise DataError(f"{path}: {count} voxels are NaN or Inf; repair the image (e.g. replace them with 0) "
                        f"before conversion")


def check_same_grid(reference_shape: Sequence[int], reference_affine: np.ndarray, shape: Sequence[int],
                    affine: np.ndarray, path: str, reference_path: str, tolerance: float) -> None:
    """Raise `DataError` unless `shape` equals and `affine` matches within `tolerance` (mm)."""
    if tuple(shape[:3]) != tuple(reference_shape[:3]):
        raise DataError(f"{path}: shape {tuple(shape[:3])} differs from {tuple(reference_shape[:3])} of "
                        f"{reference_path}; all volumes of a subject must share one voxel grid, resample them")
    deviation = float(np.max(np.abs(np.asarray(affine) - np.asarray(reference_affine))))
    if deviation > tolerance:
        raise DataError(f"{path}: affine differs from that of {reference_path} by {deviation:.4g} mm "
                        f"(tolerance preprocessing.affine_tolerance = {tolerance}); the volumes are not "
                        f"aligned, register or resample them")


def to_labels(label: np.ndarray, num_classes: int, path: str) -> np.ndarray:
    """(X, Y, Z) label map as int32, checked to hold integers in [0, num_classes)."""
    rounded = np.rint(label)
    if not np.array_equal(rounded, label):
        raise DataError(f"{path}: label map holds non-integer values; labels must be class indices")
    low, high = float(rounded.min()), float(rounded.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{path}: label values span [{low:g}, {high:g}] but data.num_classes = {num_classes} "
                        f"allows [0, {num_classes - 1}]; fix the labels or data.num_classes")
    return rounded.astype(np.int32)


def reorient_to_ras(data: np.ndarray, affine: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Reorder/flip the first three axes of `data` so they run along R, A, S; returns (data, affine)."""
    current = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt("RAS"))
    reoriented = nib.orientations.apply_orientation(data, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape[:3])
    return np.ascontiguousarray(reoriented), new_affine


def resample(data: np.ndarray, affine: np.ndarray, target_spacing_mm: Sequence[float],
             order: int) -> Tuple[np.ndarray, np.ndarray]:
    """Resample the first three axes of `data` to exactly `target_spacing_mm` with spline `order`
    (3 for images, 0 for labels); returns (data, affine). Voxel (0, 0, 0) keeps its position; the
    new shape covers the old extent: round(shape * spacing / target)."""
    step = np.asarray(target_spacing_mm, np.float64) / spacing_from_affine(affine)
    new_shape = tuple(int(n) for n in np.maximum(1, np.round(np.array(data.shape[:3]) / step)))
    channels = data[..., None] if data.ndim == 3 else data
    out = np.stack([ndimage.affine_transform(channels[..., c].astype(np.float32), np.diag(step),
                                             output_shape=new_shape, order=order, mode="nearest",
                                             prefilter=order > 1)
                    for c in range(channels.shape[-1])], axis=-1)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] @ np.diag(step)
    return (out[..., 0] if data.ndim == 3 else out), new_affine


def zscore(image: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-channel (x - mean) / std of an (X, Y, Z, C) float32 image, statistics inside `mask`
    (X, Y, Z) bool when given (voxels outside the mask are set to 0)."""
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[-1]):
        channel = image[..., c].astype(np.float64)
        values = channel[mask] if mask is not None else channel
        mean, std = float(values.mean()), float(values.std())
        out[..., c] = (channel - mean) / max(std, 1e-8)
        if mask is not None:
            out[..., c][~mask] = 0.0
    return out


def ct_normalize(image: np.ndarray, ct_stats: Sequence[Mapping[str, float]]) -> np.ndarray:
    """Clip each channel to the dataset percentiles, then subtract the dataset mean and divide by its std.
    `ct_stats` is a list (one per channel) of dicts with low, high, mean, std."""
    out = np.empty_like(image, dtype=np.float32)
    for c, stats in enumerate(ct_stats):
        clipped = np.clip(image[..., c], stats["low"], stats["high"])
        out[..., c] = (clipped - stats["mean"]) / max(stats["std"], 1e-8)
    return out


def ct_statistics(foreground_samples: Sequence[np.ndarray], percentiles: Sequence[float]) -> List[Dict[str, float]]:
    """Dataset statistics for CT normalisation from pooled foreground intensities, one (M,) array per
    channel: percentiles to clip to, then mean and std of the clipped values."""
    stats = []
    for values in foreground_samples:
        low, high = np.percentile(values, percentiles)
        clipped = np.clip(values, low, high)
        stats.append({"low": float(low), "high": float(high), "mean": float(clipped.mean()),
                      "std": float(clipped.std())})
    return stats


def channel_methods(normalization, num_channels: int) -> List[str]:
    """`preprocessing.normalization` as one method per channel: a string applies to every channel, a
    list gives one per channel (its length is checked with the params)."""
    return [normalization] * num_channels if isinstance(normalization, str) else list(normalization)


def normalize(image: np.ndarray, normalization, mask: Optional[np.ndarray] = None,
              ct_stats: Optional[Sequence[Mapping[str, float]]] = None) -> np.ndarray:
    """Apply `preprocessing.normalization` (one method, or one per channel: zscore, zscore_mask, ct, none)
    to an (X, Y, Z, C) image; returns float32 (X, Y, Z, C). ct_stats: one dict per channel (all channels)."""
    out = np.empty(image.shape, np.float32)
    for c, method in enumerate(channel_methods(normalization, image.shape[-1])):
        channel = image[..., c:c + 1]
        if method == "zscore":
            out[..., c:c + 1] = zscore(channel)
        elif method == "zscore_mask":
            out[..., c:c + 1] = zscore(channel, mask)
        elif method == "ct":
            out[..., c:c + 1] = ct_normalize(channel, ct_stats[c:c + 1])
        else:
            out[..., c:c + 1] = channel
    return out


def class_locations(label: np.ndarray, num_classes: int, max_per_class: int,
                    rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel indices per class, at most `max_per_class` each, drawn without replacement.

    Returns (locations (M, 3) int32 sorted by class, counts (num_classes,) int32 of stored locations,
    voxels (num_classes,) int64 of all voxels of each class)."""
    flat = label.ravel()
    order = np.argsort(flat, kind="stable")
    voxels = np.bincount(flat, minlength=num_classes).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(voxels)[:-1]])
    chosen = []
    for k in range(num_classes):
        members = order[starts[k]: starts[k] + voxels[k]]
        if voxels[k] > max_per_class:
            members = np.sort(rng.choice(members, size=max_per_class, replace=False))
        chosen.append(members)
    counts = np.array([len(c) for c in chosen], np.int32)
    flat_indices = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    locations = np.stack(np.unravel_index(flat_indices, label.shape), axis=-1).astype(np.int32)
    return locations.reshape(-1, 3), counts, voxels
