"""Every user mistake of the foundation: a MedsegError naming the file, and no partial output."""
import os

import numpy as np

from helpers import convert_expecting, hippo_params, leftovers, synthetic_case
from medseg_dl.config.params import Params
from medseg_dl.data import store
from medseg_dl.data.convert import convert_dataset


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


