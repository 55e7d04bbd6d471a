"""`medseg evaluate --cv`: each fold's validation cases scored with its own model, one report, the
post-processing decided on them; `--split test` scores the held-out list."""
import json
import os

import nibabel as nib
import numpy as np
import yaml

from helpers import synthetic_dataset, tiny_params
from medseg_dl.config.params import Params
from medseg_dl.evaluation import scoring
from medseg_dl.evaluation.cross_validation import run_cross_validation, run_ensemble_test
from medseg_dl.evaluation.watcher import run_evaluation
from medseg_dl.experiment.checkpoints import BestCheckpoints
from medseg_dl.experiment.experiment import Experiment, open_model_dir
from medseg_dl.inference.predict import run_prediction
from medseg_dl.training.loop import run_training


def test_every_case_is_scored_once_by_the_model_of_its_fold(tmp_path, capsys):
    """Fold 0 has a best checkpoint (step 2, as an evaluator keeps it): --cv still scores its final step 4,
    chosen without its validation cases; the test ensemble, predict and export take each fold's best where
    kept (fold 0 at step 2), else its latest (fold 1 at step 4), and say which."""
    root = synthetic_dataset(tmp_path / "data", cases=7)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_params(root, tmp_path / "run", training={"steps": 4, "checkpoint_every": 2},
                                               data={"split": {"folds": 2, "test": 0.15}})))
    val_ids = []
    for fold in (0, 1):
        params, model_dir, _ = open_model_dir(str(path), fold=fold)
        run_training(params, model_dir)
        val_ids += [entry["id"] for entry in json.load(open(model_dir.filelist("val")))]
    fold_0 = Experiment(str(tmp_path / "run")).fold(0)
    BestCheckpoints(fold_0.best, fold_0.best_index, 1, "mean_dice").offer(
        os.path.join(fold_0.checkpoints, "ckpt-2"), 2, 0.9)
    experiment = Params.load(str(path))
    result = run_cross_validation(experiment)
    raw, after = result["raw"], result["postprocessed"]
    assert raw["subjects"] == len(val_ids) == 6 and len(set(val_ids)) == 6  # 7 cases, 1 held out for test
    assert sorted({row["subject"] for row in raw["per_case"]}) == sorted(val_ids)
    assert raw["checkpoints"] == {"fold_0": 4, "fold_1": 4}  # the final steps, not fold 0's best
    assert raw["checkpoint_choice"].startswith("the final (latest) checkpoint of each fold: chosen without")
    assert json.load(open(os.path.join(Experiment(str(tmp_path / "run")).cv_reports.raw, "summary.json")))[
        "checkpoint_choice"] == raw["checkpoint_choice"]
    root_dir = Experiment(experiment.experiment.model_dir)
    decision = json.load(open(root_dir.decision_path))
    assert {"foreground_largest_component", "largest_component_classes", "dice_before", "dice_after"} <= set(decision)
    assert after["mean_dice"] >= raw["mean_dice"] - 1e-9  # applied only where it raises mean Dice
    for report in (root_dir.cv_reports.raw, root_dir.cv_reports.postprocessed):
        assert os.path.isfile(os.path.join(report, "summary.json"))
    test_summary = run_evaluation(Params.load(fold_0.params_path), fold_0, split="test")
    test_ids = [entry["id"] for entry in json.load(open(fold_0.filelist("test")))]
    assert test_summary["subjects"] == len(test_ids) == 1 and test_ids[0] not in val_ids
    assert os.path.isfile(fold_0.summary_path(4, "test"))

    # the ensemble of both folds on the test case scores what `medseg predict --folds all` writes
    capsys.readouterr()
    ensemble = run_ensemble_test(experiment)
    assert ensemble["raw"]["subjects"] == 1 and ensemble["raw"]["checkpoints"] == {"fold_0": 2, "fold_1": 4}
    out = capsys.readouterr().out
    assert f"{fold_0.root}: checkpoint best\n" in out
    assert f"{root_dir.fold(1).root}: checkpoint latest (no evaluator kept a best one)" in out
    assert ensemble["postprocessing"] == decision
    test_entry = json.load(open(fold_0.filelist("test")))[0]
    written = run_prediction([root_dir.root], "auto", test_entry["channels"], str(tmp_path / "predicted"),
                             folds="all")
    labels = np.asanyarray(nib.load(written[0]).dataobj)
    reference = np.asanyarray(nib.load(test_entry["label"]).dataobj)
    for row in ensemble["postprocessed"]["per_case"]:
        if row["class"] > 0 and not np.isnan(row["dice"]):
            assert abs(row["dice"] - scoring.dice(reference == row["class"], labels == row["class"])) < 1e-12
    assert os.path.isfile(os.path.join(root_dir.test_ensemble_reports.postprocessed, "summary.json"))
