"""The evaluation process: each checkpoint once, deletions skipped, restarts redo nothing, best-K kept."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, synthetic_dataset, tiny_params
from medseg_dl.data.convert import convert_dataset
from medseg_dl.errors import MedsegError
from medseg_dl.evaluation import runner, watcher as evaluation
from medseg_dl.evaluation.cases import split_cases
from medseg_dl.experiment.experiment import open_model_dir
from medseg_dl.training.loop import run_training


def trained(tmp_path, steps=10):
    root = synthetic_dataset(tmp_path / "data")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_params(root, tmp_path / "run", training={"steps": steps},
                                               evaluation={"keep_best": 1, "poll_seconds": 0.1})))
    params, model_dir, _ = open_model_dir(str(path))
    convert_dataset(params)
    run_training(params, model_dir)
    return params, model_dir


def evaluator_for(params, model_dir, staging):
    staging.mkdir(exist_ok=True)
    in_process = runner.InProcessRunner(params, model_dir, split_cases(params, model_dir, "val", 0.1))
    return evaluation.Evaluator(params, model_dir, in_process, str(staging))


def test_watch_evaluates_each_once_keeps_best_and_restarts_cleanly(tmp_path):
    params, model_dir = trained(tmp_path)
    cases = list(split_cases(params, model_dir, "val", 0.1))
    assert len(cases) == 1
    assert evaluation.run_evaluation(params, model_dir, timeout_s=30) is None
    history = json.load(open(model_dir.history))
    assert sorted(history) == ["10", "5"]
    for step in (5, 10):
        with open(os.path.join(model_dir.report_dir(step), "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        assert [r["class"] for r in rows] == ["1", "2"]
        assert {"dice", "jaccard", "assd_mm", "hd95_mm", "reference_mm3", "predicted_mm3"} <= set(rows[0])
        summary = json.load(open(os.path.join(model_dir.report_dir(step), "summary.json")))
        assert summary["subjects"] == 1 and 0.0 <= summary["mean_dice"] <= 1.0
        assert os.path.isfile(os.path.join(model_dir.report_dir(step), "overlays", f"{cases[0].subject_id}.png"))
    best = json.load(open(model_dir.best_index))
    assert len(best) == 1 and best[0]["value"] == max(history[s]["mean_dice"] for s in history)
    assert os.path.isfile(os.path.join(model_dir.best, best[0]["checkpoint"] + ".index"))
    assert evaluator_for(params, model_dir, tmp_path / "staging").pending() == []
    assert not [f for f in os.listdir(model_dir.eval_root) if "tmp" in f or f.startswith("staging")]
    assert not os.path.exists(model_dir.eval_lock)


def test_checkpoint_deleted_under_the_evaluator_is_skipped(tmp_path, capsys):
    params, model_dir = trained(tmp_path, steps=5)
    evaluator = evaluator_for(params, model_dir, tmp_path / "staging")
    prefix = os.path.join(model_dir.checkpoints, "ckpt-5")
    for name in os.listdir(model_dir.checkpoints):
        if name.startswith("ckpt-5.data"):
            os.remove(os.path.join(model_dir.checkpoints, name))
    assert evaluator.evaluate(prefix) is None
    assert "removed before it could be read" in capsys.readouterr().out
    assert evaluator.pending() == []  # not retried


def test_cli_once_and_other_folder(tmp_path):
    params, model_dir = trained(tmp_path, steps=5)
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "data", other)
    result = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--params", model_dir.params_path,
                             "--once", "--checkpoint", "latest", "--data", str(other)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 5 and set(summary["dice"]) == {"class_1", "class_2"}
    report = json.load(open(os.path.join(model_dir.summary_path(5, "other"))))
    assert report["subjects"] == 4
    assert not os.path.exists(model_dir.history)  # other data changes no history


def test_an_unreadable_checkpoint_is_skipped_with_a_warning_and_watching_goes_on(tmp_path, capsys):
    params, model_dir = trained(tmp_path)
    data = os.path.join(model_dir.checkpoints, "ckpt-5.data-00000-of-00001")
    os.truncate(data, os.path.getsize(data) // 2)
    assert evaluation.run_evaluation(params, model_dir, timeout_s=30) is None
    history = json.load(open(model_dir.history))
    assert history["5"]["skipped"] and not history["10"]["skipped"]
    assert "ckpt-5: cannot read this checkpoint" in capsys.readouterr().out


def test_a_checkpoint_training_has_not_finished_is_not_evaluated(tmp_path):
    """TensorFlow writes a checkpoint's .index in place; only the CheckpointManager's state says it is done."""
    params, model_dir = trained(tmp_path, steps=5)
    open(os.path.join(model_dir.checkpoints, "ckpt-7.index"), "wb").write(b"half")
    assert [os.path.basename(p) for p in evaluator_for(params, model_dir, tmp_path / "staging").pending()] == ["ckpt-5"]


def test_timeout_applies_while_the_validation_subjects_are_not_converted(tmp_path):
    root = synthetic_dataset(tmp_path / "data")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_params(root, tmp_path / "run")))
    params, model_dir, _ = open_model_dir(str(path))
    with pytest.raises(MedsegError, match="still not converted after 1 s; start `medseg train`"):
        evaluation.run_evaluation(params, model_dir, timeout_s=1.0)
    assert not os.path.exists(model_dir.eval_lock)


def test_a_hand_edited_network_key_stops_evaluate_and_predict_with_one_line(tmp_path):
    params, model_dir = trained(tmp_path, steps=5)
    edited = yaml.safe_load(open(model_dir.params_path))
    edited["model"]["base_filters"] = 8
    open(model_dir.params_path, "w").write(yaml.safe_dump(edited))
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for command in (["evaluate", "--params", model_dir.params_path, "--once"],
                    ["predict", "--model-dir", model_dir.root, "--checkpoint", "latest",
                     "--input", str(tmp_path / "data" / "images"), "--output", str(tmp_path / "out")]):
        done = subprocess.run([sys.executable, "-m", "medseg_dl.cli", *command], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "model.base_filters was 4, now 8" in done.stderr.strip().splitlines()[-1]


def test_a_resampled_experiment_is_scored_on_the_original_label_files(tmp_path):
    """With target_spacing_mm the model grid is not the files' grid: the report must score the mapped-back
    prediction against the original label file (its volume in mm3 exactly) and save it with that affine."""
    import nibabel as nib
    import numpy as np

    root = synthetic_dataset(tmp_path / "data", shape=(20, 22, 18))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_params(root, tmp_path / "run", training={"steps": 5},
                                               preprocessing={"target_spacing_mm": [1.5, 1.3, 1.7]},
                                               evaluation={"save_predictions": True, "poll_seconds": 0.1})))
    params, model_dir, _ = open_model_dir(str(path))
    run_training(params, model_dir)
    summary = evaluation.run_evaluation(params, model_dir, once=True)
    subject = json.load(open(model_dir.filelist("val")))[0]
    original = nib.load(subject["label"])
    label = np.asarray(original.dataobj)
    with open(os.path.join(model_dir.report_dir(summary["step"]), "metrics.csv")) as f:
        rows = {int(r["class"]): r for r in csv.DictReader(f)}
    for c in (1, 2):
        assert float(rows[c]["reference_mm3"]) == np.count_nonzero(label == c) * 1.0  # 1 mm voxels of the file
    saved = nib.load(os.path.join(model_dir.report_dir(summary["step"]), "predictions", f"{subject['id']}.nii.gz"))
    assert saved.shape == original.shape
    np.testing.assert_allclose(saved.affine, original.affine)
