"""Dataset conversion: raw subjects -> preprocessed cases (cases.py) -> one case folder each (store.py) +
`dataset.json` (index.py).

Subjects are converted in parallel processes (`data.workers`, fewer when memory would not hold them);
each case folder is written atomically, so a crash or a bad subject leaves no partial folder, and
`dataset.json` is rewritten (atomically) after each finished subject, so a killed conversion loses none
of them; the temporaries a killed run left are removed when the next one starts. Subjects already
converted with the same settings are skipped unless `overwrite`. A failed write is a `DataError` (a full
disk: `DiskFullError`). Each case also stores, per class, up to `preprocessing.max_locations_per_class`
voxel locations for class-balanced sampling, drawn with a generator seeded by (seed, crc32(subject id)).

One pass per case: with normalization ct a case keeps its intensities in HU and up to CT_SAMPLES_PER_SUBJECT
foreground intensities (drawn with the same generator); the dataset's statistics are pooled from the samples
of every indexed case at the end of each run (`_ct_statistics`) and applied when a case is read, so adding
cases reads no converted case again.
"""
import contextlib
import hashlib
import json
import multiprocessing
import os
import time
import zlib
from typing import Iterator, Optional, Sequence

import nibabel as nib
import numpy as np
from tqdm import tqdm

from medseg_dl.config.params import Params
from medseg_dl.data import preprocess, store
from medseg_dl.data.cases import recipe_from_params, stored_case, uses
from medseg_dl.data.index import FORMAT_VERSION, INDEX_NAME, read_index, write_index
from medseg_dl.data.subjects import Subject, find_subjects
from medseg_dl.errors import DataError, MedsegError, ModelDirError
from medseg_dl.runtime.atomic import disk_full_error, is_disk_full, remove_stale_temporaries
from medseg_dl.runtime.locks import ProcessLock

CONVERSION_LOCK = "convert.lock"
CT_SAMPLES = "ct_samples"  # the case folder's file of foreground intensities (store.write_case)
CT_SAMPLES_PER_SUBJECT = 10000


def conversion_settings(params: Params) -> dict:
    """Everything that changes a converted case: if it differs, a subject is converted again."""
    data = params.data
    return {"format_version": FORMAT_VERSION, "layout": data.layout, "channels": list(data.channels),
            "num_classes": data.num_classes, "seed": params.seed, "preprocessing": params.preprocessing.to_dict()}


def settings_hash(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _subject_rng(seed, subject_id):
    """The generator of one subject's random draws at conversion: seeded by (seed, crc32(id))."""
    return np.random.default_rng([seed, zlib.crc32(subject_id.encode())])


def _convert_one(job):
    subject, recipe, settings, out_dir = job
    case = stored_case(subject, recipe)
    rng = _subject_rng(settings["seed"], subject.id)
    locations, counts, voxels = preprocess.class_locations(
        case.label, recipe.num_classes, recipe.preprocessing["max_locations_per_class"], rng)
    small_arrays = {"class_locations": locations}
    if uses(recipe.preprocessing, "ct"):
        small_arrays[CT_SAMPLES] = preprocess.foreground_samples(case.image, case.label, CT_SAMPLES_PER_SUBJECT, rng)
    name = store.case_name(subject.id)
    entry = {"case": name, "shape": list(case.label.shape), "channels": int(case.image.shape[-1]),
             "spacing_mm": [float(s) for s in case.spacing_mm], "affine": np.asarray(case.affine).tolist(),
             "original_shape": list(case.original_shape), "original_affine": np.asarray(case.original_affine).tolist(),
             "class_location_counts": [int(c) for c in counts], "class_voxels": [int(v) for v in voxels],
             "source": subject.to_dict(), "settings_hash": settings_hash(settings)}
    try:
        store.write_case(os.path.join(out_dir, name), case.image, case.label, small_arrays, entry)
    except OSError as err:
        raise write_error(out_dir, err) from None
    return subject.id, entry


def write_error(out_dir: str, err: OSError) -> MedsegError:
    """The error of a failed write into `out_dir`: a `DiskFullError` with the free space when the disk is full
    (atomic.is_disk_full), else a `DataError` with the system's text of the error."""
    kept = "the subjects already converted are kept"
    if is_disk_full(err):
        return disk_full_error(out_dir, "the converted data", f"run convert again; {kept}")
    text = err.strerror or str(err)
    return DataError(f"{out_dir}: cannot write the converted data ({text}); make the folder writable and run convert "
                     f"again; {kept}")


def save_index(out_dir: str, index: dict) -> None:
    """Sort the index's subjects and write `dataset.json` atomically; a failed write is `write_error`'s."""
    index["subjects"] = dict(sorted(index["subjects"].items()))
    try:
        write_index(out_dir, index)
    except OSError as err:
        raise write_error(out_dir, err) from None


# peak RSS of one conversion process above its baseline, per voxel and channel of the case it converts: 6.0 B
# measured without resampling (a 512 x 512 x 1000 int16 CT case, benchmarks/scale.py W7: 2234 MB against the
# 730 MB of a process converting a tiny case); resampling adds its float32 copies, hence 12
CONVERSION_BYTES_PER_VOXEL = 12


def _run_parallel(function, jobs, workers, description):
    """Yield function(job) for each job, in parallel 'spawn' processes when workers > 1. After the last
    job the workers exit on their own; an error stops them at once."""
    if workers <= 1 or len(jobs) <= 1:
        yield from tqdm(map(function, jobs), total=len(jobs), desc=description, disable=None)
        return
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_fork_by_default)
    try:
        yield from tqdm(pool.imap_unordered(function, jobs), total=len(jobs), desc=description, disable=None)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _fork_by_default():
    """Make 'fork' a worker's default start method, so that the locks libraries create in it are unlinked
    at once: itk's lazy loader makes a multiprocessing RLock on the first volume the worker reads. With the
    pool's 'spawn' it is a named semaphore that only the worker's exit handlers unlink, and a worker stopped
    by terminate() would leave it for the resource tracker to report as leaked."""
    multiprocessing.set_start_method("fork", force=True)


def convert_dataset(params: Params, overwrite: bool = False) -> dict:
    """Convert every subject of `params.data.source_dir` into `params.data.converted_dir`.

    Returns the index dict written to `dataset.json`. Raises `DataError` on the first bad subject;
    the subjects finished before it keep their (complete) records and index entries: the index is
    written after each subject. Temporaries of killed conversions in the folder are removed first."""
    subjects = find_subjects(params.data)
    settings = conversion_settings(params)
    out_dir = params.data.converted_dir
    os.makedirs(out_dir, exist_ok=True)
    with conversion_lock(out_dir):
        return _convert(params, subjects, settings, out_dir, overwrite)


@contextlib.contextmanager
def conversion_lock(out_dir: str) -> Iterator[ProcessLock]:
    """Hold the folder's conversion lock, waiting while another process converts into it (e.g. the trainers
    of two cross-validation folds sharing one converted folder); a lock of a process that is gone is taken."""
    lock = ProcessLock(os.path.join(out_dir, CONVERSION_LOCK), "conversion")
    while True:
        try:
            lock.acquire()
            break
        except ModelDirError as err:
            print(f"waiting: {err}", flush=True)
            time.sleep(5.0)
    try:
        yield lock
    finally:
        lock.release()


def _convert(params, subjects, settings, out_dir, overwrite):
    remove_stale_temporaries(out_dir)
    index = _existing_index(out_dir, settings, overwrite)
    todo = [s for s in subjects if overwrite or s.id not in index["subjects"]
            or not os.path.isdir(os.path.join(out_dir, index["subjects"][s.id]["case"]))]
    workers = conversion_workers(params.data.workers, todo, len(params.data.channels))
    jobs = [(s, recipe_from_params(params), settings, out_dir) for s in todo]
    try:
        for subject_id, entry in _run_parallel(_convert_one, jobs, workers, "convert"):
            index["subjects"][subject_id] = entry
            save_index(out_dir, index)
    finally:
        if uses(params.preprocessing, "ct"):
            index["ct_stats"] = _ct_statistics(index, out_dir, params)
        save_index(out_dir, index)
    return index


def conversion_workers(requested: int, subjects: Sequence[Subject], channels: int) -> int:
    """How many processes convert `subjects` at once: `requested` (data.workers), fewer when that many copies
    of the largest case (`CONVERSION_BYTES_PER_VOXEL` per voxel and channel, its size read from the NIfTI
    headers) would not fit 80% of the memory available now; at least 1. Prints the decision when it bounds."""
    voxels = [_header_voxels(s.channels[0]) for s in subjects]
    known = [v for v in voxels if v is not None]
    if requested <= 1 or not known:
        return max(1, requested)
    per_worker = CONVERSION_BYTES_PER_VOXEL * max(known) * channels
    available = _available_memory_bytes()
    fitting = max(1, int(0.8 * available // per_worker))
    if fitting < requested:
        print(f"convert: {fitting} worker(s), not data.workers = {requested}: a worker needs about "
              f"{per_worker / 2**30:.1f} GB for the largest case ({max(known) / 1e6:.0f} M voxels x {channels} "
              f"channel(s)) and {available / 2**30:.1f} GB are available", flush=True)
    return min(requested, fitting)


def _header_voxels(path: str) -> Optional[int]:
    """The voxel count of a NIfTI file from its header (nothing else is read); None for other formats."""
    if not path.endswith((".nii", ".nii.gz")):
        return None
    try:
        return int(np.prod(nib.load(path).shape[:3]))
    except (OSError, ValueError, nib.filebasedimages.ImageFileError):
        return None  # reported by the conversion itself, with the file's name


def _available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux), else the total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _ct_statistics(index, out_dir, params):
    """The dataset's CT statistics (preprocess.ct_statistics) from the foreground samples stored in every case
    of the index (no image is read); None while no case is converted."""
    samples = [store.read_small(os.path.join(out_dir, entry["case"]), CT_SAMPLES, np.float32, entry["channels"])
               for _, entry in sorted(index["subjects"].items())]
    if not samples:
        return None
    pooled = np.concatenate(samples)
    return preprocess.ct_statistics([pooled[:, c] for c in range(pooled.shape[1])], params.preprocessing.ct_percentiles)


def _existing_index(out_dir, settings, overwrite):
    fresh = {"format_version": FORMAT_VERSION, "settings": settings, "settings_hash": settings_hash(settings),
             "channels": settings["channels"], "num_classes": settings["num_classes"], "subjects": {}}
    path = os.path.join(out_dir, INDEX_NAME)
    if overwrite or not os.path.isfile(path):
        return fresh
    index = read_index(out_dir)  # DataError for a folder converted in an older format
    if index.get("settings_hash") != fresh["settings_hash"]:
        return fresh  # other settings: every subject is converted again
    return index
