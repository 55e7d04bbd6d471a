"""Every user mistake of the foundation: a MedsegError naming the file, and no partial output."""
import errno
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import HIPPO_CASES, REPO, hippo_params, synthetic_dataset, tiny_params, write_nifti
from medseg_dl.runtime import atomic
from medseg_dl.config.params import Params
from medseg_dl.data import convert, store
from medseg_dl.data.cases import recipe_from_params, subject_case
from medseg_dl.data.convert import convert_dataset
from medseg_dl.data.subjects import split_subjects
from medseg_dl.errors import DataError, DiskFullError, ParamsError
from medseg_dl.inference.predict import input_subjects

ENV = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}


def leftovers(folder):
    """Temporary or record files of a conversion that failed on its only subject."""
    if not os.path.isdir(folder):
        return []
    return [f for f in os.listdir(folder) if ".tmp" in f or f.endswith(store.CASE_SUFFIX)]


def convert_expecting(tmp_path, root, match, **sections):
    params = Params.from_dict(hippo_params(root, tmp_path / "run", **sections))
    with pytest.raises(DataError, match=match) as err:
        convert_dataset(params)
    return params, str(err.value)


def synthetic_case(root, name="case", shape=(8, 9, 10), image=None, label=None, label_affine=None):
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_nifti(root / "images" / f"{name}.nii.gz",
                np.random.rand(*shape).astype(np.float32) if image is None else image)
    write_nifti(root / "labels" / f"{name}.nii.gz",
                np.zeros(shape, np.uint8) if label is None else label, label_affine)


def test_missing_folder(tmp_path):
    convert_expecting(tmp_path, tmp_path / "nowhere", "dataset folder not found")


def test_empty_dataset_folder(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    convert_expecting(tmp_path, tmp_path / "empty", "no subjects found")


def test_image_without_label(tmp_path):
    synthetic_case(tmp_path / "d")
    os.remove(tmp_path / "d" / "labels" / "case.nii.gz")
    _, message = convert_expecting(tmp_path, tmp_path / "d", "no label")
    assert "case.nii.gz" in message


def test_truncated_gzip(hippo_dir, tmp_path):
    path = hippo_dir / "images" / f"{HIPPO_CASES[0]}.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    params, message = convert_expecting(tmp_path, hippo_dir, "cannot read the volume")
    assert str(path) in message
    assert not any(".tmp" in f for f in os.listdir(params.data.converted_dir))
    assert not os.path.exists(os.path.join(params.data.converted_dir, store.case_name(HIPPO_CASES[0])))


def test_not_an_image(tmp_path):
    synthetic_case(tmp_path / "d")
    (tmp_path / "d" / "images" / "case.nii.gz").write_bytes(b"this is not a NIfTI file at all")
    convert_expecting(tmp_path, tmp_path / "d", "cannot read the volume")


def test_shape_mismatch(tmp_path):
    synthetic_case(tmp_path / "d", label=np.zeros((8, 9, 11), np.uint8))
    params, message = convert_expecting(tmp_path, tmp_path / "d", r"shape \(8, 9, 11\) differs")
    assert "labels/case.nii.gz" in message and leftovers(params.data.converted_dir) == []


def test_affine_mismatch(tmp_path):
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    synthetic_case(tmp_path / "d", label_affine=shifted)
    convert_expecting(tmp_path, tmp_path / "d", "affine differs")


def test_label_out_of_range(tmp_path):
    label = np.zeros((8, 9, 10), np.uint8)
    label[0, 0, 0] = 3
    synthetic_case(tmp_path / "d", label=label)
    params, message = convert_expecting(tmp_path, tmp_path / "d", r"label values span \[0, 3\]")
    assert "num_classes = 3" in message and leftovers(params.data.converted_dir) == []


def test_ignore_label_is_kept_and_nothing_else_beyond_the_classes(tmp_path):
    label = np.zeros((8, 9, 10), np.uint8)
    label[2:4, 3:5, 4:6] = 2
    label[5:, :, :] = 7  # an unannotated block
    synthetic_case(tmp_path / "d", label=label)
    params = Params.from_dict(hippo_params(tmp_path / "d", tmp_path / "run", data={"ignore_label": 7}))
    entry = convert_dataset(params)["subjects"]["case"]
    assert entry["class_voxels"] == [720 - 8 - 270, 0, 8]  # ignored voxels count in no class
    stored = store.read_arrays(os.path.join(params.data.converted_dir, entry["case"]))
    assert np.array_equal(stored["label"], label)
    label[0, 0, 0] = 3
    synthetic_case(tmp_path / "e", label=label)
    _, message = convert_expecting(tmp_path / "other", tmp_path / "e", r"label values span \[0, 3\]",
                                   data={"ignore_label": 7})
    assert "and data.ignore_label = 7" in message


def test_nan_in_image(tmp_path):
    image = np.random.rand(8, 9, 10).astype(np.float32)
    image[1, 2, 3] = np.nan
    synthetic_case(tmp_path / "d", image=image)
    _, message = convert_expecting(tmp_path, tmp_path / "d", "NaN or Inf")
    assert "images/case.nii.gz" in message


def test_channel_count_differs(tmp_path):
    synthetic_case(tmp_path / "d", name="a")
    synthetic_case(tmp_path / "d", name="b", image=np.random.rand(8, 9, 10, 2).astype(np.float32))
    _, message = convert_expecting(tmp_path, tmp_path / "d", "has 2 channels but data.channels lists 1")
    assert "b.nii.gz" in message


def test_cli_reports_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rat: 0.1\n")
    result = subprocess.run([sys.executable, "-m", "medseg_dl.cli", "convert", "--params", str(bad)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "did you mean training.learning_rate?" in result.stderr and str(bad) in result.stderr
    assert "Traceback" not in result.stderr


def medseg_failing(*args):
    """Run `medseg ARGS` expecting a user error: returns stderr after checking exit 2 and no traceback."""
    result = subprocess.run([sys.executable, "-m", "medseg_dl.cli", *args], capture_output=True, text=True,
                            cwd=REPO, env=ENV, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_label_with_two_components_on_a_fourth_axis(tmp_path):
    synthetic_case(tmp_path / "d", label=np.zeros((8, 9, 10, 2), np.uint8))
    params, message = convert_expecting(tmp_path, tmp_path / "d", r"a label map must be \(X, Y, Z\) integer classes")
    assert "labels/case.nii.gz" in message and "(8, 9, 10, 2)" in message
    assert leftovers(params.data.converted_dir) == []


def test_label_with_a_singleton_fourth_axis_is_accepted(tmp_path):
    label = np.zeros((8, 9, 10, 1), np.uint8)
    label[2:4, 3:5, 4:6, 0] = 2
    synthetic_case(tmp_path / "d", label=label)
    params = Params.from_dict(hippo_params(tmp_path / "d", tmp_path / "run"))
    entry = convert_dataset(params)["subjects"]["case"]
    assert entry["shape"] == [8, 9, 10] and entry["class_voxels"] == [720 - 8, 0, 8]


def test_2d_image_in_conversion(tmp_path):
    synthetic_case(tmp_path / "d", image=np.random.rand(8, 47).astype(np.float32))
    params, message = convert_expecting(tmp_path, tmp_path / "d", "medseg_dl segments 3D volumes")
    assert "images/case.nii.gz" in message and "shape (8, 47)" in message and "channels" not in message.split(";")[0]
    assert leftovers(params.data.converted_dir) == []


def test_2d_image_in_prediction(tmp_path):
    """predict's path: its input subject (no label) through `subject_case`, as `run_prediction` does."""
    write_nifti(tmp_path / "slice.nii.gz", np.random.rand(8, 47).astype(np.float32))
    params = Params.from_dict(hippo_params(tmp_path, tmp_path / "run"))
    [subject] = input_subjects([str(tmp_path / "slice.nii.gz")], params.data)
    with pytest.raises(DataError, match=r"slice.nii.gz: image of shape \(8, 47\); medseg_dl segments 3D volumes"):
        subject_case(subject, recipe_from_params(params))


def test_cli_2d_image(tmp_path):
    synthetic_case(tmp_path / "d", image=np.random.rand(8, 47).astype(np.float32))
    params = tmp_path / "p.yaml"
    params.write_text(json.dumps(hippo_params(tmp_path / "d", tmp_path / "run", data={"split": {"val": 0.0}})))
    stderr = medseg_failing("convert", "--params", str(params))
    assert "images/case.nii.gz: image of shape (8, 47); medseg_dl segments 3D volumes" in stderr


def test_cli_predict_output_is_a_file(tmp_path):
    """Refused before any work: the model folder does not even exist, and the file is left as it was."""
    write_nifti(tmp_path / "image.nii.gz", np.random.rand(8, 9, 10).astype(np.float32))
    output = tmp_path / "out.nii.gz"
    output.write_bytes(b"keep me")
    stderr = medseg_failing("predict", "--model-dir", str(tmp_path / "no_model"), "--input",
                            str(tmp_path / "image.nii.gz"), "--output", str(output))
    assert f"{output}: the output is a file; give a folder for the label maps" in stderr
    assert output.read_bytes() == b"keep me"


@pytest.mark.parametrize("probabilities, message", [
    ([0.5, -0.2, 0.7], r"sampling.class_probabilities = \[0.5, -0.2, 0.7\]: must be >= 0.0"),
    ([0.5, "a", 0.5], r"sampling.class_probabilities = .*: expected a list of int or float"),
])
def test_class_probabilities_must_be_non_negative_numbers(tmp_path, probabilities, message):
    with pytest.raises(ParamsError, match=message):
        Params.from_dict(tiny_params(tmp_path, tmp_path / "run", sampling={"class_probabilities": probabilities}))


def test_overlapping_split_lists():
    lists = {"train": ["a", "b", "c"], "val": ["c", "b"], "test": ["d"]}
    with pytest.raises(DataError, match=r"data.split.lists: subjects \['b', 'c'\] are in both train and val"):
        split_subjects(["a", "b", "c", "d"], {"lists": lists}, seed=0)
    lists["test"] = ["a"]
    lists["val"] = ["d"]
    with pytest.raises(DataError, match=r"subjects \['a'\] are in both train and test"):
        split_subjects(["a", "b", "c", "d"], {"lists": lists}, seed=0)


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
