"""Dataset conversion: raw subjects -> preprocessed cases -> one TFRecord each + `dataset.json`.

Subjects are converted in parallel processes (`data.workers`); each record is written under a
temporary name and renamed, so a crash or a bad subject leaves no partial file. Subjects already
converted with the same settings are skipped unless `overwrite`.
"""
import hashlib
import json
import multiprocessing
import os
import zlib

import numpy as np
from tqdm import tqdm

from medseg_dl.data import preprocess, tfrecords
from medseg_dl.data.io import read_volume, spacing_from_affine
from medseg_dl.data.subjects import Subject, find_subjects
from medseg_dl.errors import DataError

FORMAT_VERSION = 1
CT_SAMPLES_PER_SUBJECT = 10000


def conversion_settings(params):
    """Everything that changes a converted record: if it differs, a subject is converted again."""
    data = params.data
    return {"format_version": FORMAT_VERSION, "layout": data.layout, "channels": list(data.channels),
            "num_classes": data.num_classes, "seed": params.seed, "gzip": data.gzip,
            "preprocessing": params.preprocessing.to_dict()}


def settings_hash(settings):
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def read_image(subject: Subject, settings):
    """Read and check the channels (and mask) of one subject. Returns (image (X,Y,Z,C) float32,
    mask (X,Y,Z) bool or None, affine (4,4) float64). Raises `DataError` naming the file."""
    volumes = [read_volume(p) for p in subject.channels]
    first = volumes[0]
    tolerance = settings["preprocessing"]["affine_tolerance"]
    for path, volume in zip(subject.channels, volumes):
        preprocess.check_finite(volume.data, path)
    for path, volume in zip(subject.channels[1:], volumes[1:]):
        preprocess.check_same_grid(first.data.shape, first.affine, volume.data.shape, volume.affine,
                                   path, subject.channels[0], tolerance)
    arrays = [v.data[..., None] if v.data.ndim == 3 else v.data for v in volumes]
    image = np.concatenate(arrays, axis=-1).astype(np.float32)
    expected = len(settings["channels"])
    if image.shape[-1] != expected:
        raise DataError(f"{subject.channels[0]}: subject '{subject.id}' has {image.shape[-1]} channels but "
                        f"data.channels lists {expected}; every subject needs the same channels")
    mask = None
    if subject.mask:
        mask_volume = read_volume(subject.mask)
        preprocess.check_same_grid(first.data.shape, first.affine, mask_volume.data.shape, mask_volume.affine,
                                   subject.mask, subject.channels[0], tolerance)
        mask = mask_volume.data > 0.5
    return image, mask, first.affine


def read_subject(subject: Subject, settings):
    """`read_image` plus the checked label map: (image, label (X,Y,Z) int32, mask, affine)."""
    image, mask, affine = read_image(subject, settings)
    label_volume = read_volume(subject.label)
    preprocess.check_same_grid(image.shape, affine, label_volume.data.shape, label_volume.affine,
                               subject.label, subject.channels[0], settings["preprocessing"]["affine_tolerance"])
    label = preprocess.to_labels(np.asarray(label_volume.data), settings["num_classes"], subject.label)
    return image, label, mask, affine


def to_model_grid(array, affine, prep, order):
    """Reorient (preprocessing.reorient_ras) and resample (target_spacing_mm) one array with spline
    `order`; returns (array, affine) on the grid the model sees."""
    if prep["reorient_ras"]:
        array, affine = preprocess.reorient_to_ras(array, affine)
    if prep["target_spacing_mm"]:
        array, affine = preprocess.resample(array, affine, prep["target_spacing_mm"], order)
    return array, affine


def prepare_image(image, mask, affine, settings, ct_stats, subject_id):
    """Image (and mask) on the model grid, normalised: (image float32, mask or None, affine)."""
    prep = settings["preprocessing"]
    if prep["normalization"] == "zscore_mask" and mask is None:
        raise DataError(f"subject '{subject_id}': preprocessing.normalization is zscore_mask but it has no "
                        f"mask; set data.mask_pattern or use zscore")
    image_grid, grid_affine = to_model_grid(image, affine, prep, order=3)
    mask_grid = to_model_grid(mask.astype(np.float32), affine, prep, 0)[0] > 0.5 if mask is not None else None
    return preprocess.normalize(image_grid, prep["normalization"], mask_grid, ct_stats), mask_grid, grid_affine


def preprocess_subject(subject: Subject, settings, ct_stats=None):
    """Read, check, reorient, resample and normalise one subject; returns a case dict ready for
    `tfrecords.serialize_subject` (see its module docstring)."""
    image, label, mask, affine = read_subject(subject, settings)
    image_grid, _, grid_affine = prepare_image(image, mask, affine, settings, ct_stats, subject.id)
    label_grid = to_model_grid(label, affine, settings["preprocessing"], order=0)[0].astype(np.int32)
    rng = np.random.default_rng([settings["seed"], zlib.crc32(subject.id.encode())])
    locations, counts, voxels = preprocess.class_locations(
        label_grid, settings["num_classes"], settings["preprocessing"]["max_locations_per_class"], rng)
    return {"subject": subject.id, "image": image_grid, "label": label_grid, "affine": grid_affine,
            "spacing_mm": spacing_from_affine(grid_affine), "class_locations": locations,
            "class_location_counts": counts, "class_voxels": voxels,
            "original_shape": label.shape, "original_affine": affine}


def _convert_one(job):
    subject, settings, ct_stats, out_dir = job
    case = preprocess_subject(subject, settings, ct_stats)
    name = tfrecords.record_name(subject.id, settings["gzip"])
    tfrecords.write_record(os.path.join(out_dir, name), tfrecords.serialize_subject(case), settings["gzip"])
    return subject.id, {
        "file": name, "shape": list(case["label"].shape), "channels": int(case["image"].shape[-1]),
        "spacing_mm": [float(s) for s in case["spacing_mm"]],
        "class_voxels": [int(v) for v in case["class_voxels"]],
        "source": subject.to_dict(), "settings_hash": settings_hash(settings),
        "intensity_mean": [float(m) for m in case["image"].reshape(-1, case["image"].shape[-1]).mean(0)],
    }


def _foreground_samples(job):
    subject, settings = job
    image, label, _, _ = read_subject(subject, settings)
    values = image[label > 0]
    rng = np.random.default_rng([settings["seed"], zlib.crc32(subject.id.encode())])
    keep = rng.choice(len(values), size=min(len(values), CT_SAMPLES_PER_SUBJECT), replace=False)
    return values[keep]


def _run_parallel(function, jobs, workers, description):
    """Yield function(job) for each job, in parallel 'spawn' processes when workers > 1."""
    if workers <= 1 or len(jobs) <= 1:
        yield from tqdm(map(function, jobs), total=len(jobs), desc=description, disable=None)
        return
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
    try:
        yield from tqdm(pool.imap_unordered(function, jobs), total=len(jobs), desc=description, disable=None)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def convert_dataset(params, overwrite=False):
    """Convert every subject of `params.data.source_dir` into `params.data.tfrecords_dir`.

    Returns the index dict written to `dataset.json`. Raises `DataError` on the first bad subject;
    the subjects finished before it keep their (complete) records and index entries."""
    subjects = find_subjects(params.data)
    settings = conversion_settings(params)
    out_dir = params.data.tfrecords_dir
    os.makedirs(out_dir, exist_ok=True)
    index = _existing_index(out_dir, settings, overwrite)
    todo = [s for s in subjects if overwrite or s.id not in index["subjects"]
            or not os.path.isfile(os.path.join(out_dir, index["subjects"][s.id]["file"]))]
    ct_stats = index.get("ct_stats")
    if settings["preprocessing"]["normalization"] == "ct" and (ct_stats is None or todo):
        ct_stats = _ct_statistics(subjects, settings, params.data.workers)
        index["ct_stats"] = ct_stats
    jobs = [(s, settings, ct_stats, out_dir) for s in todo]
    try:
        for subject_id, entry in _run_parallel(_convert_one, jobs, params.data.workers, "convert"):
            index["subjects"][subject_id] = entry
    finally:
        index["subjects"] = dict(sorted(index["subjects"].items()))
        tfrecords.write_index(out_dir, index)
    return index


def _ct_statistics(subjects, settings, workers):
    jobs = [(s, settings) for s in subjects]
    samples = np.concatenate(list(_run_parallel(_foreground_samples, jobs, workers, "ct statistics")))
    return preprocess.ct_statistics([samples[:, c] for c in range(samples.shape[1])],
                                    settings["preprocessing"]["ct_percentiles"])


def _existing_index(out_dir, settings, overwrite):
    fresh = {"format_version": FORMAT_VERSION, "settings": settings, "settings_hash": settings_hash(settings),
             "channels": settings["channels"], "num_classes": settings["num_classes"], "subjects": {}}
    path = os.path.join(out_dir, tfrecords.INDEX_NAME)
    if overwrite or not os.path.isfile(path):
        return fresh
    index = tfrecords.read_index(out_dir)
    if index.get("settings_hash") != fresh["settings_hash"]:
        return fresh  # other settings: every subject is converted again
    return index
