"""The fingerprint of a dataset: what `medseg plan` derives an experiment from, read from every case.

Per case: shape, spacing and orientation (from the headers), the foreground bounding box, the voxels
of each class; per channel: intensity statistics of all voxels and of the foreground (a seeded sample
of at most `SAMPLES_PER_CASE` voxels per case). The dataset summary pools them: median, 10th and 90th
percentiles of spacing and shape, class voxel fractions, intensity percentiles per channel.
"""
import os
from typing import Dict, List, Mapping

import nibabel as nib
import numpy as np

from medseg_dl.config import schema
from medseg_dl.data.cases import CaseRecipe, read_image, read_label
from medseg_dl.data.io import spacing_from_affine
from medseg_dl.data.subjects import Subject, find_subjects

SAMPLES_PER_CASE = 10000


def case_fingerprint(subject: Subject, recipe: CaseRecipe, rng: np.random.Generator) -> Dict:
    """Geometry, class voxels and intensity samples of one subject (its image and label files)."""
    image, _, affine = read_image(subject, recipe)
    label = read_label(subject, image.shape, affine, recipe)
    foreground = label > 0
    box = [[int(i.min()), int(i.max()) + 1] for i in np.nonzero(foreground)] if foreground.any() else None
    flat = image.reshape(-1, image.shape[-1])
    pick = rng.choice(len(flat), size=min(len(flat), SAMPLES_PER_CASE), replace=False)
    fg = image[foreground]
    fg_pick = rng.choice(len(fg), size=min(len(fg), SAMPLES_PER_CASE), replace=False) if len(fg) else []
    return {"id": subject.id, "shape_vox": list(label.shape), "spacing_mm": spacing_from_affine(affine).tolist(),
            "orientation": "".join(nib.orientations.aff2axcodes(affine)),
            "foreground_box_vox": box, "class_voxels": np.bincount(label.ravel()).tolist(),
            "samples": flat[pick], "foreground_samples": fg[fg_pick] if len(fg) else np.zeros((0, flat.shape[1]))}


def dataset_fingerprint(data_params: Mapping, seed: int = 0) -> Dict:
    """The fingerprint (JSON-ready dict) of every subject of a dataset folder (`data_params`: source_dir,
    layout, channels, label_pattern, mask_pattern, subject_glob); the number of classes is the largest
    label value + 1."""
    subjects = find_subjects(data_params)
    most_classes = int(schema.key("data.num_classes").maximum)
    recipe = CaseRecipe(len(data_params["channels"]), most_classes, {"affine_tolerance": 1e-3})
    rng = np.random.default_rng(seed)
    cases = [case_fingerprint(s, recipe, rng) for s in subjects]
    num_classes = max(len(c["class_voxels"]) for c in cases)
    for case in cases:
        case["class_voxels"] += [0] * (num_classes - len(case["class_voxels"]))
    return {"source_dir": os.path.abspath(data_params["source_dir"]), "layout": data_params["layout"],
            "cases": len(cases), "num_classes": num_classes,
            "spacing_mm": _percentiles([c["spacing_mm"] for c in cases]),
            "shape_vox": _percentiles([c["shape_vox"] for c in cases]),
            "orientations": sorted({c["orientation"] for c in cases}),
            "class_voxel_fraction": _class_fractions(cases), "classes_present_in": _present(cases, num_classes),
            "foreground_size_mm": _percentiles(_foreground_sizes_mm(cases)),
            "intensity": _intensities(cases), "per_case": [_without_samples(c) for c in cases]}


def _percentiles(rows: List) -> Dict:
    values = np.asarray(rows, np.float64)
    if values.size == 0:
        return {}
    return {name: np.percentile(values, q, axis=0).round(4).tolist()
            for name, q in (("p10", 10), ("median", 50), ("p90", 90))} | {
        "min": values.min(axis=0).tolist(), "max": values.max(axis=0).tolist()}


def _class_fractions(cases):
    totals = np.sum([c["class_voxels"] for c in cases], axis=0).astype(np.float64)
    return (totals / totals.sum()).round(6).tolist()


def _present(cases, num_classes):
    return [int(sum(c["class_voxels"][k] > 0 for c in cases)) for k in range(num_classes)]


def _foreground_sizes_mm(cases):
    return [[(hi - lo) * s for (lo, hi), s in zip(c["foreground_box_vox"], c["spacing_mm"])]
            for c in cases if c["foreground_box_vox"]]


def _intensities(cases):
    """Per channel: percentiles, mean and std of all sampled voxels and of the foreground samples."""
    stats = []
    everything = np.concatenate([c["samples"] for c in cases])
    foreground = np.concatenate([c["foreground_samples"] for c in cases])
    for channel in range(everything.shape[1]):
        stats.append({"all": _summary(everything[:, channel]), "foreground": _summary(foreground[:, channel])})
    return stats


def _summary(values):
    if len(values) == 0:
        return {}
    p = np.percentile(values, [0.5, 50, 99.5])
    return {"p00_5": float(p[0]), "median": float(p[1]), "p99_5": float(p[2]), "mean": float(values.mean()),
            "std": float(values.std())}


def _without_samples(case):
    return {k: v for k, v in case.items() if k not in ("samples", "foreground_samples")}
