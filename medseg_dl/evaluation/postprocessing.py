"""Post-processing chosen on data (nnU-Net's rule): connected components, kept only where they help.

Candidates, in this order, each applied to label maps (X, Y, Z) int of one case:
1. the largest connected component of the foreground as a whole (every other foreground voxel -> 0);
2. per class c >= 1: the largest connected component of class c (its other voxels -> 0);
3. per class c >= 1: removal of islands of class c smaller than `min_island_mm3` (voxels -> 0), the
   threshold being half the smallest component of c in the reference labels.
Connectivity is 26 (faces, edges and corners). `decide` tries each candidate on the cross-validation
predictions, on top of the ones already accepted, and accepts it only if it raises the mean
foreground Dice over those cases (by more than `MIN_GAIN`, and no class gets worse than it was);
the decision is a small JSON-ready dict (format: inference/postprocess.py) that `apply` follows
(`inference.postprocess.apply`, the one implementation: predict and export use it, and inference
does not import evaluation).
"""
from functools import partial
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from medseg_dl.evaluation import scoring
from medseg_dl.inference.postprocess import NOTHING, STRUCTURE, apply

MIN_GAIN = 1e-4
Case = Tuple[np.ndarray, np.ndarray, Sequence[float]]  # (reference, prediction) (X, Y, Z) int, spacing_mm (3,)


def mean_dice(cases: Iterable[Case], decision: Dict, num_classes: int) -> np.ndarray:
    """(num_classes - 1,) float64 mean Dice per foreground class over (reference, prediction, spacing_mm)
    cases, the predictions post-processed by `decision`; a class absent from both maps of a case is left
    out (NaN for a class absent from every case). One pass over `cases`, one case held at a time."""
    per_class = [[] for _ in range(num_classes - 1)]
    for case_dice in map(partial(_case_dice, decision=decision, num_classes=num_classes), cases):
        for values, value in zip(per_class, case_dice):
            if value is not None:
                values.append(value)
    return np.array([np.mean(d) if d else np.nan for d in per_class])


def _case_dice(case: Case, decision: Dict, num_classes: int) -> List[Optional[float]]:
    """Dice per foreground class of one case after `decision`; None where the class is in neither map."""
    reference, prediction, spacing = case
    processed = apply(prediction, decision, spacing)
    dice = []
    for c in range(1, num_classes):
        a, b = reference == c, processed == c
        dice.append(scoring.dice(a, b) if a.any() or b.any() else None)
    return dice


def decide(cases: Iterable[Case], num_classes: int) -> Dict:
    """The post-processing that raises the mean foreground Dice of the (reference, prediction, spacing_mm)
    cross-validation cases: the decision (the keys of `NOTHING`) with "dice_before" and "dice_after" (per
    foreground class, None for a class in no case) and "cases" (their number); JSON-ready. `cases` is
    re-iterable with a len() (a list, or evaluate.SavedPredictions reading them from disk): it is iterated
    once for the candidates and once per candidate, one case at a time."""
    decision = _merged(NOTHING, {})
    before = current = mean_dice(cases, decision, num_classes)
    for candidate in _candidates(cases, num_classes):
        trial = _merged(decision, candidate)
        dice = mean_dice(cases, trial, num_classes)
        if np.nanmean(dice) > np.nanmean(current) + MIN_GAIN and np.all(np.nan_to_num(dice - current) >= -MIN_GAIN):
            decision, current = trial, dice
    return {**decision, "dice_before": _json_floats(before), "dice_after": _json_floats(current), "cases": len(cases)}


def _json_floats(values: np.ndarray) -> List[Optional[float]]:
    return [None if np.isnan(v) else float(v) for v in values]


def _candidates(cases, num_classes) -> List[Dict]:
    candidates = [{"foreground_largest_component": True}]
    candidates += [{"largest_component_classes": [c]} for c in range(1, num_classes)]
    for c, smallest in enumerate(_smallest_components_mm3(cases, num_classes), start=1):
        if smallest is not None:
            candidates.append({"min_island_mm3": {str(c): smallest / 2}})
    return candidates


def _smallest_components_mm3(cases, num_classes) -> List[Optional[float]]:
    """Per foreground class, the volume in mm3 of its smallest connected component in any reference (None: in
    none); one pass over `cases`."""
    smallest = [None] * (num_classes - 1)
    for case_smallest in map(partial(_case_smallest_mm3, num_classes=num_classes), cases):
        smallest = [b if a is None else a if b is None else min(a, b) for a, b in zip(smallest, case_smallest)]
    return smallest


def _case_smallest_mm3(case: Case, num_classes: int) -> List[Optional[float]]:
    reference, _, spacing = case
    sizes = []
    for c in range(1, num_classes):
        components, count = ndimage.label(reference == c, structure=STRUCTURE)
        sizes.append(float(np.bincount(components.ravel())[1:].min() * float(np.prod(spacing))) if count else None)
    return sizes


def _merged(decision, candidate):
    merged = {"foreground_largest_component": decision["foreground_largest_component"],
              "largest_component_classes": list(decision["largest_component_classes"]),
              "min_island_mm3": dict(decision["min_island_mm3"])}
    if candidate.get("foreground_largest_component"):
        merged["foreground_largest_component"] = True
    merged["largest_component_classes"] += candidate.get("largest_component_classes", [])
    merged["min_island_mm3"].update(candidate.get("min_island_mm3", {}))
    return merged
