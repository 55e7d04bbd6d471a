"""The file lists of a model folder, `filelists/{train,val,test}.json` (ModelDir.filelist): the subjects of each
split, written once when the folder is prepared, then read by training, evaluation and show.

Each list holds subject dicts in split order: the id, the source files (channels, label, mask) and "bytes",
the size of each of those files (a DICOM folder: the sum of its files), by which a moved data folder is
recognised (`follow_moved_data`).
"""
import json
import os
from typing import Dict, List, Optional

from medseg_dl.config.params import Params
from medseg_dl.data.index import case_paths
from medseg_dl.data.subjects import Subject, find_subjects, split_subjects
from medseg_dl.errors import DataError, ModelDirError
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.runtime import atomic

SPLITS = ("train", "val", "test")


def filelists_written(model_dir: ModelDir) -> bool:
    """Whether the file list of every split exists."""
    return all(os.path.isfile(model_dir.filelist(s)) for s in SPLITS)


def write_filelists(params: Params, model_dir: ModelDir) -> Dict[str, List[str]]:
    """Discover subjects, split them by `data.split` and the seed, and save `filelists/<split>.json`
    (lists of subject dicts: id, source paths and "bytes", the size of each file). Returns the split
    {name: [ids]}."""
    subjects = find_subjects(params.data)
    split = split_subjects([s.id for s in subjects], params.data.split, params.seed)
    by_id: Dict[str, Subject] = {s.id: s for s in subjects}
    os.makedirs(model_dir.filelists, exist_ok=True)
    for name, ids in split.items():
        atomic.write_json(model_dir.filelist(name), [_filelist_entry(by_id[i]) for i in ids])
    return split


def _filelist_entry(subject: Subject) -> Dict:
    """A file list's entry of `subject`: its dict with "bytes", the size of each of its files (a DICOM folder:
    the sum of its files) in `_subject_files` order."""
    return {**subject.to_dict(), "bytes": [_size_bytes(path) for path in _subject_files(subject)]}


def _subject_files(subject: Subject) -> List[str]:
    return [*subject.channels, *(p for p in (subject.label, subject.mask) if p is not None)]


def _size_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)
    return os.path.getsize(path)


def filelist_subjects(model_dir: ModelDir, split: str) -> List[Subject]:
    """The subjects (with their source files) of `filelists/<split>.json`, in its order; `DataError` if it does
    not exist."""
    return [_entry_subject(entry) for entry in _filelist_entries(model_dir, split)]


def _filelist_entries(model_dir: ModelDir, split: str) -> List[Dict]:
    """The entries of `filelists/<split>.json`; `DataError` if it does not exist."""
    path = model_dir.filelist(split)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file list not found; run `medseg convert` or `medseg train` with the "
                        f"params file first")
    with open(path) as f:
        return json.load(f)


def _entry_subject(entry: Dict) -> Subject:
    return Subject(**{k: v for k, v in entry.items() if k != "bytes"})


def follow_moved_data(params: Params, model_dir: ModelDir) -> None:
    """When the subjects of the file lists are no longer where the lists say, or lie outside data.source_dir
    (the data folder was moved or copied): accept data.source_dir only if it holds the same subjects (the same
    ids, file names and sizes), then rewrite the file lists to point there and print one line; else
    `ModelDirError` naming the first difference, before anything is written. Nothing before the lists exist."""
    listed = {split: _filelist_entries(model_dir, split) for split in SPLITS
              if os.path.isfile(model_dir.filelist(split))}
    entries = [entry for split_entries in listed.values() for entry in split_entries]
    source_dir = params.data.source_dir
    if all(os.path.exists(path) and os.path.commonpath([path, source_dir]) == source_dir
           for entry in entries for path in _subject_files(_entry_subject(entry))):
        return
    found = {s.id: s for s in find_subjects(params.data)}
    difference = _first_difference(entries, found)
    if difference:
        raise ModelDirError(f"{source_dir}: not the data of {model_dir.root} ({difference}); set data.source_dir to "
                            f"the folder of its subjects, or start a new experiment.model_dir")
    for split, split_entries in listed.items():
        atomic.write_json(model_dir.filelist(split), [_filelist_entry(found[entry["id"]]) for entry in split_entries])
    print(f"data: the {len(entries)} subjects of the file lists are now read from {source_dir} (same ids, file names "
          f"and sizes)", flush=True)


def _first_difference(entries: List[Dict], found: Dict[str, Subject]) -> Optional[str]:
    """How the subjects `found` in a data folder differ from the file lists' `entries`, or None when they are
    the same: the same ids, and per subject the same file names and sizes."""
    listed_ids = {entry["id"] for entry in entries}
    if set(found) != listed_ids:
        missing, extra = sorted(listed_ids - set(found)), sorted(set(found) - listed_ids)
        return f"subjects missing: {missing[:3]}, not in the file lists: {extra[:3]}"
    for entry in entries:
        subject = found[entry["id"]]
        names, listed_names = ([os.path.basename(p) for p in _subject_files(s)]
                               for s in (subject, _entry_subject(entry)))
        if names != listed_names:
            return f"{subject.id}: files {names}, the file lists have {listed_names}"
        sizes = [_size_bytes(p) for p in _subject_files(subject)]
        if sizes != entry["bytes"]:
            return f"{subject.id}: file sizes {sizes} bytes, the file lists have {entry['bytes']}"
    return None


def read_filelist(model_dir: ModelDir, split: str) -> List[str]:
    """The subject ids of `filelists/<split>.json`; `DataError` if it does not exist."""
    return [entry["id"] for entry in _filelist_entries(model_dir, split)]


def split_case_paths(params: Params, model_dir: ModelDir, split: str) -> List[str]:
    """Case folder paths of the subjects of `split`; `DataError` if one is not converted yet."""
    return case_paths(params.data.converted_dir, read_filelist(model_dir, split))
