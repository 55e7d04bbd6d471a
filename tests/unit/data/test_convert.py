"""Conversion of real cases: the cases read back (pipeline `volume_inputs`) equal what nibabel reads and
normalises directly, to float16 precision (the stored type)."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
import zlib

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
import yaml

from helpers import HIPPO_CASES, REPO, hippo_params, synthetic_dataset, tiny_params, write_nifti
from medseg_dl.config.params import Params
from medseg_dl.data import convert, store
from medseg_dl.data.convert import convert_dataset
from medseg_dl.errors import DataError, DiskFullError
from medseg_dl.pipeline.inputs import volume_inputs
from medseg_dl.runtime import atomic


def read_back(params, subject_id):
    """The converted case of `subject_id` as the pipelines read it (a dict of numpy arrays)."""
    path = os.path.join(params.data.converted_dir, store.case_name(subject_id))
    return next(volume_inputs(params, [path]).as_numpy_iterator())


def assert_float16_close(stored, expected):
    """`stored` (read back: float16 values as float32) equals `expected` to float16 rounding."""
    np.testing.assert_allclose(stored, expected, rtol=2 ** -10, atol=2 ** -14)


def nibabel_zscore(path):
    data = np.asanyarray(nib.load(path).dataobj).astype(np.float64)
    return ((data - data.mean()) / data.std()).astype(np.float32)


def test_hippocampus_records_equal_nibabel(hippo_dir, tmp_path):
    params = Params.from_dict(hippo_params(hippo_dir, tmp_path / "run"))
    index = convert_dataset(params)
    assert sorted(index["subjects"]) == HIPPO_CASES
    for case in HIPPO_CASES:
        record = read_back(params, case)
        image_nib = nib.load(str(hippo_dir / "images" / f"{case}.nii.gz"))
        label = np.asanyarray(nib.load(str(hippo_dir / "labels" / f"{case}.nii.gz")).dataobj)
        assert_float16_close(record["image"][..., 0], nibabel_zscore(image_nib.get_filename()))
        np.testing.assert_array_equal(record["label"], label.astype(np.int32))
        np.testing.assert_array_equal(record["affine"], image_nib.affine)
        np.testing.assert_allclose(record["spacing_mm"], image_nib.header.get_zooms()[:3])
        assert record["subject"].decode() == case
        counts = record["class_location_counts"]
        assert counts.sum() == len(record["class_locations"])
        start = 0
        for k, n in enumerate(counts):  # every stored location really holds its class
            locs = record["class_locations"][start:start + n]
            assert np.all(record["label"][tuple(locs.T)] == k)
            start += n


def test_second_run_skips_and_overwrite_redoes(hippo_dir, tmp_path):
    params = Params.from_dict(hippo_params(hippo_dir, tmp_path / "run"))
    convert_dataset(params)
    case = os.path.join(params.data.converted_dir, store.case_name(HIPPO_CASES[0]))
    mtime = os.path.getmtime(case)
    convert_dataset(params)
    assert os.path.getmtime(case) == mtime
    convert_dataset(params, overwrite=True)
    assert os.path.getmtime(case) > mtime
    assert store.read_arrays(case)["meta"]["shape"] == list(read_back(params, HIPPO_CASES[0])["shape"])


def test_parallel_workers_give_identical_records(hippo_dir, tmp_path):
    serial = Params.from_dict(hippo_params(hippo_dir, tmp_path / "a"))
    parallel = Params.from_dict(hippo_params(hippo_dir, tmp_path / "b", data={"workers": 2}))
    convert_dataset(serial)
    convert_dataset(parallel)
    for case in HIPPO_CASES[:2]:
        a, b = read_back(serial, case), read_back(parallel, case)
        for key in ("image", "label", "class_locations"):
            np.testing.assert_array_equal(a[key], b[key])


def test_brats_subject_two_channels_equal_nibabel(brats_subject_dir, tmp_path):
    params = Params.from_dict({
        "experiment": {"model_dir": str(tmp_path / "run")},
        "data": {"source_dir": str(brats_subject_dir), "layout": "subject_folders",
                 "channels": ["Flair*.nii.gz", "T1c*.nii.gz"], "label_pattern": "OTMultiClass*",
                 "mask_pattern": "brainmask*", "num_classes": 5, "workers": 1},
        "preprocessing": {"normalization": "zscore_mask"}})
    index = convert_dataset(params)
    entry = index["subjects"]["brats_2013_pat0005_1"]
    assert entry["class_voxels"] == [8847318, 23030, 35416, 3882, 18354]  # as documented in the data README
    record = read_back(params, "brats_2013_pat0005_1")
    folder = brats_subject_dir / "brats_2013_pat0005_1"
    mask = nib.load(str(folder / "brainmask.nii.gz")).get_fdata() > 0.5
    assert record["image"].shape == (240, 240, 155, 2)
    for c, name in enumerate(["Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd"]):
        image = nib.load(str(folder / f"{name}.nii.gz"))
        data = np.asanyarray(image.dataobj).astype(np.float64)
        expected = np.where(mask, (data - data[mask].mean()) / data[mask].std(), 0.0)
        assert_float16_close(record["image"][..., c], expected)
        np.testing.assert_array_equal(record["affine"], image.affine)  # LPS affine kept as is
    assert json.load(open(os.path.join(params.data.converted_dir, "dataset.json")))["num_classes"] == 5


def test_resampling_and_reorientation_keep_geometry(hippo_dir, tmp_path):
    params = Params.from_dict(hippo_params(hippo_dir, tmp_path / "run", preprocessing={
        "target_spacing_mm": [2.0, 2.0, 1.5], "reorient_ras": True}))
    convert_dataset(params)
    record = read_back(params, HIPPO_CASES[0])
    source = nib.load(str(hippo_dir / "images" / f"{HIPPO_CASES[0]}.nii.gz"))
    np.testing.assert_allclose(record["spacing_mm"], [2.0, 2.0, 1.5])
    np.testing.assert_array_equal(record["original_shape"], source.shape)
    np.testing.assert_array_equal(record["original_affine"], source.affine)
    np.testing.assert_allclose(record["affine"][:3, 3], source.affine[:3, 3])  # voxel 0 stays in place
    expected_shape = np.round(np.array(source.shape) / np.array([2.0, 2.0, 1.5])).astype(int)
    np.testing.assert_array_equal(record["shape"], expected_shape)
    assert set(np.unique(record["label"])) <= {0, 1, 2}


def test_volume_inputs_fix_the_channel_dimension(hippo_dir, tmp_path):
    params = Params.from_dict(hippo_params(hippo_dir, tmp_path / "run"))
    convert_dataset(params)
    dataset = volume_inputs(params, [os.path.join(params.data.converted_dir, store.case_name(HIPPO_CASES[0]))])
    assert dataset.element_spec["image"].shape.as_list() == [None, None, None, 1]
    assert dataset.element_spec["label"].dtype == tf.uint8


def test_a_folder_converted_in_the_older_format_is_refused_with_the_fix(hippo_dir, tmp_path):
    from medseg_dl.errors import DataError

    params = Params.from_dict(hippo_params(hippo_dir, tmp_path / "run"))
    os.makedirs(params.data.converted_dir)
    with open(os.path.join(params.data.converted_dir, "dataset.json"), "w") as f:
        json.dump({"format_version": 1, "subjects": {}}, f)
    with pytest.raises(DataError, match=r"dataset.json: converted by an older medseg_dl \(format 1; this one reads "
                                        r"format 2\); convert again with `medseg convert --params P --overwrite`"):
        convert_dataset(params)
    assert len(convert_dataset(params, overwrite=True)["subjects"]) == 4


def indexed_subjects(converted_dir):
    """The subject ids in `dataset.json`, or [] while it does not exist yet."""
    try:
        with open(os.path.join(converted_dir, "dataset.json")) as stream:
            return list(json.load(stream)["subjects"])
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or read while it is replaced
        return []


def test_killed_conversion_keeps_finished_subjects(tmp_path):
    """kill -9 in the middle: the next run converts only the subjects the index does not list, and removes the
    temporaries the dead process left."""
    root = synthetic_dataset(tmp_path / "data", cases=24, shape=(40, 40, 40))
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(tiny_params(root, tmp_path / "run")))
    out_dir = tmp_path / "run" / "converted"
    command = [sys.executable, "-m", "medseg_dl.cli", "convert", "--params", str(params_path)]
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(indexed_subjects(out_dir)) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = indexed_subjects(out_dir)
    assert 3 <= len(finished) < 24, f"killed with {len(finished)} subjects indexed; make the cases larger"
    (out_dir / f".tmp-{process.pid}-deadbeef-x.case").mkdir()  # a half-written case folder
    mtimes = {s: (out_dir / store.case_name(s)).stat().st_mtime_ns for s in finished}
    subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True, timeout=120)
    assert len(indexed_subjects(out_dir)) == 24
    assert {s: (out_dir / store.case_name(s)).stat().st_mtime_ns for s in finished} == mtimes
    assert not [f for f in os.listdir(out_dir) if f.startswith(".tmp-")]


def test_normalisation_per_channel_matches_numpy():
    from medseg_dl.data.preprocess import apply_ct, ct_vectors, normalize

    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(100, 20, (6, 5, 4)), rng.uniform(-1000, 1000, (6, 5, 4)),
                      rng.normal(3, 2, (6, 5, 4))], axis=-1).astype(np.float32)
    methods, stats = ["zscore", "ct", "none"], [None, {"low": -500.0, "high": 500.0, "mean": 10.0, "std": 250.0}, None]
    stored = normalize(image.copy(), methods)
    np.testing.assert_allclose(stored[..., 0], (image[..., 0] - image[..., 0].mean()) / image[..., 0].std(), atol=1e-5)
    np.testing.assert_array_equal(stored[..., 1], np.rint(image[..., 1]))  # kept in HU, normalised when read
    np.testing.assert_array_equal(stored[..., 2], image[..., 2])
    seen = apply_ct(stored.copy(), ct_vectors(methods, stats, 3))
    np.testing.assert_array_equal(seen[..., [0, 2]], stored[..., [0, 2]])  # the identity on other channels
    np.testing.assert_allclose(seen[..., 1], (np.clip(np.rint(image[..., 1]), -500, 500) - 10) / 250, atol=1e-6)


def synthetic_ct(root, names, shape=(24, 20, 16)):
    """images/ + labels/ of int16 HU cases (air -1000, a noisy body, a brighter organ: label 1), one per name."""
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    for name in names:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        body = x ** 2 + y ** 2 < 0.8
        organ = body & ((x - rng.uniform(-.3, .3)) ** 2 + y ** 2 + z ** 2 < rng.uniform(0.1, 0.3))
        image = np.where(body, rng.normal(40, 30, shape) + 150 * organ, -1000)
        write_nifti(root / "images" / f"{name}.nii.gz", image.astype(np.int16))
        write_nifti(root / "labels" / f"{name}.nii.gz", organ.astype(np.uint8) + body)


def ct_params(data, run):
    return Params.from_dict(tiny_params(data, run, data={"num_classes": 3, "split": {"val": 0.0}},
                                        preprocessing={"normalization": "ct"}))


def test_ct_conversion_is_one_pass_and_added_cases_read_no_converted_case(tmp_path, monkeypatch):
    """Converting 3 cases, then 3 more, reads each file once and gives the CT statistics and the case folders
    of converting all 6 at once (the reference); the statistics come from the stored samples."""
    from medseg_dl.data import cases

    names = [f"ct_{i}" for i in range(6)]
    synthetic_ct(tmp_path / "all", names)
    synthetic_ct(tmp_path / "grown", names[:3])
    reference = convert_dataset(ct_params(tmp_path / "all", tmp_path / "ref"))
    params = ct_params(tmp_path / "grown", tmp_path / "run")
    convert_dataset(params)
    converted = tmp_path / "run" / "converted"
    before = {n: (converted / store.case_name(n) / "image" / "0.0.0").stat().st_mtime_ns for n in names[:3]}
    synthetic_ct(tmp_path / "grown", names[3:])
    read = []
    monkeypatch.setattr(cases, "read_volume", lambda path, real=cases.read_volume: read.append(path) or real(path))
    grown = convert_dataset(params)
    assert sorted(os.path.basename(p) for p in read) == sorted([f"{n}.nii.gz" for n in names[3:]] * 2)
    assert before == {n: (converted / store.case_name(n) / "image" / "0.0.0").stat().st_mtime_ns for n in names[:3]}
    assert grown["ct_stats"] == reference["ct_stats"]
    for name in names:
        ours, theirs = (store.read_arrays(str(root / "converted" / store.case_name(name)))
                        for root in (tmp_path / "run", tmp_path / "ref"))
        for key in ("image", "label", "class_locations"):
            np.testing.assert_array_equal(ours[key], theirs[key])


def test_a_converted_ct_case_reads_as_predict_makes_it_and_as_the_formula_says(tmp_path):
    """The pipelines' CT normalisation (TensorFlow, when a case is read) equals predict's (numpy, subject_case)
    bit for bit, and (clip(HU, low, high) - mean) / std with the dataset's statistics."""
    from medseg_dl.data.cases import stored_recipe, subject_case
    from medseg_dl.data.subjects import find_subjects

    synthetic_ct(tmp_path / "data", ["a", "b"])
    params = ct_params(tmp_path / "data", tmp_path / "run")
    stats = convert_dataset(params)["ct_stats"][0]
    assert stats["low"] < stats["high"] and stats["std"] > 0
    for subject in find_subjects(params.data):
        read = read_back(params, subject.id)["image"]
        np.testing.assert_array_equal(read, subject_case(subject, stored_recipe(params)).image)
        hu = np.asanyarray(nib.load(subject.channels[0]).dataobj).astype(np.float64)
        expected = (np.clip(hu, stats["low"], stats["high"]) - stats["mean"]) / stats["std"]
        np.testing.assert_allclose(read[..., 0], expected, rtol=1e-6, atol=1e-6)


def test_converting_a_case_allocates_at_most_12_bytes_per_voxel(tmp_path):
    """Peak memory that numpy allocates while one case of int16 CT is converted (read, normalise, locations,
    samples, write), traced by tracemalloc: at most 12 bytes per voxel."""
    from medseg_dl.data.cases import recipe_from_params
    from medseg_dl.data.convert import _convert_one, conversion_settings
    from medseg_dl.data.subjects import find_subjects

    synthetic_ct(tmp_path / "data", ["big"], shape=(160, 160, 96))
    params = ct_params(tmp_path / "data", tmp_path / "run")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    subject = find_subjects(params.data)[0]
    tracemalloc.start()
    try:
        _convert_one((subject, recipe_from_params(params), conversion_settings(params), str(out_dir)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 12 * 160 * 160 * 96, f"{peak / (160 * 160 * 96):.1f} bytes per voxel"


def test_conversion_workers_are_bounded_by_memory(tmp_path, monkeypatch, capsys):
    """data.workers unless that many copies of the largest case (12 B per voxel and channel) would not fit
    80% of the available memory; at least one; unknown sizes (not NIfTI) do not bound."""
    from medseg_dl.data import convert
    from medseg_dl.data.subjects import Subject

    synthetic_dataset(tmp_path, cases=2, shape=(20, 30, 14))
    subjects = [Subject(f"case_0{i}", [str(tmp_path / "images" / f"case_0{i}.nii.gz")]) for i in range(2)]
    per_worker = 12 * 8400 * 2  # 8400 voxels, 2 channels
    monkeypatch.setattr(convert, "_available_memory_bytes", lambda: int(3.5 * per_worker / 0.8))
    assert convert.conversion_workers(8, subjects, 2) == 3
    assert "convert: 3 worker(s), not data.workers = 8" in capsys.readouterr().out
    assert convert.conversion_workers(2, subjects, 2) == 2
    monkeypatch.setattr(convert, "_available_memory_bytes", lambda: 10)
    assert convert.conversion_workers(4, subjects, 2) == 1
    assert convert.conversion_workers(4, [Subject("d", [str(tmp_path / "dicom_folder")])], 1) == 4


def fill_disk_after(calls, exception):
    """A fault for store.write_case / write_index: the first `calls` calls write, later ones start a temporary
    (as the real writers do) and fail with `exception` in the middle."""
    done = []

    def fault(real, path, *args):
        if len(done) < calls:
            done.append(path)
            return real(path, *args)
        with atomic.replacing(path) as temporary, open(temporary, "wb") as stream:
            stream.write(b"half a record")
            raise exception
    return fault


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("what", ["case", "index"])
def test_full_disk_during_conversion(tmp_path, monkeypatch, what):
    """The case writer (or the index writer) fails after 3 subjects as on a full disk."""
    params = Params.from_dict(tiny_params(synthetic_dataset(tmp_path / "d", cases=6), tmp_path / "run"))
    fault = fill_disk_after(3, ENOSPC)
    if what == "case":
        real_case = store.write_case
        monkeypatch.setattr(store, "write_case", lambda path, *a: fault(real_case, path, *a))
    else:
        real_index = convert.write_index
        monkeypatch.setattr(convert, "write_index", lambda folder, index: fault(
            lambda _, i: real_index(folder, i), os.path.join(folder, "dataset.json"), index))
    out_dir = params.data.converted_dir
    with pytest.raises(DiskFullError) as err:
        convert_dataset(params)
    assert re.fullmatch(rf"{re.escape(out_dir)}: the disk is full \(\d+ MB free\) while writing the converted data; "
                        rf"free disk space, then run convert again; the subjects already converted are kept",
                        str(err.value)), str(err.value)
    assert not [f for f in os.listdir(out_dir) if f.startswith(".tmp-")]
    with open(os.path.join(out_dir, "dataset.json")) as stream:
        assert sorted(json.load(stream)["subjects"]) == ["case_00", "case_01", "case_02"]


def test_another_write_failure_during_conversion_is_not_a_full_disk(tmp_path, monkeypatch):
    params = Params.from_dict(tiny_params(synthetic_dataset(tmp_path / "d", cases=2), tmp_path / "run"))
    real_case = store.write_case
    fault = fill_disk_after(1, OSError(errno.EACCES, os.strerror(errno.EACCES)))
    monkeypatch.setattr(store, "write_case", lambda path, *a: fault(real_case, path, *a))
    with pytest.raises(DataError, match=r": cannot write the converted data \(Permission denied\); make the folder "
                                        r"writable and run convert again"):
        convert_dataset(params)
