"""Per-structure segmentation metrics of integer label maps, with voxel spacing in mm (numpy/scipy).

`score_case(reference, prediction, targets, spacing_mm, tolerance_mm)` scores every structure of
`targets.structures` (data/targets.py: each foreground class, or each region such as BraTS's whole
tumour) of one case from two integer label maps (X, Y, Z) (2D maps (X, Y) work the same way);
`summarize(rows)` pools the rows of many cases.

Conventions (those of MONAI >= 1.3 `compute_dice`, `compute_average_surface_distance`,
`compute_hausdorff_distance` and `compute_surface_dice`, checked against MONAI 1.6.1 and
medpy 0.5.2 by `benchmarks/metrics.py --peers`; MONAI keeps distances in float32, so its
values agree with these float64 ones to about 2e-7 relative, medpy's to 1e-15):

- Masks: a structure of label values V (one class c: V = (c,); a region: its labels) is the
  boolean mask `np.isin(labels, V)` of a label map; with labels it is `labels == c`.
- Ignore label (nnU-Net's convention): the voxels whose reference label is `targets.ignore_label`
  are left out of every metric: the prediction is set to background there before anything is
  counted, so they add to none of the true positives, false positives and false negatives, nor to
  the prediction's surface or volume (the reference masks never hold them: the ignore label is in
  no structure). Only the reference may hold the ignore label.
- Dice = 2|R & P| / (|R| + |P|); Jaccard = |R & P| / |R | P|. Volumes are voxel counts
  times the voxel volume prod(spacing_mm), in mm3.
- Surface voxels of a mask M = M XOR binary_erosion(M) with the 6-connected (face
  neighbour) structuring element and border_value=0: space outside the array counts as
  background, so mask voxels on the array border are surface voxels. This is scipy's
  default erosion as MONAI (`get_mask_edges`, which crops with a zero margin of 1 voxel)
  and medpy (`__surface_distances`, connectivity=1) apply it.
- Surface distances: the distance from surface voxel v of one mask to the other mask's
  surface S is min over s in S of ||(v - s) * spacing_mm||, in mm. It equals
  `scipy.ndimage.distance_transform_edt(~S, sampling=spacing_mm)[v]`, the definition
  MONAI and medpy use; it is computed here, exactly, with a k-d tree over the surface
  voxels inside the joint bounding box of both masks (every surface voxel of either mask
  lies in that box, so cropping changes no distance). pred->ref distances are those of
  the prediction's surface voxels, ref->pred those of the reference's.
- ASSD = mean of the pooled distances (pred->ref and ref->pred concatenated, then one
  mean), so a larger surface weighs more. Equal to MONAI
  `compute_average_surface_distance(symmetric=True)` and to medpy 0.5.2 `assd` (which
  also concatenates). Not DeepMind surface-distance, which weights by surfel area.
- HD95 = max(percentile95(pred->ref), percentile95(ref->pred)), numpy's default linear
  interpolation: MONAI `compute_hausdorff_distance(percentile=95)`. Not medpy `hd95`,
  which takes one percentile of the pooled distances (a one-sided miss can vanish there).
- Surface Dice at tolerance t mm = (#pred->ref distances <= t + #ref->pred distances
  <= t) / (#pred surface voxels + #ref surface voxels): MONAI
  `compute_surface_dice(class_thresholds=[t], use_subvoxels=False)`.
- Empty masks (here we differ from MONAI 1.6.1, which gives NaN for everything when both
  are empty and, when one is, ASSD inf, HD95 NaN, Dice 0 or NaN (empty reference)):
  both empty -> Dice 1, Jaccard 1, ASSD 0, HD95 0, surface Dice 1 in the row (nothing to find,
  nothing found); exactly one empty (a missed or an invented structure) -> Dice 0, Jaccard 0,
  surface Dice 0, and ASSD = HD95 = the penalty distance: the diagonal of the label map in mm,
  the largest distance two of its voxels can have (so a miss costs at least as much as the worst
  segmentation; BraTS scores a miss the same way), flagged `distance_penalised`. Each row carries
  `empty_reference` and `empty_prediction`; empty masks never raise.
- Aggregates (`summarize`): a structure absent from both maps of a case has nothing to score:
  such rows leave every statistic of the structure (so they cannot inflate `mean_dice`, the
  selection metric) and are counted as `both_empty`; misses and inventions stay in, with their
  penalty. `mean_dice` is the mean over structures of the per-structure mean Dice (NaN when no
  structure has a case).

Speed: one pass over each full label map finds its non-zero bounding box and checks the
label range; `scipy.ndimage.find_objects` inside that box gives one box per label value, and
a structure's box is the union of the boxes of its label values. All per-structure work
(masks, erosion, distances) stays inside the joint structure box of both maps padded by one
background voxel, which makes the erosion there identical to the full-array erosion.
"""
from functools import reduce
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from medseg_dl.data.targets import Targets
from medseg_dl.errors import DataError

METRICS = ("dice", "jaccard", "assd_mm", "hd95_mm", "surface_dice", "reference_mm3", "predicted_mm3")

Box = Tuple[slice, ...]


class ScoringInputError(DataError, ValueError):
    """Label maps or arguments that cannot be scored (shape, dtype, label range, spacing)."""


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks of one shape; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    _check_same_shape(a, b)
    return _overlap(np.count_nonzero(a & b), np.count_nonzero(a), np.count_nonzero(b))[0]


def score_case(
    reference: np.ndarray,
    prediction: np.ndarray,
    targets: Targets,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    tolerance_mm: float = 1.0,
) -> List[Dict]:
    """Scores each structure of `targets.structures` (each foreground class, or each region) of one case.

    reference, prediction: integer (or bool) label maps (X, Y, Z) of one shape, values in
    [0, targets.num_classes); the reference may also hold targets.ignore_label, whose voxels are left
    out of every metric (module docstring; the prediction's values there are not looked at).
    targets: data/targets.py Targets (num_classes, structures, ignore_label). spacing_mm: voxel size
    per axis in mm. tolerance_mm: surface Dice tolerance in mm. Returns one dict per structure, in
    order, with keys class (its number counted from 1: the class id with labels, the region's place
    in data.regions + 1 with regions), class_name (its name), dice, jaccard, assd_mm, hd95_mm,
    surface_dice, reference_mm3, predicted_mm3, empty_reference, empty_prediction, distance_penalised
    (conventions in the module docstring). Raises ScoringInputError on bad input.
    """
    reference, prediction = _check_label_maps(reference, prediction)
    _check_targets(targets)
    spacing = _check_spacing(spacing_mm, reference.ndim)
    tolerance_mm = _check_tolerance(tolerance_mm)
    prediction = without_ignored(reference, prediction, targets.ignore_label)
    ref_boxes = _label_boxes(reference, targets.num_classes, targets.ignore_label, "reference")
    pred_boxes = _label_boxes(prediction, targets.num_classes, None, "prediction")
    rows = []
    for number, (name, values) in enumerate(targets.structures, start=1):
        ref_box = reduce(_union_box, (ref_boxes[v] for v in values), None)
        pred_box = reduce(_union_box, (pred_boxes[v] for v in values), None)
        row = {"class": number, "class_name": name}
        row.update(_structure_metrics(reference, prediction, values, ref_box, pred_box, spacing, tolerance_mm))
        rows.append(row)
    return rows


def summarize(rows: Sequence[Dict]) -> Dict:
    """Pools `score_case` rows of many cases, per structure (its "class" number and "class_name").

    Returns {"classes": {name: {"cases", "both_empty", "empty_reference", "empty_prediction",
    "distance_penalised", metric: {"mean", "std", "median", "count", "nan_count"}}}, "mean_dice"},
    the structures in the order of their numbers: statistics leave out the rows where the structure is
    absent from both maps (module docstring) and ignore NaN (count = finite values, nan_count = NaN
    values; all NaN gives NaN statistics); std is the population std; mean_dice is the mean over the
    scored structures of their mean Dice (NaN when there are none).
    """
    by_structure: Dict[Tuple[int, str], List[Dict]] = {}
    for row in rows:
        by_structure.setdefault((int(row["class"]), row["class_name"]), []).append(row)
    summary = {name: _structure_summary(by_structure[(number, name)]) for number, name in sorted(by_structure)}
    structure_dice = [s["dice"]["mean"] for s in summary.values()]
    return {"classes": summary, "mean_dice": _stats(structure_dice)["mean"]}


def _structure_metrics(reference, prediction, values, ref_box, pred_box, spacing, tolerance_mm) -> Dict:
    """The metrics of the structure of label `values`, computed inside the joint box of its two masks."""
    row = {"distance_penalised": False}
    if ref_box is None and pred_box is None:
        row.update(dice=1.0, jaccard=1.0, assd_mm=0.0, hd95_mm=0.0, surface_dice=1.0)
        row.update(reference_mm3=0.0, predicted_mm3=0.0, empty_reference=True, empty_prediction=True)
        return row
    box = _union_box(ref_box, pred_box)
    ref_padded = _padded_mask(reference, box, values)
    pred_padded = _padded_mask(prediction, box, values)
    inner = (slice(1, -1),) * reference.ndim
    n_ref, n_pred = np.count_nonzero(ref_padded), np.count_nonzero(pred_padded)
    overlap = np.count_nonzero(ref_padded[inner] & pred_padded[inner])
    row["dice"], row["jaccard"] = _overlap(overlap, n_ref, n_pred)
    voxel_mm3 = float(np.prod(spacing))
    row.update(reference_mm3=n_ref * voxel_mm3, predicted_mm3=n_pred * voxel_mm3)
    row.update(empty_reference=n_ref == 0, empty_prediction=n_pred == 0)
    if n_ref and n_pred:
        ref_surface, pred_surface = _surface_of_padded(ref_padded), _surface_of_padded(pred_padded)
        pred_to_ref = _directed(pred_surface, ref_surface, spacing)
        ref_to_pred = _directed(ref_surface, pred_surface, spacing)
        row.update(_distance_metrics(pred_to_ref, ref_to_pred, tolerance_mm))
    else:
        penalty = float(np.sqrt(np.sum((np.array(reference.shape) * spacing) ** 2)))
        row.update(assd_mm=penalty, hd95_mm=penalty, surface_dice=0.0, distance_penalised=True)
    return row


def without_ignored(reference: np.ndarray, prediction: np.ndarray, ignore_label: Optional[int]) -> np.ndarray:
    """`prediction` set to background (0) where `reference` holds `ignore_label` (a copy of the same dtype), or
    `prediction` itself where it holds none (or ignore_label is None)."""
    if ignore_label is None:
        return prediction
    ignored = reference == ignore_label
    if not ignored.any():
        return prediction
    kept = prediction.copy()
    kept[ignored] = 0
    return kept


def _overlap(intersection: int, n_a: int, n_b: int) -> Tuple[float, float]:
    """(Dice, Jaccard) from voxel counts; (1, 1) when both masks are empty."""
    if n_a + n_b == 0:
        return 1.0, 1.0
    return 2.0 * intersection / (n_a + n_b), intersection / (n_a + n_b - intersection)


def _distance_metrics(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, tolerance_mm: float) -> Dict:
    """ASSD, HD95 and surface Dice from the two directed distance arrays (mm)."""
    n = pred_to_ref.size + ref_to_pred.size
    within = np.count_nonzero(pred_to_ref <= tolerance_mm) + np.count_nonzero(ref_to_pred <= tolerance_mm)
    return {
        "assd_mm": float((pred_to_ref.sum() + ref_to_pred.sum()) / n),
        "hd95_mm": float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))),
        "surface_dice": within / n,
    }


def _directed(from_surface: np.ndarray, to_surface: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel of from_surface, in C order, to the nearest voxel of to_surface.

    Both are non-empty boolean arrays of one shape. Voxels on both surfaces are at 0; the
    others query a k-d tree of to_surface's voxel centres scaled by spacing (exact nearest
    neighbour, so the distances equal those of the Euclidean distance transform).
    """
    index = np.nonzero(from_surface)
    distances = np.zeros(index[0].size)
    off = ~to_surface[index]
    if off.any():
        tree = cKDTree(np.argwhere(to_surface) * spacing, balanced_tree=False, compact_nodes=False)
        queries = np.stack([axis_index[off] for axis_index in index], axis=1) * spacing
        distances[off] = tree.query(queries)[0]
    return distances


def _surface_of_padded(padded: np.ndarray) -> np.ndarray:
    """Surface voxels of the interior of a mask padded by one background voxel on every side."""
    inner = (slice(1, -1),) * padded.ndim
    core = padded[inner]
    eroded = core.copy()
    for axis in range(padded.ndim):
        for shifted in (slice(None, -2), slice(2, None)):
            neighbour = list(inner)
            neighbour[axis] = shifted
            eroded &= padded[tuple(neighbour)]
    return core & ~eroded


def _padded_mask(labels: np.ndarray, box: Box, values: Sequence) -> np.ndarray:
    """isin(labels[box], values), padded by one False voxel on every side (bool, box shape + 2)."""
    padded = np.zeros(tuple(s.stop - s.start + 2 for s in box), bool)
    inner, window = padded[(slice(1, -1),) * len(box)], labels[box]
    np.equal(window, values[0], out=inner)
    for value in values[1:]:
        inner |= window == value
    return padded


def _label_boxes(labels: np.ndarray, num_classes: int, ignore_label: Optional[int], name: str
                 ) -> List[Optional[Box]]:
    """Bounding box of each label value 0 .. num_classes-1 (None where absent; index 0 unused); the map may hold
    `ignore_label` too (not None: the reference), which gets no box."""
    box = _nonzero_box(labels)
    if box is None:
        return [None] * num_classes
    inside = labels[box]
    if inside.min() < 0 or inside.max() >= num_classes:
        _check_label_range(inside, num_classes, ignore_label, name)
    if inside.dtype == bool:
        inside = inside.view(np.uint8)
    local = ndimage.find_objects(inside, max_label=num_classes - 1)
    return [None] + [_shift_box(s, box) if s is not None else None for s in local]


def _nonzero_box(labels: np.ndarray) -> Optional[Box]:
    """The smallest box holding every non-zero element, or None when there is none."""
    nonzero = labels if labels.dtype == bool else labels != 0
    box = []
    for axis in range(nonzero.ndim):
        hits = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(nonzero.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _shift_box(local: Box, outer: Box) -> Box:
    return tuple(slice(l.start + o.start, l.stop + o.start) for l, o in zip(local, outer))


def _union_box(a: Optional[Box], b: Optional[Box]) -> Box:
    if a is None or b is None:
        return a if b is None else b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _structure_summary(rows: List[Dict]) -> Dict:
    both_empty = [bool(r["empty_reference"]) and bool(r["empty_prediction"]) for r in rows]
    scored = [r for r, skip in zip(rows, both_empty) if not skip]
    summary = {
        "cases": len(rows),
        "both_empty": sum(both_empty),
        "empty_reference": sum(bool(r["empty_reference"]) for r in rows),
        "empty_prediction": sum(bool(r["empty_prediction"]) for r in rows),
        "distance_penalised": sum(bool(r.get("distance_penalised")) for r in rows),
    }
    summary.update({metric: _stats([r[metric] for r in scored]) for metric in METRICS})
    return summary


def _stats(values: Sequence[float]) -> Dict:
    """NaN-aware mean, population std, median and counts of a list of floats."""
    values = np.asarray(values, dtype=float)
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        mean = std = median = float("nan")
    else:
        mean, std, median = float(finite.mean()), float(finite.std()), float(np.median(finite))
    return {"mean": mean, "std": std, "median": median, "count": int(finite.size),
            "nan_count": int(values.size - finite.size)}


def _check_label_maps(reference, prediction) -> Tuple[np.ndarray, np.ndarray]:
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    _check_same_shape(reference, prediction)
    if reference.ndim not in (2, 3):
        raise ScoringInputError(f"label maps must be (X, Y, Z) or (X, Y), got shape {reference.shape}")
    for name, labels in (("reference", reference), ("prediction", prediction)):
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise ScoringInputError(
                f"{name} has dtype {labels.dtype}; label maps must be integer "
                f"(round and cast float labels: np.rint(labels).astype(np.int32))"
            )
    return reference, prediction


def _check_targets(targets) -> None:
    if not isinstance(targets, Targets):
        raise ScoringInputError(f"targets must be a medseg_dl.data.targets.Targets (Targets.from_params(params.data)), "
                                f"got {targets!r}")


def _check_label_range(labels: np.ndarray, num_classes: int, ignore_label: Optional[int], name: str) -> None:
    """ScoringInputError naming a value of `labels` outside 0 .. num_classes - 1 that is not `ignore_label`."""
    outside = (labels < 0) | (labels >= num_classes)
    if ignore_label is not None:
        outside &= labels != ignore_label
    if outside.any():
        ignored = "" if ignore_label is None else f" and is not data.ignore_label {ignore_label}"
        raise ScoringInputError(
            f"{name} holds label {labels[outside][0]}, outside 0 .. {num_classes - 1}{ignored}; set "
            f"data.num_classes to cover every label or fix the label map"
        )


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ScoringInputError(
            f"reference shape {a.shape} and prediction shape {b.shape} differ; "
            f"both must be on the same voxel grid"
        )


def _check_spacing(spacing_mm, ndim: int) -> np.ndarray:
    spacing = np.asarray(spacing_mm, dtype=float).reshape(-1)
    if spacing.size != ndim or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ScoringInputError(f"spacing_mm must be {ndim} positive finite numbers, got {spacing_mm!r}")
    return spacing


def _check_tolerance(tolerance_mm) -> float:
    tolerance = float(tolerance_mm)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ScoringInputError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    return tolerance
