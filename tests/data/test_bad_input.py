"""Every user mistake of the foundation: a MedsegError naming the file, and no partial output."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import HIPPO_CASES, REPO, hippo_params, write_nifti
from medseg_dl.config.params import Params
from medseg_dl.data.convert import convert_dataset
from medseg_dl.errors import DataError


def leftovers(folder):
    """Temporary or record files of a conversion that failed on its only subject."""
    if not os.path.isdir(folder):
        return []
    return [f for f in os.listdir(folder) if ".tmp" in f or f.endswith((".tfrecord", ".tfrecord.gz"))]


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
    assert not any(".tmp" in f for f in os.listdir(params.data.tfrecords_dir))
    assert not os.path.exists(os.path.join(params.data.tfrecords_dir, f"{HIPPO_CASES[0]}.tfrecord.gz"))


def test_not_an_image(tmp_path):
    synthetic_case(tmp_path / "d")
    (tmp_path / "d" / "images" / "case.nii.gz").write_bytes(b"this is not a NIfTI file at all")
    convert_expecting(tmp_path, tmp_path / "d", "cannot read the volume")


def test_shape_mismatch(tmp_path):
    synthetic_case(tmp_path / "d", label=np.zeros((8, 9, 11), np.uint8))
    params, message = convert_expecting(tmp_path, tmp_path / "d", r"shape \(8, 9, 11\) differs")
    assert "labels/case.nii.gz" in message and leftovers(params.data.tfrecords_dir) == []


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
    assert "num_classes = 3" in message and leftovers(params.data.tfrecords_dir) == []


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
