"""`dataset.json`: the index of a converted folder (its format version, settings, settings hash, CT
statistics, and per subject its case folder (store.py), shape, channels, geometry, class counts and source
paths), written by convert.py. A folder converted in another format is refused with one line.
"""
import json
import os
from typing import List, Sequence

from medseg_dl.errors import DataError
from medseg_dl.runtime import atomic

INDEX_NAME = "dataset.json"
FORMAT_VERSION = 2  # 1: one TFRecord per subject; 2: one chunked case folder per subject (store.py)


def read_index(converted_dir: str) -> dict:
    """The `dataset.json` of a converted folder; `DataError` if the folder was not converted."""
    path = os.path.join(converted_dir, INDEX_NAME)
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found; convert the dataset first with `medseg convert --params P`")
    with open(path) as f:
        index = json.load(f)
    if index.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: converted by an older medseg_dl (format {index.get('format_version')}; this one "
                        f"reads format {FORMAT_VERSION}); convert again with `medseg convert --params P --overwrite`")
    return index


def write_index(converted_dir: str, index: dict) -> None:
    """Write `dataset.json` atomically."""
    atomic.write_json(os.path.join(converted_dir, INDEX_NAME), index)


def case_paths(converted_dir: str, subject_ids: Sequence[str]) -> List[str]:
    """Paths of the case folders of `subject_ids` from the index; `DataError` for a subject not converted."""
    index = read_index(converted_dir)
    missing = [s for s in subject_ids if s not in index["subjects"]]
    if missing:
        raise DataError(f"{os.path.join(converted_dir, INDEX_NAME)}: subjects {missing[:3]} are not converted; "
                        f"run `medseg convert` with the same params")
    return [os.path.join(converted_dir, index["subjects"][s]["case"]) for s in subject_ids]
