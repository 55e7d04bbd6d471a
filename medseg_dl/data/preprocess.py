"""Offline preprocessing at conversion (numpy/scipy): checks, reorientation, resampling,
intensity normalisation, and per-class voxel locations for class-balanced sampling."""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg_dl.data.io import spacing_from_affine
from medseg_dl.errors import DataError


def check_finite(image: np.ndarray, path: str) -> None:
    """Raise `DataError` if `image` holds NaN or Inf (integer types cannot; floats are checked slab by slab)."""
    if np.issubdtype(image.dtype, np.integer):
        return
    count = sum(int(np.size(image[s]) - np.count_nonzero(np.isfinite(image[s]))) for s in slabs(image.shape))
    if count:
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


def to_labels(label: np.ndarray, num_classes: int, path: str, ignore_label: Optional[int] = None) -> np.ndarray:
    """(X, Y, Z) label map as uint8, checked to hold integers in [0, num_classes) or the `ignore_label` (num_classes
    <= 256); a label of an integer type is checked without a copy, a float one slab by slab (`slabs`)."""
    if not np.issubdtype(label.dtype, np.integer):
        for s in slabs(label.shape):
            if not np.array_equal(np.rint(label[s]), label[s]):
                raise DataError(f"{path}: label map holds non-integer values; labels must be class indices")
    low, high = float(label.min()), float(label.max())
    if ignore_label is not None and high == ignore_label:
        high = max((float(label[s][label[s] != ignore_label].max(initial=0)) for s in slabs(label.shape)),
                   default=0.0)
    if low < 0 or high >= num_classes:
        allowed = f"[0, {num_classes - 1}]" + ("" if ignore_label is None else f" and data.ignore_label = {ignore_label}")
        raise DataError(f"{path}: label values span [{low:g}, {high:g}] but data.num_classes = {num_classes} "
                        f"allows {allowed}; fix the labels, data.num_classes or data.ignore_label")
    return label.astype(np.uint8, copy=label.dtype != np.uint8)


def reorient_to_ras(data: np.ndarray, affine: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Reorder/flip the first three axes of `data` so they run along R, A, S; returns (data, affine)."""
    current = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt("RAS"))
    reoriented = nib.orientations.apply_orientation(data, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape[:3])
    return np.ascontiguousarray(reoriented), new_affine


def resample(data: np.ndarray, affine: np.ndarray, target_spacing_mm: Sequence[float],
             order: int) -> Tuple[np.ndarray, np.ndarray]:
    """Resample the first three axes of `data` to exactly `target_spacing_mm` with spline `order` (3 for
    images, into float32; 0 for labels, in `data`'s type); returns (data, affine). Voxel (0, 0, 0) keeps its
    position; the new shape covers the old extent: round(shape * spacing / target)."""
    step = np.asarray(target_spacing_mm, np.float64) / spacing_from_affine(affine)
    new_shape = tuple(int(n) for n in np.maximum(1, np.round(np.array(data.shape[:3]) / step)))
    channels = data[..., None] if data.ndim == 3 else data
    out = np.empty(new_shape + channels.shape[3:], np.float32 if order else data.dtype)
    for c in range(channels.shape[-1]):
        source = channels[..., c]
        if order > 1:  # the spline coefficients in float32 (scipy's own prefilter makes a float64 copy)
            source = ndimage.spline_filter(source, order, output=np.float32, mode="nearest")
        out[..., c] = ndimage.affine_transform(source, np.diag(step), output_shape=new_shape, order=order,
                                               mode="nearest", prefilter=False, output=out.dtype)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] @ np.diag(step)
    return (out[..., 0] if data.ndim == 3 else out), new_affine


SLAB_VOXELS = 2 ** 18  # voxels a scan over a volume handles at once (a 512 x 512 plane): its temporaries are small


def slabs(shape: Sequence[int]) -> List[slice]:
    """Slices of axis 0 covering `shape`, about SLAB_VOXELS voxels each (at least one plane)."""
    step = max(1, SLAB_VOXELS // max(1, int(np.prod(shape[1:]))))
    return [slice(start, min(start + step, int(shape[0]))) for start in range(0, int(shape[0]), step)]


def mean_std(channel: np.ndarray, mask: Optional[np.ndarray] = None) -> Tuple[float, float]:
    """(mean, std) in float64 of an (X, Y, Z) array, over the voxels of `mask` (X, Y, Z) bool when given;
    computed slab by slab (`slabs`), so no float64 copy of the volume is made."""
    def values(s):
        return channel[s] if mask is None else channel[s][mask[s]]

    count = max(1, sum(values(s).size for s in slabs(channel.shape)))
    mean = sum(float(values(s).sum(dtype=np.float64)) for s in slabs(channel.shape)) / count
    squares = sum(float(np.square(values(s).astype(np.float64) - mean).sum()) for s in slabs(channel.shape))
    return mean, float(np.sqrt(squares / count))


def normalize(image: np.ndarray, normalization, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Normalise an (X, Y, Z, C) float32 `image` in place, as it is stored: `preprocessing.normalization` (one
    method, or one per channel) zscore: (x - mean) / std; zscore_mask: the same with the statistics inside
    `mask` (X, Y, Z) bool, 0 outside; none: as is; ct: rounded to whole units (HU), the dataset's clip and
    statistics being applied when the case is read (`ct_vectors`), so that adding cases to a converted
    dataset changes its statistics without rewriting a case. Returns `image`."""
    for c, method in enumerate(channel_methods(normalization, image.shape[-1])):
        channel = image[..., c]
        if method in ("zscore", "zscore_mask"):
            inside = mask if method == "zscore_mask" else None
            mean, std = mean_std(channel, inside)
            channel -= mean
            channel /= max(std, 1e-8)
            if inside is not None:
                channel[~inside] = 0.0
        elif method == "ct":
            np.rint(channel, out=channel)
    return image


def ct_vectors(normalization, ct_stats: Optional[Sequence[Optional[Mapping[str, float]]]],
               num_channels: int) -> Tuple[np.ndarray, ...]:
    """(low, high, mean, std), each (C,) float32, that turn stored intensities into the network's input,
    (clip(x, low, high) - mean) / std per channel: the dataset statistics (`ct_statistics`, one dict per
    channel) for ct channels, and (-inf, inf, 0, 1), the identity, for the others."""
    vectors = np.array([[-np.inf, np.inf, 0.0, 1.0]] * num_channels)
    for c, method in enumerate(channel_methods(normalization, num_channels)):
        if method == "ct":
            stats = ct_stats[c]
            vectors[c] = [stats["low"], stats["high"], stats["mean"], max(stats["std"], 1e-8)]
    return tuple(np.ascontiguousarray(column, np.float32) for column in vectors.T)


def apply_ct(image: np.ndarray, vectors: Tuple[np.ndarray, ...]) -> np.ndarray:
    """(clip(image, low, high) - mean) / std of an (X, Y, Z, C) float32 image, in place, with the (C,) float32
    `ct_vectors`, slab by slab; returns `image`. pipeline/inputs.py `read_case` does the same in TensorFlow."""
    low, high, mean, std = vectors
    for s in slabs(image.shape):
        np.clip(image[s], low, high, out=image[s])
        image[s] -= mean
        image[s] /= std
    return image


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


def _chosen_ranks(total: int, count: int, rng: np.random.Generator) -> Optional[np.ndarray]:
    """Sorted ranks of `count` of `total` items drawn without replacement, or None (take all) when total <= count."""
    return np.sort(rng.choice(total, size=count, replace=False)) if total > count else None


def _take(members: np.ndarray, ranks: Optional[np.ndarray], seen: int) -> np.ndarray:
    """The `members` (the next len(members) items in order, `seen` items before them) whose ranks were chosen."""
    if ranks is None:
        return members
    low, high = np.searchsorted(ranks, [seen, seen + len(members)])
    return members[ranks[low:high] - seen]


def class_locations(label: np.ndarray, num_classes: int, max_per_class: int,
                    rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel indices per class, at most `max_per_class` each, drawn uniformly without replacement; the label
    (X, Y, Z) of any integer type is scanned slab by slab, so memory beyond the result is bounded (`slabs`).

    Returns (locations (M, 3) int32 sorted by class, counts (num_classes,) int32 of stored locations,
    voxels (num_classes,) int64 of all voxels of each class)."""
    voxels = np.zeros(num_classes, np.int64)
    for s in slabs(label.shape):
        voxels += np.bincount(label[s].ravel(), minlength=num_classes)[:num_classes]
    ranks = [_chosen_ranks(int(n), max_per_class, rng) for n in voxels]
    chosen, seen = [[] for _ in range(num_classes)], np.zeros(num_classes, np.int64)
    plane = int(np.prod(label.shape[1:]))
    for s in slabs(label.shape):
        block = label[s].ravel()
        order = np.argsort(block, kind="stable")
        ends = np.cumsum(np.bincount(block, minlength=num_classes)[:num_classes])
        for k in range(num_classes):
            members = order[(ends[k - 1] if k else 0):ends[k]]
            chosen[k].append(_take(members, ranks[k], int(seen[k])) + s.start * plane)
            seen[k] += len(members)
    per_class = [np.concatenate(c) if c else np.zeros(0, np.int64) for c in chosen]
    counts = np.array([len(c) for c in per_class], np.int32)
    flat_indices = np.concatenate(per_class) if per_class else np.zeros(0, np.int64)
    locations = np.stack(np.unravel_index(flat_indices, label.shape), axis=-1).astype(np.int32)
    return locations.reshape(-1, 3), counts, voxels


def foreground_samples(image: np.ndarray, label: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(M, C) float32 intensities of `image` (X, Y, Z, C) at M = min(count, foreground voxels) voxels with
    label > 0, drawn uniformly without replacement, slab by slab (`slabs`): the samples `ct_statistics` pools."""
    total = sum(int(np.count_nonzero(label[s])) for s in slabs(label.shape))
    ranks, seen, chosen = _chosen_ranks(total, count, rng), 0, []
    for s in slabs(label.shape):
        inside = np.flatnonzero(label[s])
        chosen.append(image[s].reshape(-1, image.shape[-1])[_take(inside, ranks, seen)])
        seen += len(inside)
    return np.concatenate(chosen).astype(np.float32) if chosen else np.zeros((0, image.shape[-1]), np.float32)
