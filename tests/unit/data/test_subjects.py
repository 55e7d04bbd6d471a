"""Subjects in their three layouts, and splits."""
import json
import os

import numpy as np
import pytest

from helpers import BRATS, HIPPO_CASES, convert_expecting, hippo_params, synthetic_case, write_nifti
from medseg_dl.config.params import Params
from medseg_dl.data.subjects import find_subjects, fold_lists, split_subjects
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


NO_FOLDS = {"val": 0.2, "test": 0.1, "lists": None, "folds": 0, "fold": None, "group_pattern": None}


def test_split_without_folds_is_the_one_of_before():
    ids = [f"s{i:02d}" for i in range(20)]
    assert split_subjects(ids, NO_FOLDS, seed=1) == {  # the lists of the code before cross-validation
        "train": ["s00", "s02", "s03", "s04", "s05", "s06", "s08", "s09", "s12", "s13", "s14", "s15", "s17", "s19"],
        "val": ["s01", "s10", "s16", "s18"], "test": ["s07", "s11"]}


def _fold_splits(ids, seed=1, **split):
    params = {**NO_FOLDS, **split}
    return [split_subjects(ids, {**params, "fold": k}, seed) for k in range(params["folds"])]


def test_fold_lists_balanced_complete_disjoint_and_same_test():
    ids = [f"s{i:02d}" for i in range(23)]
    splits = _fold_splits(ids, folds=5)
    no_fold_test = split_subjects(ids, NO_FOLDS, seed=1)["test"]
    sizes = [len(s["val"]) for s in splits]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 23 - len(no_fold_test)
    vals = sorted(i for s in splits for i in s["val"])
    assert vals == sorted(set(ids) - set(no_fold_test))  # every non-test subject validated exactly once
    for split in splits:
        assert split["test"] == no_fold_test and no_fold_test
        assert not set(split["train"]) & set(split["val"])
        assert not set(split["test"]) & set(split["train"] + split["val"])
        assert sorted(split["train"] + split["val"] + split["test"]) == ids
    assert fold_lists(ids, {**NO_FOLDS, "folds": 5}, seed=1) == (no_fold_test, [s["val"] for s in splits])
    assert _fold_splits(ids, seed=2, folds=5) != splits


def _patient(subject_id):
    return subject_id.split("_")[0] if "_" in subject_id else subject_id


def test_folds_keep_the_subjects_of_a_patient_together():
    ids = [f"pat{p:02d}_{c}" for p in range(12) for c in "abcd"[: 1 + p % 4]] + [f"ext{i}" for i in range(6)]
    grouped = _fold_splits(ids, folds=3, test=0.15, group_pattern=r"^(pat\d+)_")
    for split in grouped:
        patients = {name: {_patient(i) for i in split[name]} for name in ("train", "val", "test")}
        assert not patients["train"] & patients["val"] and not patients["test"] & (patients["train"] | patients["val"])
        assert sorted(split["train"] + split["val"] + split["test"]) == sorted(ids)
    sizes = [len(s["val"]) for s in grouped]
    assert max(sizes) - min(sizes) <= 4  # at most the largest patient
    exts = [k for k, s in enumerate(grouped) for i in s["val"] if i.startswith("ext")]
    assert len(set(exts)) > 1  # ids the pattern does not match are groups of their own, dealt apart
    ungrouped = _fold_splits(ids, folds=3, test=0.15)  # the data would split patients without the pattern
    assert any({_patient(i) for i in s["train"]} & {_patient(i) for i in s["val"]} for s in ungrouped)


def test_folds_need_a_group_per_fold():
    with pytest.raises(DataError, match="data.split.folds = 5"):
        split_subjects([f"pat1_{c}" for c in "abcdef"], {**NO_FOLDS, "folds": 5, "fold": 0,
                                                        "group_pattern": r"^(pat\d+)_"}, seed=0)


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


def test_overlapping_split_lists():
    lists = {"train": ["a", "b", "c"], "val": ["c", "b"], "test": ["d"]}
    with pytest.raises(DataError, match=r"data.split.lists: subjects \['b', 'c'\] are in both train and val"):
        split_subjects(["a", "b", "c", "d"], {"lists": lists}, seed=0)
    lists["test"] = ["a"]
    lists["val"] = ["d"]
    with pytest.raises(DataError, match=r"subjects \['a'\] are in both train and test"):
        split_subjects(["a", "b", "c", "d"], {"lists": lists}, seed=0)
