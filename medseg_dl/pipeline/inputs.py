"""The tf.data pipelines: training patches (`train_inputs`, its patch stage `patch_dataset`) and
whole volumes for evaluation metrics (`volume_inputs`).

Training (`training_volumes`, then `patch_dataset`): the cases in a new random order each epoch ->
read from their case folders (data/store.py, TensorFlow ops) -> flattened for sampling (`prepare_volume`) -> `samples_per_volume` augmented
patches per volume in one vectorised call -> a small shuffle of patches (`patch_shuffle_buffer`,
which fills from the first volumes) -> batch -> prefetch. Memory is bounded by the settings, never by
the number of cases: `sampling.loaded_volumes` volumes are read and sampled at once; the decoded
volumes are cached in memory only when the whole training set fits `sampling.input_budget_mb`
(`sampling.cache: auto`), and fewer volumes are loaded at once when the budget holds fewer of the largest
(`input_plan` says what it decided). Patch draw number i uses the stateless
seed (seed, r_i), r_i the i-th number of tf.data's random dataset seeded with seed, so with
`sampling.deterministic` the same params give the same batches. With `training.input_service` the batches
are made on tf.data service workers (pipeline/service.py), each drawing from its own unseeded numbers.
"""
import json
import os
from typing import Sequence, Tuple

import numpy as np
import tensorflow as tf

from medseg_dl.data import preprocess, store
from medseg_dl.data.cases import stored_recipe
from medseg_dl.data.index import read_index
from medseg_dl.errors import DataError
from medseg_dl.pipeline import intensity, sampling, spatial
from medseg_dl.pipeline.service import served

AUTOTUNE = tf.data.AUTOTUNE


def prepare_volume(volume, padding):
    """A decoded volume dict -> the dict the patch stage reads: flat_image (L, C) float32 and flat_label
    (L,) uint8 (the volume with a one-voxel border, see spatial.flatten_padded, zero-padded at the end
    to L = the next of 8 steps per octave, so that the compiled sampler meets few distinct shapes at
    <= 12.5 % extra memory), shape (3,) int32, spacing_mm (3,) float32 (the voxel size in mm, for the
    augmentation in mm), class_locations, class_location_counts, class_voxels, subject.
    Map it before `cache()`: the copy is then made once per volume, not once per draw."""
    flat_image, shape_vox = spatial.flatten_padded(volume["image"], padding)
    flat_label, _ = spatial.flatten_padded(tf.cast(volume["label"], tf.uint8), padding)
    length = tf.shape(flat_label)[0]
    octave = tf.math.floor(tf.math.log(tf.cast(length, tf.float32)) / tf.math.log(2.0))
    step = tf.cast(2.0 ** tf.maximum(octave - 3.0, 0.0), tf.int32)
    extra = (length + step - 1) // step * step - length
    return {"flat_image": tf.pad(flat_image, [[0, extra], [0, 0]]), "flat_label": tf.pad(flat_label, [[0, extra]]),
            "shape": shape_vox, "spacing_mm": tf.cast(volume["spacing_mm"], tf.float32),
            "class_locations": volume["class_locations"],
            "class_location_counts": volume["class_location_counts"], "class_voxels": volume["class_voxels"],
            "subject": volume["subject"]}


_PATCH_FUNCTIONS = {}  # one per configuration: pipelines built again reuse its XLA compilations


def patch_function(params):
    """A function (prepared volume dict (see `prepare_volume`), middles (S, 3) float32, seed (2,) int64)
    -> (images (S, px, py, pz, C) float32, labels (S, px, py, pz) int32, flips (S, 3) bool: the axes each
    patch was mirrored on): random parameters drawn with plain TF ops, then two XLA-compiled calls
    (params.augmentation, params.sampling.padding): sampling grid + sampling (one compilation per bucket
    of volume sizes; the volume's spacing_mm is a tensor argument), and intensity augmentation."""
    size, aug, padding = list(params.sampling.patch_size), params.augmentation, params.sampling.padding
    key = json.dumps([size, aug.to_dict(), padding], sort_keys=True)
    if key not in _PATCH_FUNCTIONS:
        _PATCH_FUNCTIONS[key] = _build_patch_function(size, aug, padding)
    return _PATCH_FUNCTIONS[key]


def _build_patch_function(size, aug, padding):
    image_sampler = spatial.sample_linear_flat if spatial.spatial_enabled(aug) else spatial.sample_nearest_flat

    @tf.function(jit_compile=True)
    def sample(flat_image, flat_label, shape_vox, spacing_mm, middles, drawn):
        coords = spatial.spatial_coordinates(middles, size, drawn, spacing_mm)
        return (image_sampler(flat_image, shape_vox, coords, padding),
                tf.cast(spatial.sample_nearest_flat(flat_label, shape_vox, coords, padding), tf.int32))

    @tf.function(jit_compile=True)
    def change_intensity(images, drawn):
        return intensity.apply_intensity(images, aug, drawn)

    def patches(volume, middles, seed):
        count = middles.shape[0]
        drawn = spatial.draw_spatial(aug, count, tf.random.experimental.stateless_fold_in(seed, 0))
        images, labels = sample(volume["flat_image"], volume["flat_label"], volume["shape"], volume["spacing_mm"],
                                middles, drawn)
        if intensity.intensity_enabled(aug):
            drawn_intensity = intensity.draw_intensity(aug, tf.shape(images),
                                                       tf.random.experimental.stateless_fold_in(seed, 1))
            images = change_intensity(images, drawn_intensity)
        return images, labels, drawn.get("flips", tf.zeros([count, 3], tf.bool))

    return patches


def volume_patches(volume, params, seed):
    """`samples_per_volume` augmented patches of one prepared volume dict (`prepare_volume`) as a dict:
    image (S, px, py, pz, C) float32, label (S, px, py, pz) int32, position (S, 3) float32
    (`sampling.patch_positions`, mirrored on the axes the patch was flipped on: `sampling.mirror_positions`),
    subject (S,) string. seed: (2,) int64 stateless seed of this draw."""
    size = list(params.sampling.patch_size)
    count = params.sampling.samples_per_volume
    centres = sampling.patch_centres(volume, params.sampling, count, tf.random.experimental.stateless_fold_in(seed, 0),
                                     params.data.ignore_label)
    starts = sampling.patch_starts(centres, size)
    middles = sampling.patch_middles(starts, size)
    image, label, flips = patch_function(params)(volume, middles, tf.random.experimental.stateless_fold_in(seed, 1))
    channels = volume["flat_image"].shape[-1]
    return {"image": tf.ensure_shape(image, [count, *size, channels]),
            "label": tf.ensure_shape(label, [count, *size]),
            "position": sampling.mirror_positions(sampling.patch_positions(starts, size, volume["shape"]), flips),
            "subject": tf.fill([count], volume["subject"])}


def patch_dataset(volumes, params, seed, in_flight):
    """Batches of augmented patches from a dataset of decoded volume dicts (at least image (X,Y,Z,C)
    float32, label (X,Y,Z) of an integer type, spacing_mm (3,), class_locations, class_location_counts, class_voxels,
    subject)
    or of dicts already mapped through `prepare_volume` (do that before a `cache()`, as `train_inputs` does),
    `in_flight` volumes sampled at once (`input_plan`).

    Yields dicts: image (N, px, py, pz, C) float32, label (N, px, py, pz) int32, position (N, 3)
    float32, subject (N,) string, N = sampling.batch_size; ends when `volumes` ends (after the last
    full batch). seed: int of the patch draws and the patch shuffle."""
    sampling_params = params.sampling
    deterministic = sampling_params.deterministic

    if "flat_image" not in volumes.element_spec:
        volumes = volumes.map(lambda volume: prepare_volume(volume, sampling_params.padding), AUTOTUNE,
                              deterministic=deterministic)

    def draw(draw_seed, volume):
        return volume_patches(volume, params, tf.stack([tf.constant(seed, tf.int64), draw_seed]))

    # unseeded on tf.data service workers: each worker draws its own patches (seeded, all would draw the same)
    draw_seeds = tf.data.Dataset.random(seed=None if params.training.input_service else seed)
    patches = tf.data.Dataset.zip(draw_seeds, volumes).map(draw, num_parallel_calls=in_flight,
                                                           deterministic=deterministic)
    patches = patches.unbatch()
    if sampling_params.patch_shuffle_buffer > 1:
        patches = patches.shuffle(sampling_params.patch_shuffle_buffer, seed=seed)
    patches = patches.batch(sampling_params.batch_size, drop_remainder=True)
    return patches.prefetch(AUTOTUNE).with_options(_options(deterministic))


def train_inputs(params, cases, seed):
    """Endless training batches (see `patch_dataset`) from the converted `cases` (case folder paths, indexed
    in data.converted_dir), through `training_volumes`; made by the tf.data service at
    `training.input_service` when it is set (pipeline/service.py). seed: int of the case order and the patch
    draws (training passes params.seed + the step it resumes from)."""
    entries = case_entries(params, cases, "train_inputs")
    cache, in_flight, reason = input_plan(params, cases)
    print(f"training input: {reason}", flush=True)
    batches = patch_dataset(training_volumes(params, entries, seed, cache, in_flight), params, seed, in_flight)
    address = params.training.input_service
    return batches if address is None else served(batches, address)


def training_volumes(params, entries: tf.data.Dataset, seed, cache: bool, in_flight: int) -> tf.data.Dataset:
    """Prepared training volumes (`prepare_volume`), endlessly, each epoch all cases of `entries` (`case_entries`)
    in a new random order (seed: int). Cached in memory after the first epoch with `cache`, else read again each
    epoch, `in_flight` at once (`input_plan`): the memory of the reads is then about that many prepared volumes,
    whatever the number of cases."""
    deterministic, count = params.sampling.deterministic, int(entries.cardinality())
    if not cache:
        entries = entries.shuffle(count, seed=seed, reshuffle_each_iteration=True).repeat()
    vectors = intensity_vectors(params)
    volumes = entries.map(lambda entry: prepare_volume(read_case(entry, params, vectors), params.sampling.padding),
                          num_parallel_calls=in_flight, deterministic=deterministic)
    if cache:
        volumes = volumes.cache().shuffle(count, seed=seed, reshuffle_each_iteration=True).repeat()
    return volumes


def case_entries(params, cases: Sequence[str], caller: str) -> tf.data.Dataset:
    """The index entries (dataset.json) of the case folders `cases`, in their order, as a dataset of dicts:
    case () string (the path), subject () string, shape (3,) int32, spacing_mm (3,) float32, affine (4, 4)
    float64, original_shape (3,) int32, original_affine (4, 4) float64, class_location_counts (K,) int32,
    class_voxels (K,) int64 (every voxel of each class).
    `DataError` naming `caller` when there are none."""
    cases = [str(c) for c in cases]
    if not cases:
        raise DataError(f"{caller}: no converted cases given; check the file list (<model_dir>/filelists/) and "
                        f"run `medseg convert`")
    by_case = {entry["case"]: (subject, entry) for subject, entry in read_index(params.data.converted_dir)["subjects"]
               .items()}
    chosen = [by_case[os.path.basename(c)] for c in cases]
    columns = {"case": (cases, tf.string), "subject": ([s for s, _ in chosen], tf.string)}
    for key, dtype in (("shape", tf.int32), ("spacing_mm", tf.float32), ("affine", tf.float64),
                       ("original_shape", tf.int32), ("original_affine", tf.float64),
                       ("class_location_counts", tf.int32), ("class_voxels", tf.int64)):
        columns[key] = ([e[key] for _, e in chosen], dtype)
    return tf.data.Dataset.from_tensor_slices({k: tf.constant(v, dtype) for k, (v, dtype) in columns.items()})


def read_case(entry, params, vectors) -> dict:
    """One case entry (`case_entries`) with its arrays read (data/store.py `read_volume`): image (X, Y, Z, C)
    float32 as the network sees it (the stored intensities, ct channels through `vectors`: (clip(x, low, high) -
    mean) / std, as preprocess.apply_ct does in numpy), label (X, Y, Z) uint8, class_locations (M, 3) int32."""
    volume = store.read_volume(entry["case"], entry["shape"], len(params.data.channels))
    low, high, mean, std = (tf.constant(v) for v in vectors)
    volume["image"] = (tf.clip_by_value(volume["image"], low, high) - mean) / std
    return {**entry, **volume}


def intensity_vectors(params) -> Tuple[np.ndarray, ...]:
    """The (C,) float32 vectors of `read_case` (preprocess.ct_vectors) with the statistics of the converted
    dataset (its dataset.json)."""
    return preprocess.ct_vectors(params.preprocessing.normalization, stored_recipe(params).ct_stats,
                                 len(params.data.channels))


def input_plan(params, cases: Sequence[str]) -> Tuple[bool, int, str]:
    """(whether the training volumes are cached, how many are read and sampled at once, a line saying why), from
    their prepared sizes ((4 x channels + 1) bytes per voxel with the one-voxel border, read from the index) and
    `sampling.input_budget_mb`: `sampling.cache` true, false, or auto (cached when all fit the budget); without
    the cache `sampling.loaded_volumes` at once, fewer when the budget holds fewer of the largest (at least one).
    Never cached with `training.input_service` (each worker gets cases from the dispatcher, not all of them)."""
    sampling_params = params.sampling
    entries = {entry["case"]: entry for entry in read_index(params.data.converted_dir)["subjects"].values()}
    sizes_mb = [_prepared_bytes(entries[os.path.basename(c)]) / 2**20 for c in cases]
    budget_mb, setting = sampling_params.input_budget_mb, sampling_params.cache
    in_flight = int(min(sampling_params.loaded_volumes, max(1, budget_mb // max(sizes_mb, default=1))))
    settings = (f"sampling.cache: {setting}, sampling.loaded_volumes: {sampling_params.loaded_volumes}, "
                f"sampling.input_budget_mb: {budget_mb}")
    reading = f"read from disk each epoch, {in_flight} at a time ({settings})"
    if params.training.input_service is not None:
        return False, in_flight, f"{len(cases)} volumes, made by the tf.data service at " \
                                 f"{params.training.input_service}: {reading}"
    total_mb = sum(sizes_mb)
    cache = total_mb <= budget_mb if setting == "auto" else setting
    return cache, in_flight, f"{len(cases)} volumes, {total_mb:.0f} MB decoded: " + \
        (f"cached in memory ({settings})" if cache else reading)


def _prepared_bytes(entry) -> int:
    """Bytes of one prepared volume (`prepare_volume` without its bucket padding) from its index entry."""
    return (4 * entry["channels"] + 1) * int(np.prod([n + 2 for n in entry["shape"]]))


def volume_inputs(params, cases):
    """Whole volumes (dicts of `case_entries` with the arrays of `read_case`), one at a time, in the order of
    `cases` (case folder paths), without augmentation: the evaluation metrics pipeline."""
    vectors = intensity_vectors(params)
    volumes = case_entries(params, cases, "volume_inputs").map(lambda entry: read_case(entry, params, vectors),
                                                               num_parallel_calls=AUTOTUNE, deterministic=True)
    return volumes.prefetch(1)


def _options(deterministic):
    options = tf.data.Options()
    options.deterministic = deterministic
    return options
