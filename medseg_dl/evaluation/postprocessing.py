"""Post-processing chosen on data (nnU-Net's rule): connected components, kept only where they help.

Candidates, in this order, each applied to label maps (X, Y, Z) int of one case; a structure s is the s-th of
`targets.structures` counted from 1 (data/targets.py: class s with labels, the s-th region of data.regions with
regions), its mask the voxels whose label is one of its label values:
1. the largest connected component of the foreground as a whole (every other foreground voxel -> 0);
2. per structure s: the largest connected component of its mask (its other voxels leave it);
3. per structure s: removal of its mask's islands smaller than `min_island_mm3` (their voxels leave it), the
   threshold being half the smallest component of its mask in the reference labels.
Connectivity is 26 (faces, edges and corners); a voxel that leaves a structure becomes 0 with labels, and what
inference/postprocess.py says with regions. `decide` tries each candidate on the cross-validation predictions,
on top of the ones already accepted, and accepts it only if it raises the mean Dice over the structures of
those cases (by more than `MIN_GAIN`, and no structure gets worse than it was); that Dice leaves out the
voxels whose reference is the ignore label (as scoring.py). The decision is a small JSON-ready dict (format:
inference/postprocess.py, with structure numbers) that `inference.postprocess.apply` follows (the one
implementation: predict and export use it, and inference does not import evaluation).
"""
from functools import partial
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from medseg_dl.data.targets import Targets
from medseg_dl.evaluation import scoring
from medseg_dl.inference.postprocess import NOTHING, STRUCTURE, apply

MIN_GAIN = 1e-4
Case = Tuple[np.ndarray, np.ndarray, Sequence[float]]  # (reference, prediction) (X, Y, Z) int, spacing_mm (3,)


def mean_dice(cases: Iterable[Case], decision: Dict, targets: Targets) -> np.ndarray:
    """(S,) float64 mean Dice per structure of `targets.structures` over (reference, prediction, spacing_mm)
    cases, the predictions post-processed by `decision`; a structure absent from both maps of a case is left
    out (NaN for a structure absent from every case). One pass over `cases`, one case held at a time."""
    per_structure = [[] for _ in targets.structures]
    for case_dice in map(partial(_case_dice, decision=decision, targets=targets), cases):
        for values, value in zip(per_structure, case_dice):
            if value is not None:
                values.append(value)
    return np.array([np.mean(d) if d else np.nan for d in per_structure])


def _case_dice(case: Case, decision: Dict, targets: Targets) -> List[Optional[float]]:
    """Dice per structure of one case after `decision`, the voxels whose reference is the ignore label left out
    of the prediction (scoring.py); None where the structure is in neither map."""
    reference, prediction, spacing = case
    processed = scoring.without_ignored(reference, apply(prediction, decision, spacing, targets), targets.ignore_label)
    dice = []
    for _, values in targets.structures:
        a, b = np.isin(reference, values), np.isin(processed, values)
        dice.append(scoring.dice(a, b) if a.any() or b.any() else None)
    return dice


def decide(cases: Iterable[Case], targets: Targets) -> Dict:
    """The post-processing that raises the mean Dice over the structures of `targets` of the (reference,
    prediction, spacing_mm) cross-validation cases: the decision (the keys of `NOTHING`, with structure
    numbers) with "dice_before" and "dice_after" (per structure, None for a structure in no case) and "cases"
    (their number); JSON-ready. `cases` is re-iterable with a len() (a list, or evaluate.SavedPredictions
    reading them from disk): it is iterated once for the candidates and once per candidate, one case at a time."""
    decision = _merged(NOTHING, {})
    before = current = mean_dice(cases, decision, targets)
    for candidate in _candidates(cases, targets):
        trial = _merged(decision, candidate)
        dice = mean_dice(cases, trial, targets)
        if np.nanmean(dice) > np.nanmean(current) + MIN_GAIN and np.all(np.nan_to_num(dice - current) >= -MIN_GAIN):
            decision, current = trial, dice
    return {**decision, "dice_before": _json_floats(before), "dice_after": _json_floats(current), "cases": len(cases)}


def _json_floats(values: np.ndarray) -> List[Optional[float]]:
    return [None if np.isnan(v) else float(v) for v in values]


def _candidates(cases, targets: Targets) -> List[Dict]:
    numbers = range(1, len(targets.structures) + 1)
    candidates = [{"foreground_largest_component": True}]
    candidates += [{"largest_component_classes": [s]} for s in numbers]
    for s, smallest in zip(numbers, _smallest_components_mm3(cases, targets)):
        if smallest is not None:
            candidates.append({"min_island_mm3": {str(s): smallest / 2}})
    return candidates


def _smallest_components_mm3(cases, targets: Targets) -> List[Optional[float]]:
    """Per structure, the volume in mm3 of its smallest connected component in any reference (None: in none);
    one pass over `cases`."""
    smallest = [None] * len(targets.structures)
    for case_smallest in map(partial(_case_smallest_mm3, targets=targets), cases):
        smallest = [b if a is None else a if b is None else min(a, b) for a, b in zip(smallest, case_smallest)]
    return smallest


def _case_smallest_mm3(case: Case, targets: Targets) -> List[Optional[float]]:
    reference, _, spacing = case
    sizes = []
    for _, values in targets.structures:
        components, count = ndimage.label(np.isin(reference, values), structure=STRUCTURE)
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
