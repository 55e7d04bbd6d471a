"""Find subjects in a dataset folder and split them (the model folder keeps the split: experiment/).

Three layouts (params `data.layout`):
- `images_labels`: `images/<name>` and `labels/<name>` with equal names (one channel per file,
  or a 4D file holding all channels); a name may be a DICOM series folder.
- `msd`: Medical Segmentation Decathlon / nnU-Net raw: `dataset.json`, `imagesTr/`, `labelsTr/`;
  channels as `<case>_0000.nii.gz`, `<case>_0001.nii.gz`, ... or one 4D file `<case>.nii.gz`.
- `subject_folders`: one folder per subject; `data.channels` are glob patterns, one per channel,
  `data.label_pattern` finds the label, `data.mask_pattern` an optional mask.
"""
import glob
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from medseg_dl.errors import DataError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Subject:
    """One case: its id, one path per channel (or one 4D file), and optional label and mask paths."""

    id: str
    channels: List[str]
    label: Optional[str] = None
    mask: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def strip_suffix(name: str) -> str:
    """'case_001.nii.gz' -> 'case_001'; a folder name (DICOM series) is returned unchanged."""
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_volume_path(path: str) -> bool:
    """A file with a known volume suffix, or a folder (a DICOM series)."""
    return os.path.isdir(path) or path.endswith(VOLUME_SUFFIXES)


def find_subjects(data_params: Mapping) -> List[Subject]:
    """Subjects of `data_params.source_dir` in its layout, sorted by id; raises `DataError` if none."""
    source_dir = data_params["source_dir"]
    if not source_dir:
        raise DataError("data.source_dir is not set; give the folder of your dataset in the params file "
                        "or with --set data.source_dir=PATH")
    if not os.path.isdir(source_dir):
        raise DataError(f"{source_dir}: dataset folder not found; check data.source_dir")
    finder = {"images_labels": _images_labels, "msd": _msd, "subject_folders": _subject_folders}
    subjects = finder[data_params["layout"]](source_dir, data_params)
    if not subjects:
        raise DataError(f"{source_dir}: no subjects found for layout '{data_params['layout']}'; "
                        f"check data.layout and the file patterns (see docs/data.md, 'Three layouts')")
    ids = [s.id for s in subjects]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"{source_dir}: subject ids are not unique ({duplicates[:3]}); rename the files")
    return sorted(subjects, key=lambda s: s.id)


def _images_labels(source_dir, data_params):
    images_dir, labels_dir = os.path.join(source_dir, "images"), os.path.join(source_dir, "labels")
    for folder in (images_dir, labels_dir):
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: folder not found; layout 'images_labels' expects images/ and labels/ "
                            f"with equal file names")
    subjects = []
    for name in sorted(os.listdir(images_dir)):
        image_path = os.path.join(images_dir, name)
        if name.startswith(".") or not is_volume_path(image_path):
            continue
        label_path = os.path.join(labels_dir, name)
        if not os.path.exists(label_path):
            raise DataError(f"{image_path}: no label {label_path}; add it or remove the image")
        subjects.append(Subject(strip_suffix(name), [image_path], label_path))
    return subjects


def msd_channel_names(index: Dict) -> List[str]:
    """The channel names of an MSD or nnU-Net dataset.json (`index`, loaded): its "channel_names" (nnU-Net v2)
    or "modality" (MSD), in channel order; ["image"] when it names none."""
    names = index.get("channel_names") or index.get("modality") or {"0": "image"}
    return [names[k] for k in sorted(names, key=int)]


def _msd(source_dir, data_params):
    index_path = os.path.join(source_dir, "dataset.json")
    if not os.path.isfile(index_path):
        raise DataError(f"{index_path}: not found; layout 'msd' expects dataset.json, imagesTr/ and labelsTr/")
    with open(index_path) as f:
        index = json.load(f)
    names = msd_channel_names(index)
    ending = index.get("file_ending", ".nii.gz")
    labels_dir, images_dir = os.path.join(source_dir, "labelsTr"), os.path.join(source_dir, "imagesTr")
    subjects = []
    for label_name in sorted(os.listdir(labels_dir)) if os.path.isdir(labels_dir) else []:
        if label_name.startswith(".") or not label_name.endswith(ending):
            continue
        case = label_name[: -len(ending)]
        split_files = [os.path.join(images_dir, f"{case}_{i:04d}{ending}") for i in range(len(names))]
        single_file = os.path.join(images_dir, case + ending)
        if all(os.path.isfile(p) for p in split_files):
            channels = split_files
        elif os.path.isfile(single_file):
            channels = [single_file]
        else:
            raise DataError(f"{split_files[0]}: image of case '{case}' not found (nor {single_file}); "
                            f"every label in labelsTr needs its image in imagesTr")
        subjects.append(Subject(case, channels, os.path.join(labels_dir, label_name)))
    return subjects


def match_one(folder: str, pattern: str, what: str) -> Optional[str]:
    """The one file of `folder` matching `pattern`, or None; `DataError` if several match."""
    matches = sorted(glob.glob(os.path.join(folder, pattern)))
    if len(matches) > 1:
        raise DataError(f"{folder}: {len(matches)} files match the {what} pattern '{pattern}'; "
                        f"make the pattern specific")
    return matches[0] if matches else None


def folder_channels(folder: str, patterns: List[str]) -> Optional[List[str]]:
    """One file per channel pattern in `folder`, or None when a channel is missing."""
    channels = [match_one(folder, p, "channel") for p in patterns]
    return None if any(c is None for c in channels) else channels


def _subject_folders(source_dir, data_params):
    subjects = []
    candidates = sorted(glob.glob(os.path.join(source_dir, data_params["subject_glob"]), recursive=True))
    for folder in (c for c in candidates if os.path.isdir(c)):
        channels = folder_channels(folder, data_params["channels"])
        if channels is None:
            continue
        label = match_one(folder, data_params["label_pattern"], "label")
        if label is None:
            raise DataError(f"{folder}: channels found but no label matching '{data_params['label_pattern']}'; "
                            f"fix data.label_pattern or remove the folder")
        mask = match_one(folder, data_params["mask_pattern"], "mask") if data_params["mask_pattern"] else None
        subjects.append(Subject(os.path.basename(os.path.normpath(folder)), channels, label, mask))
    return subjects


def split_subjects(ids: List[str], split_params: Mapping, seed: int) -> Dict[str, List[str]]:
    """{'train', 'val', 'test'} lists of ids: explicit `split.lists`, seeded fractions, or one fold.

    Fractions round to the nearest count, with at least one subject for a non-zero fraction. With
    `split.folds` > 0 (k-fold cross-validation), the lists are those of fold `split.fold`: test as
    `fold_lists` holds it out, val = that fold, train = the other folds.
    """
    ids = sorted(ids)
    if split_params.get("lists"):
        return _explicit_split(ids, split_params["lists"])
    if split_params.get("folds"):
        return _one_fold(ids, split_params, seed)
    shuffled, n_val, n_test = _seeded_order(ids, split_params, seed)
    if n_val + n_test >= len(ids):
        raise DataError(f"only {len(ids)} subjects: data.split (val={split_params['val']}, "
                        f"test={split_params['test']}) leaves none for training; lower the fractions")
    val = shuffled[:n_val]
    test = shuffled[n_val: n_val + n_test]
    train = shuffled[n_val + n_test:]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def fold_lists(ids: List[str], split_params: Mapping, seed: int) -> Tuple[List[str], List[List[str]]]:
    """(test ids, [ids of fold 0, fold 1, ...]) of k-fold cross-validation, k = `split.folds`; each sorted.

    The test subjects are held out first: those the same seed and fractions give without folds (so
    they depend on neither the fold nor k), widened to whole groups. The others, in the seeded order,
    are grouped by `split.group_pattern`: the first group of its match (`re.search`) names a subject's
    patient; a subject whose id it does not match (or without a pattern, every subject) is a group of
    its own. Groups are dealt largest first, each to the currently smallest fold (ties: the lower
    fold), so fold sizes differ by as little as the groups allow (by at most 1 without groups).
    Raises `DataError` if there are fewer groups than folds.
    """
    shuffled, n_val, n_test = _seeded_order(sorted(ids), split_params, seed)
    group_of = _patient_of(split_params.get("group_pattern"))
    test_groups = {group_of(i) for i in shuffled[n_val: n_val + n_test]}
    groups: Dict[tuple, List[str]] = {}  # insertion order: the seeded order
    for subject in shuffled:
        if group_of(subject) not in test_groups:
            groups.setdefault(group_of(subject), []).append(subject)
    k = split_params["folds"]
    if len(groups) < k:
        raise DataError(f"only {len(groups)} subjects (or patients) besides the test ones for data.split.folds = "
                        f"{k}; lower data.split.folds or data.split.test")
    folds: List[List[str]] = [[] for _ in range(k)]
    for members in sorted(groups.values(), key=len, reverse=True):  # stable: ties keep the seeded order
        min(folds, key=len).extend(members)
    test = [i for i in shuffled if group_of(i) in test_groups]
    return sorted(test), [sorted(f) for f in folds]


def _one_fold(ids, split_params, seed):
    test, folds = fold_lists(ids, split_params, seed)
    k = split_params.get("fold")
    if k is None or not 0 <= k < len(folds):
        raise DataError(f"data.split.fold = {k!r}: expected 0..{len(folds) - 1} for data.split.folds = "
                        f"{len(folds)}; train one fold at a time with --fold k")
    train = [i for j, fold in enumerate(folds) if j != k for i in fold]
    return {"train": sorted(train), "val": folds[k], "test": test}


def _seeded_order(ids, split_params, seed):
    """(ids in the seed's order, validation count, test count): the order every split draws from."""
    order = np.random.default_rng(seed).permutation(len(ids))
    counts = [_count(split_params[name], len(ids)) for name in ("val", "test")]
    return [ids[i] for i in order], counts[0], counts[1]


def _patient_of(pattern: Optional[str]) -> Callable[[str], tuple]:
    """subject id -> its group key: ('patient', first group of `pattern`), or ('subject', id) if unmatched."""
    compiled = re.compile(pattern) if pattern else None

    def group_of(subject_id: str) -> tuple:
        match = compiled.search(subject_id) if compiled else None
        return ("patient", match.group(1)) if match and match.group(1) is not None else ("subject", subject_id)
    return group_of


def _count(fraction, n):
    return 0 if fraction <= 0 else max(1, int(round(fraction * n)))


def _explicit_split(ids, lists):
    known = set(ids)
    split = {name: sorted(lists.get(name) or []) for name in ("train", "val", "test")}
    for name, members in split.items():
        unknown = [m for m in members if m not in known]
        if unknown:
            raise DataError(f"data.split.lists.{name} names unknown subjects {unknown[:3]}; "
                            f"known ids look like {sorted(known)[:3]}")
    _check_disjoint(split)
    return split


def _check_disjoint(split: Mapping[str, List[str]]) -> None:
    """Raise `DataError` if a subject id is in two of the {'train', 'val', 'test'} lists (leakage)."""
    names = list(split)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = sorted(set(split[first]) & set(split[second]))
            if shared:
                raise DataError(f"data.split.lists: subjects {shared[:3]} are in both {first} and {second}; "
                                f"put each subject in one list only")
