"""Subjects in their three layouts, and splits."""
import json
import os

import numpy as np
import pytest

from conftest import BRATS, HIPPO_CASES, hippo_params, write_nifti
from medseg_dl.config.params import Params
from medseg_dl.data.subjects import find_subjects, split_subjects
from medseg_dl.errors import DataError


def test_images_labels_layout(hippo_dir, tmp_path):
    subjects = find_subjects(Params.from_dict(hippo_params(hippo_dir, tmp_path)).data)
    assert [s.id for s in subjects] == HIPPO_CASES
    assert subjects[0].label.endswith(f"labels/{HIPPO_CASES[0]}.nii.gz")


def test_subject_folders_layout_on_brats():
    data = Params.from_dict({"data": {"source_dir": BRATS, "layout": "subject_folders",
                                      "channels": ["Flair*", "T1c*"], "label_pattern": "OTMultiClass*",
                                      "mask_pattern": "brainmask*", "num_classes": 5}}).data
    subjects = find_subjects(data)
    assert len(subjects) == 6 and subjects[0].id == "brats_2013_pat0001_1"
    assert [os.path.basename(c) for c in subjects[0].channels] == ["Flair_subtrMeanDivStd.nii.gz",
                                                                   "T1c_subtrMeanDivStd.nii.gz"]
    assert subjects[0].mask.endswith("brainmask.nii.gz")


@pytest.mark.parametrize("split_channels", [True, False])
def test_msd_layout(tmp_path, split_channels):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"},
                                                       "file_ending": ".nii.gz"}))
    for case in ("c_001", "c_002"):
        write_nifti(tmp_path / "labelsTr" / f"{case}.nii.gz", np.zeros((4, 4, 4), np.uint8))
        if split_channels:
            for i in range(2):
                write_nifti(tmp_path / "imagesTr" / f"{case}_{i:04d}.nii.gz", np.zeros((4, 4, 4), np.float32))
        else:
            write_nifti(tmp_path / "imagesTr" / f"{case}.nii.gz", np.zeros((4, 4, 4, 2), np.float32))
    data = Params.from_dict({"data": {"source_dir": str(tmp_path), "layout": "msd", "channels": ["T1", "T2"]}}).data
    subjects = find_subjects(data)
    assert [s.id for s in subjects] == ["c_001", "c_002"]
    assert len(subjects[0].channels) == (2 if split_channels else 1)


def test_split_fractions_seed_and_lists():
    ids = [f"s{i:02d}" for i in range(20)]
    split = split_subjects(ids, {"val": 0.2, "test": 0.1, "lists": None}, seed=1)
    assert [len(split[k]) for k in ("train", "val", "test")] == [14, 4, 2]
    assert sorted(sum(split.values(), [])) == ids
    assert split == split_subjects(ids, {"val": 0.2, "test": 0.1, "lists": None}, seed=1)
    assert split != split_subjects(ids, {"val": 0.2, "test": 0.1, "lists": None}, seed=2)
    explicit = split_subjects(ids, {"lists": {"train": ids[:3], "val": ids[3:4]}}, seed=0)
    assert explicit == {"train": ids[:3], "val": ids[3:4], "test": []}
    with pytest.raises(DataError, match="unknown subjects"):
        split_subjects(ids, {"lists": {"train": ["nobody"]}}, seed=0)
