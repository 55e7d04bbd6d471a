import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import BRATS, HIPPO_CASES, REPO, hippo_params, write_nifti
from medseg_dl.data.subjects import find_subjects, split_subjects
from medseg_dl.errors import DataError, ModelDirError
from medseg_dl.model_dir import open_model_dir
from medseg_dl.params import Params


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


def _write_params(tmp_path, root, **sections):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(hippo_params(root, tmp_path / "run", **sections)))
    return str(path)


def test_model_dir_create_resume_refuse_overwrite(hippo_dir, tmp_path):
    path = _write_params(tmp_path, hippo_dir)
    params, model_dir, resumed = open_model_dir(path)
    assert not resumed
    assert sorted(os.listdir(model_dir.root)) == ["best", "checkpoints", "eval", "filelists", "logs", "params.yaml"]
    val = json.load(open(os.path.join(model_dir.filelists, "val.json")))
    assert len(val) == 1 and val[0]["id"] in HIPPO_CASES
    _, _, resumed = open_model_dir(model_dir.params_path, overrides=["training.steps=5"])
    assert resumed and Params.load(model_dir.params_path).training.steps == 5
    assert json.load(open(os.path.join(model_dir.filelists, "val.json"))) == val  # split kept on resume
    other = _write_params(tmp_path, hippo_dir, training={"learning_rate": 0.5})
    with pytest.raises(ModelDirError, match="--overwrite"):
        open_model_dir(other)
    params, _, resumed = open_model_dir(other, overwrite=True)
    assert not resumed and params.training.learning_rate == 0.5


def test_unwritable_model_dir(hippo_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(hippo_params(hippo_dir, blocker / "run")))
    with pytest.raises(ModelDirError, match="cannot write the model folder"):
        open_model_dir(str(path))


def test_cli_convert_and_help(hippo_dir, tmp_path):
    path = _write_params(tmp_path, hippo_dir)
    run = lambda *a: subprocess.run([sys.executable, "-m", "medseg_dl.cli", *a], capture_output=True,
                                    text=True, cwd=REPO)
    result = run("convert", "--params", path, "--set", "data.gzip=false")
    assert result.returncode == 0, result.stderr
    assert "converted 4 subjects" in result.stdout
    assert sorted(os.listdir(tmp_path / "run" / "tfrecords"))[0] == "dataset.json"
    for command in ("convert", "train", "evaluate", "predict", "show", "params-doc"):
        assert run(command, "--help").returncode == 0
