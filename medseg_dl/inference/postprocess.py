"""Applying a post-processing decision (connected components) to a label map: what predict and export follow.

The decision is chosen on cross-validation predictions by `evaluation.postprocessing.decide` (which imports
this module: inference does not import evaluation) and stored as `<experiment root>/postprocessing.json`:

    {"foreground_largest_component": bool,       # keep only the largest component of all foreground
     "largest_component_classes": [c, ...],      # per class c >= 1: keep only its largest component
     "min_island_mm3": {"c": mm3, ...}}          # per class c >= 1: drop its components smaller than mm3

(and informative keys such as the Dice before and after, ignored here). The steps run in this order.
Connectivity is 26 (faces, edges and corners); a removed voxel becomes background (0).
"""
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
from scipy import ndimage

from medseg_dl.errors import DataError

STRUCTURE = np.ones((3, 3, 3), bool)  # 26-connectivity
NOTHING = {"foreground_largest_component": False, "largest_component_classes": [], "min_island_mm3": {}}
DECISION_NAME = "postprocessing.json"  # in the experiment root (the folder given as --model-dir)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component (X, Y, Z) bool of a boolean mask (X, Y, Z) (the mask itself when it
    has at most one component; the first of equally large ones)."""
    components, count = ndimage.label(mask, structure=STRUCTURE)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == (int(np.argmax(sizes)) + 1)


def remove_islands(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """The boolean mask (X, Y, Z) without its 26-connected components of fewer than `min_voxels` voxels."""
    components, count = ndimage.label(mask, structure=STRUCTURE)
    if count == 0:
        return mask
    keep = np.bincount(components.ravel()) >= min_voxels
    keep[0] = False
    return keep[components]


def apply(labels: np.ndarray, decision: Dict, spacing_mm: Sequence[float]) -> np.ndarray:
    """`labels` (X, Y, Z) int after the accepted steps of `decision` (a copy of the same dtype; the input is
    unchanged). spacing_mm: (3,) voxel size of the grid of `labels`, for the island thresholds in mm^3."""
    out = np.array(labels, copy=True)
    if decision.get("foreground_largest_component"):
        out[~largest_component(out > 0)] = 0
    for c in decision.get("largest_component_classes", []):
        out[(out == int(c)) & ~largest_component(out == int(c))] = 0
    voxel_mm3 = float(np.prod(spacing_mm))
    for c, threshold_mm3 in decision.get("min_island_mm3", {}).items():
        mask = out == int(c)
        out[mask & ~remove_islands(mask, float(threshold_mm3) / voxel_mm3)] = 0
    return out


def read_decision(folder: Optional[str]) -> Optional[Dict]:
    """The decision in `<folder>/postprocessing.json`, or None when there is none (or no folder);
    `DataError` naming the file when it is not a decision."""
    path = os.path.join(folder, DECISION_NAME) if folder else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            decision = json.load(f)
        _check(decision)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: not a post-processing decision ({err}); write it with "
                        f"evaluation.postprocessing.decide, or delete it to predict without post-processing") from None
    return decision


def _check(decision):
    """ValueError/TypeError unless `decision` has the three steps with class numbers and mm^3 thresholds."""
    if not isinstance(decision, dict) or not set(NOTHING) <= set(decision):
        raise ValueError(f"it needs the keys {sorted(NOTHING)}")
    classes = [int(c) for c in decision["largest_component_classes"]]
    thresholds = {int(c): float(v) for c, v in decision["min_island_mm3"].items()}
    if min(classes + list(thresholds), default=1) < 1:
        raise ValueError("post-processing applies to foreground classes >= 1")
