"""The model folder: create, resume, refuse another experiment, overwrite; file lists; unwritable folder; CLI."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from helpers import HIPPO_CASES, REPO, hippo_params
from medseg_dl.config.params import Params
from medseg_dl.errors import ModelDirError
from medseg_dl.experiment.experiment import open_model_dir
from medseg_dl.experiment.filelists import read_filelist
from medseg_dl.experiment.model_dir import ModelDir, Report


def _write_params(tmp_path, root, **sections):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(hippo_params(root, tmp_path / "run", **sections)))
    return str(path)


def test_model_dir_create_resume_refuse_overwrite(hippo_dir, tmp_path):
    path = _write_params(tmp_path, hippo_dir)
    params, model_dir, resumed = open_model_dir(path)
    assert not resumed
    assert sorted(os.listdir(model_dir.root)) == ["best", "checkpoints", "eval", "filelists", "logs", "params.yaml"]
    val = json.load(open(model_dir.filelist("val")))
    assert len(val) == 1 and val[0]["id"] in HIPPO_CASES and read_filelist(model_dir, "val") == [val[0]["id"]]
    _, _, resumed = open_model_dir(model_dir.params_path, overrides=["training.steps=5"])
    assert resumed and Params.load(model_dir.params_path).training.steps == 5
    assert json.load(open(model_dir.filelist("val"))) == val  # split kept on resume
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
    result = run("convert", "--params", path)
    assert result.returncode == 0, result.stderr
    assert "converted 4 subjects" in result.stdout
    assert sorted(os.listdir(tmp_path / "run" / "converted"))[0] == "dataset.json"
    for command in ("convert", "train", "evaluate", "predict", "show", "params-doc"):
        assert run(command, "--help").returncode == 0


def test_completed_checkpoints_of_a_relative_folder_are_the_files(tmp_path, monkeypatch):
    import tensorflow as tf

    from medseg_dl.experiment.checkpoints import completed_checkpoints

    monkeypatch.chdir(tmp_path)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), "run/checkpoints", max_to_keep=2)
    for step in (3, 6):
        manager.save(checkpoint_number=step)
    found = completed_checkpoints("run/checkpoints")
    assert [os.path.basename(p) for p in found] == ["ckpt-3", "ckpt-6"]
    assert all(os.path.isfile(p + ".index") for p in found)


def test_the_staging_folders_are_those_of_the_evaluator_in_eval(tmp_path):
    model_dir = ModelDir(str(tmp_path))
    for name in ("staging-abc", "staging-def", "5", "history-staging-x"):
        os.makedirs(os.path.join(model_dir.eval_root, name))
    assert sorted(model_dir.staging_folders()) == [os.path.join(model_dir.eval_root, n)
                                                   for n in ("staging-abc", "staging-def")]


def test_a_report_names_its_files(tmp_path):
    report = Report(str(tmp_path / "eval" / "3"))
    assert (report.metrics_csv, report.summary_json) == (os.path.join(report.root, "metrics.csv"),
                                                         os.path.join(report.root, "summary.json"))
    assert report.overlay("s1") == os.path.join(report.root, "overlays", "s1.png")
    assert report.prediction("s1") == os.path.join(report.predictions, "s1.nii.gz")
    assert report.predictions == os.path.join(report.root, "predictions")
    assert ModelDir(str(tmp_path)).summary_path(3) == report.summary_json
