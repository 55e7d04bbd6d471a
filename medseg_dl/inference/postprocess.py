"""Applying a post-processing decision (connected components) to a label map: what predict and export follow.

The decision is chosen on cross-validation predictions by `evaluation.postprocessing.decide` (which imports
this module: inference does not import evaluation) and stored as `<experiment root>/postprocessing.json`
(experiment/experiment.py `Experiment.decision_path`):

    {"foreground_largest_component": bool,       # keep only the largest component of all foreground
     "largest_component_classes": [s, ...],      # per structure s >= 1: keep only its largest component
     "min_island_mm3": {"s": mm3, ...}}          # per structure s >= 1: drop its components smaller than mm3

(and informative keys such as the Dice before and after, ignored here). A structure s is the s-th of
`Targets.structures` (data/targets.py), counted from 1: class s with labels, the s-th region of
data.regions with regions. The steps run in this order, each on the label map the previous ones left.
A structure's mask is the voxels whose label is one of its label values (class s: the label s; a region:
its `labels`), as the evaluator scores it. Connectivity is 26 (faces, edges and corners). A voxel removed
from the foreground becomes background (0). A voxel removed from a structure is painted again by the
regions, in order, that hold its label and paint a value outside the structure (so it leaves the
structure and stays in every region it can), 0 when none: always 0 with labels; with BraTS's nested
regions (whole tumour [1, 2, 3] paints 1, tumour core [2, 3] paints 2, enhancing [3] paints 3) an
enhancing voxel removed from the enhancing tumour becomes 2 (tumour core), one removed from the tumour
core becomes 1 (whole tumour only).
"""
import json
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from medseg_dl.data.targets import LABEL_VALUES, Targets
from medseg_dl.errors import DataError

STRUCTURE = np.ones((3, 3, 3), bool)  # 26-connectivity
NOTHING = {"foreground_largest_component": False, "largest_component_classes": [], "min_island_mm3": {}}


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


def apply(labels: np.ndarray, decision: Dict, spacing_mm: Sequence[float], targets: Targets) -> np.ndarray:
    """`labels` (X, Y, Z) int in 0..255 after the accepted steps of `decision` (a copy of the same dtype; the input is
    unchanged). spacing_mm: (3,) voxel size of the grid of `labels`, for the island thresholds in mm^3;
    targets: the classes or regions that the decision's structure numbers name."""
    out = np.array(labels, copy=True)
    if decision.get("foreground_largest_component"):
        out[~largest_component(out > 0)] = 0
    for s in decision.get("largest_component_classes", []):
        _filter_structure(out, targets, int(s), largest_component)
    voxel_mm3 = float(np.prod(spacing_mm))
    for s, threshold_mm3 in decision.get("min_island_mm3", {}).items():
        _filter_structure(out, targets, int(s), lambda mask: remove_islands(mask, float(threshold_mm3) / voxel_mm3))
    return out


def structure_tables(targets: Targets, structure: int) -> Tuple[np.ndarray, np.ndarray]:
    """(inside (256,) bool, leaving (256,) int32) indexed by label value, for structure number `structure`
    (1-based in `targets.structures`): whether a label value belongs to the structure, and the value a voxel
    of that label takes when it leaves the structure (the paint of the last region that holds the label and
    paints a value outside the structure, 0 when none: always 0 with labels). The one rule of the numpy and
    the graph paths. ValueError naming the structure when the targets have no such structure."""
    if not 1 <= structure <= len(targets.structures):
        raise ValueError(f"structure = {structure}: the decision names a structure these targets do not have "
                         f"(1..{len(targets.structures)}: {[name for name, _ in targets.structures]})")
    inside = np.zeros(LABEL_VALUES, bool)
    inside[list(targets.structures[structure - 1][1])] = True
    leaving = np.zeros(LABEL_VALUES, np.int32)
    for region in targets.regions:
        if not inside[region.paint]:
            leaving[list(region.labels)] = region.paint
    return inside, leaving


def _filter_structure(out: np.ndarray, targets: Targets, structure: int,
                      keep: Callable[[np.ndarray], np.ndarray]) -> None:
    """In place on `out` (X, Y, Z) int in 0..255: the voxels of structure number `structure` outside keep(its
    mask (X, Y, Z) bool) leave it, taking their `structure_tables` leaving value."""
    inside, leaving = structure_tables(targets, structure)
    mask = inside[out]
    removed = mask & ~keep(mask)
    out[removed] = leaving[out[removed]]


def read_decision(path: Optional[str]) -> Optional[Dict]:
    """The decision in the file `path` (`Experiment.decision_path`), or None when there is no such file (or no
    path); `DataError` naming the file when it is not a decision."""
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
    """ValueError/TypeError unless `decision` has the three steps with structure numbers and mm^3 thresholds."""
    if not isinstance(decision, dict) or not set(NOTHING) <= set(decision):
        raise ValueError(f"it needs the keys {sorted(NOTHING)}")
    classes = [int(c) for c in decision["largest_component_classes"]]
    thresholds = {int(c): float(v) for c, v in decision["min_island_mm3"].items()}
    if min(classes + list(thresholds), default=1) < 1:
        raise ValueError("post-processing applies to structures numbered from 1 (foreground classes >= 1)")
