"""The tf.data pipelines: exact crops at the reported positions, repeatability, channels and small
volumes, reading converted cases (train_inputs, volume_inputs), and user errors."""
import os

import numpy as np
import pytest
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.data import store
from medseg_dl.data.index import FORMAT_VERSION, write_index
from medseg_dl.data.preprocess import class_locations
from medseg_dl.errors import DataError, ParamsError
from medseg_dl.pipeline import inputs

ALL_ON = {"flip": {"p": 0.5}, "rotate": {"p": 1.0}, "scale": {"p": 1.0}, "elastic": {"p": 1.0},
          "noise": {"p": 1.0}, "gamma": {"p": 0.5}, "brightness_contrast": {"p": 0.5}, "blur": {"p": 0.5}}


def subject(name, shape, channels=1, num_classes=3, seed=0):
    """A volume dict of numpy arrays (as pipeline/inputs.py `read_case` reads a case), random image and labels."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_classes, size=shape).astype(np.int32)
    locations, counts, voxels = class_locations(label, num_classes, 100, rng)
    return {"subject": name, "image": rng.normal(size=(*shape, channels)).astype(np.float32), "label": label,
            "shape": np.array(shape, np.int32), "spacing_mm": np.array([1.0, 1.0, 1.5], np.float32),
            "class_locations": locations, "class_location_counts": counts, "class_voxels": voxels}


def volumes_dataset(subjects):
    channels = subjects[0]["image"].shape[-1]
    signature = {"subject": tf.TensorSpec([], tf.string), "image": tf.TensorSpec([None] * 3 + [channels]),
                 "label": tf.TensorSpec([None] * 3, tf.int32), "shape": tf.TensorSpec([3], tf.int32),
                 "spacing_mm": tf.TensorSpec([3], tf.float32),
                 "class_locations": tf.TensorSpec([None, 3], tf.int32),
                 "class_location_counts": tf.TensorSpec([None], tf.int32),
                 "class_voxels": tf.TensorSpec([None], tf.int64)}
    return tf.data.Dataset.from_generator(lambda: iter(subjects), output_signature=signature)


def make_params(augmentation=None, **sampling):
    sampling = {"batch_size": 4, "samples_per_volume": 2, "patch_size": [6, 7, 5], "patch_shuffle_buffer": 1,
                "deterministic": True, **sampling}
    return Params.from_dict({"data": {"num_classes": 3, "channels": ["a", "b"]}, "sampling": sampling,
                             "augmentation": augmentation or {}})


def numpy_crop(volume, start, size, mode="constant"):
    margin = max(size)
    padded = np.pad(volume, [(margin, margin)] * 3 + [(0, 0)] * (volume.ndim - 3), mode=mode)
    s = np.asarray(start) + margin
    return padded[s[0]:s[0] + size[0], s[1]:s[1] + size[1], s[2]:s[2] + size[2]]


def start_of(patch, volume, size, padding):
    """The first voxel of the one crop of `volume` (around a centre inside it) that equals `patch`."""
    shape = np.array(volume.shape[:3])
    for centre in np.ndindex(*shape):
        start = np.array(centre) - np.array(size) // 2
        if np.array_equal(numpy_crop(volume, start, size, padding), patch):
            return start
    raise AssertionError("the patch is no crop of its volume")


@pytest.mark.parametrize("padding", ["constant", "edge"])
def test_plain_patches_are_exact_crops_at_their_position(padding):
    subjects = [subject("a", (9, 10, 11), channels=2, seed=1), subject("b", (4, 5, 3), channels=2, seed=2),
                subject("c", (12, 7, 9), channels=2, seed=3)]
    size = [6, 7, 5]
    by_name = {s["subject"]: s for s in subjects}
    params = make_params(padding=padding)
    batches = list(inputs.patch_dataset(volumes_dataset(subjects).repeat(2), params, seed=0, in_flight=4).as_numpy_iterator())
    assert len(batches) == 3  # 12 patches / 4
    for batch in batches:
        assert batch["image"].shape == (4, *size, 2) and batch["label"].shape == (4, *size)
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        for image, label, position, name in zip(batch["image"], batch["label"], batch["position"], batch["subject"]):
            volume = by_name[name.decode()]
            start = start_of(image, volume["image"], size, padding)
            np.testing.assert_array_equal(label, numpy_crop(volume["label"], start, size, padding))
            middle = start + (np.array(size) - 1) / 2  # the geometric middle, as for inference windows
            np.testing.assert_allclose(position, np.clip(middle / np.maximum(volume["shape"] - 1, 1), 0, 1),
                                       rtol=1e-6, atol=1e-7)


def first_batches(params, subjects, seed=0, count=3):
    dataset = inputs.patch_dataset(volumes_dataset(subjects).repeat(), params, seed, in_flight=4)
    return [b for _, b in zip(range(count), dataset.as_numpy_iterator())]


def test_same_seed_same_batches_and_another_seed_differs():
    subjects = [subject(f"s{i}", (8, 9, 7), channels=2, seed=i) for i in range(3)]
    params = make_params(ALL_ON, patch_shuffle_buffer=3)
    first, again = first_batches(params, subjects), first_batches(params, subjects)
    other = first_batches(params, subjects, seed=1)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_two_channels_and_a_volume_smaller_than_the_patch_with_all_augmentations():
    subjects = [subject("small", (31, 40, 24), channels=2, seed=4)]
    params = make_params(ALL_ON, patch_size=[40, 56, 40], batch_size=3, samples_per_volume=3)
    batch = first_batches(params, subjects, count=1)[0]
    assert batch["image"].shape == (3, 40, 56, 40, 2) and batch["label"].shape == (3, 40, 56, 40)
    assert np.all(np.isfinite(batch["image"]))
    assert set(np.unique(batch["label"])) <= {0, 1, 2} and batch["label"].max() > 0
    assert np.all((batch["position"] >= 0) & (batch["position"] <= 1))
    assert np.std(batch["image"][..., 0]) > 0.1 and np.std(batch["image"][..., 1]) > 0.1


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_flipped_patch_gets_its_position_mirrored_on_the_flipped_axis(axis):
    """A patch whose only augmentation is a flip on `axis` is the mirrored crop at the same centre, and
    its position is 1 - p on that axis (the mirrored anatomy's side), unchanged on the others."""
    volume = inputs.prepare_volume(subject("a", (12, 9, 10), channels=2, seed=7), "constant")
    seed = tf.constant([0, 3], tf.int64)
    plain = inputs.volume_patches(volume, make_params(samples_per_volume=3), seed)
    flipped = inputs.volume_patches(volume, make_params({"flip": {"p": 1.0, "axes": [axis]}}, samples_per_volume=3),
                                    seed)
    np.testing.assert_array_equal(flipped["image"].numpy(), np.flip(plain["image"].numpy(), axis + 1))
    expected = plain["position"].numpy().copy()
    expected[:, axis] = 1.0 - expected[:, axis]
    np.testing.assert_allclose(flipped["position"].numpy(), expected, atol=1e-7)
    assert np.all(np.abs(expected[:, axis] - 0.5) > 0.01)  # mirroring changes the position


def write_cases(folder, subjects):
    """Case folders (data/store.py) of the `subject` dicts in `folder` with their dataset.json; returns the paths."""
    entries, paths = {}, []
    for s in subjects:
        path = str(folder / store.case_name(s["subject"]))
        entry = {"case": os.path.basename(path), "shape": [int(n) for n in s["shape"]],
                 "channels": s["image"].shape[-1], "spacing_mm": [float(v) for v in s["spacing_mm"]],
                 "affine": np.diag([*s["spacing_mm"], 1.0]).tolist(), "original_shape": [int(n) for n in s["shape"]],
                 "original_affine": np.eye(4).tolist(),
                 "class_location_counts": [int(c) for c in s["class_location_counts"]],
                 "class_voxels": [int(v) for v in s["class_voxels"]]}
        store.write_case(path, s["image"], s["label"], {"class_locations": s["class_locations"]}, entry)
        entries[s["subject"]], paths = entry, paths + [path]
    write_index(str(folder), {"format_version": FORMAT_VERSION, "subjects": entries})
    return paths


def params_for(folder, **sampling):
    """`make_params` reading the cases of `folder`."""
    values = make_params(**sampling).to_dict()
    values["data"]["converted_dir"] = str(folder)
    return Params.from_dict(values)


@pytest.mark.parametrize("cache", [True, False])
def test_train_inputs_repeat_cases_and_volume_inputs_keep_their_order(tmp_path, cache):
    subjects = [subject("rec_a", (9, 8, 7), channels=2, seed=5), subject("rec_b", (6, 10, 8), channels=2, seed=6)]
    paths = write_cases(tmp_path, subjects)
    params = params_for(tmp_path, patch_shuffle_buffer=4, cache=cache)
    batches = [b for _, b in zip(range(4), inputs.train_inputs(params, paths, seed=0).as_numpy_iterator())]
    assert len(batches) == 4  # 16 patches from 2 volumes: the pipeline repeats
    names = {n.decode() for b in batches for n in b["subject"]}
    assert names == {"rec_a", "rec_b"}
    volumes = list(inputs.volume_inputs(params, paths[::-1]).as_numpy_iterator())
    assert [v["subject"].decode() for v in volumes] == ["rec_b", "rec_a"]
    for volume, original in zip(volumes, subjects[::-1]):
        np.testing.assert_array_equal(volume["image"], original["image"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(volume["label"], original["label"])
        np.testing.assert_array_equal(volume["shape"], original["shape"])


def test_user_errors_name_the_fix():
    with pytest.raises(DataError, match="no converted cases given"):
        inputs.train_inputs(make_params(), [], seed=0)
    with pytest.raises(ParamsError, match="sampling.patch_size"):
        make_params(patch_size=[4, 0, 4])


@pytest.mark.parametrize("budget_mb, cached", [(0, False), (1, True)])
def test_cache_auto_caches_only_a_training_set_that_fits_its_budget(tmp_path, budget_mb, cached):
    subjects = [subject(f"rec_{i}", (9, 8, 7), channels=2, seed=i) for i in range(3)]
    paths = write_cases(tmp_path, subjects)
    params = params_for(tmp_path, input_budget_mb=budget_mb)
    decision, _, line = inputs.input_plan(params, paths)
    voxels = 11 * 10 * 9  # with the one-voxel border
    assert decision is cached and line.startswith(f"3 volumes, {3 * 9 * voxels / 2**20:.0f} MB decoded: ")
    assert ("cached in memory" in line) == cached and f"sampling.input_budget_mb: {budget_mb})" in line
    assert len(list(zip(range(3), inputs.train_inputs(params, paths, seed=0)))) == 3


@pytest.mark.parametrize("budget_mb, loaded_volumes, in_flight", [(0, 4, 1), (5, 4, 2), (100, 4, 4), (100, 3, 3)])
def test_volumes_loaded_at_once_are_as_many_of_the_largest_as_the_budget_holds(tmp_path, budget_mb, loaded_volumes,
                                                                               in_flight):
    """A 2.4 MB case (prepared: 9 bytes per voxel of 66 x 66 x 66 with the border) among small ones: the budget
    counts the largest, at least one volume is loaded, at most sampling.loaded_volumes."""
    subjects = [subject("big", (64, 64, 64), channels=2, seed=0), subject("small", (9, 8, 7), channels=2, seed=1)]
    paths = write_cases(tmp_path, subjects)
    params = params_for(tmp_path, input_budget_mb=budget_mb, loaded_volumes=loaded_volumes, cache=False)
    assert inputs.input_plan(params, paths)[1] == in_flight
    assert f"read from disk each epoch, {in_flight} at a time" in inputs.input_plan(params, paths)[2]


@pytest.mark.parametrize("cache", [True, False])
def test_each_epoch_reads_every_volume_once_in_a_new_order(tmp_path, cache):
    """No buffer of volumes that grows with the number of cases: volumes come in the shuffled order of the
    files, each once per epoch (one patch per volume, no patch shuffle: batch i is volume i)."""
    subjects = [subject(f"rec_{i}", (6, 6, 6), channels=2, seed=i) for i in range(5)]
    paths = write_cases(tmp_path, subjects)
    params = params_for(tmp_path, cache=cache, samples_per_volume=1, batch_size=1, patch_size=[3, 3, 3])
    names = [b["subject"][0].decode() for _, b in zip(range(15), inputs.train_inputs(params, paths, seed=1)
                                                      .as_numpy_iterator())]
    epochs = [names[i:i + 5] for i in range(0, 15, 5)]
    assert all(sorted(epoch) == sorted(s["subject"] for s in subjects) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1
