"""One evaluation use case (evaluate.py): cases read, segmented, scored, written and dropped one at a time; the
summary from the rows on disk; a killed evaluation leaves nothing; the CV decision from the saved predictions."""
import csv
import functools
import json
import os
import time
import weakref

import numpy as np
import pytest
import tensorflow as tf
import yaml

from helpers import synthetic_dataset, tiny_params
from medseg_dl.config.params import Params
from medseg_dl.data.cases import CaseRecipe, subject_case
from medseg_dl.data.convert import convert_dataset
from medseg_dl.data.subjects import Subject
from medseg_dl.data.targets import Targets
from medseg_dl.evaluation import cases as cases_module, evaluate as evaluate_module, postprocessing, scoring
from medseg_dl.evaluation import report as report_module
from medseg_dl.evaluation.cases import EvaluationCases, split_cases
from medseg_dl.evaluation.evaluate import SavedPredictions, evaluate
from medseg_dl.evaluation.report import Segmentation, write_report
from medseg_dl.evaluation.watcher import Evaluator
from medseg_dl.experiment.experiment import open_model_dir
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.inference import postprocess
from medseg_dl.inference.predict import segment_case
from medseg_dl.inference.predictor import Predictor

GRIDS = {"files' grid": None, "resampled": [1.5, 1.3, 1.7]}


def threshold_network(inputs):
    """Logits (N, x, y, z, 3) of windows inputs["image"] (N, x, y, z, 1): background 0.7, class 1 the intensity,
    class 2 its negative: the synthetic cases' sphere (+2) and cube (-2) come out, a few noise voxels as islands."""
    windows = inputs["image"]
    return tf.concat([tf.fill(tf.shape(windows), 0.7), windows, -windows], axis=-1)


def region_network(inputs):
    """Logits (N, x, y, z, 2) of the regions of `CASE_REGIONS`: |intensity| - 0.7 for the sphere and the cube,
    -intensity - 0.7 for the cube: painted, the label map of `threshold_network`."""
    windows = inputs["image"]
    return tf.concat([tf.abs(windows) - 0.7, -windows - 0.7], axis=-1)


CASE_REGIONS = [{"name": "sphere_or_cube", "labels": [1, 2], "paint": 1}, {"name": "cube", "labels": [2], "paint": 2}]


def setup(tmp_path, target_spacing_mm=None, cases=4, regions=None, **evaluation):
    """(subjects, recipe, params, predictor) of a synthetic labelled folder, read without normalisation; with
    `regions` (data.regions), the network of those regions."""
    root = synthetic_dataset(tmp_path / "data", cases=cases, shape=(16, 18, 14))
    subjects = [Subject(f"case_{i:02d}", [str(root / "images" / f"case_{i:02d}.nii.gz")],
                        str(root / "labels" / f"case_{i:02d}.nii.gz")) for i in range(cases)]
    recipe = CaseRecipe(1, 3, {"reorient_ras": False, "target_spacing_mm": target_spacing_mm,
                               "normalization": "none", "affine_tolerance": 1e-3})
    params = Params.from_dict({"data": {"num_classes": 3, "regions": regions},
                               "evaluation": {"save_overlays": False, **evaluation}})
    network = threshold_network if regions is None else region_network
    return subjects, recipe, params, Predictor(network, (8, 8, 8), Targets.from_params(params.data),
                                               recombination="host")


def case_source(subjects, recipe, read=None):
    """The cases of `subjects`, each read by `read(subject)` (default: subject_case)."""
    read = read or functools.partial(subject_case, recipe=recipe)
    return EvaluationCases({s.id: s for s in subjects}, recipe, lambda: map(read, subjects))


class WatchedReader:
    """Reads a subject's case and keeps weak references to the case, its arrays and its prediction; asserts, when
    the next case is read, that nothing of the previous one is alive."""

    def __init__(self, recipe, monkeypatch):
        self.recipe, self.alive, self.reads = recipe, [], 0
        monkeypatch.setattr(evaluate_module, "segment_case", self._segment_case)

    def __call__(self, subject):
        assert [ref for ref in self.alive if ref() is not None] == [], f"case {self.reads} still alive"
        case = subject_case(subject, self.recipe)
        self.alive = [weakref.ref(case), weakref.ref(case.image), weakref.ref(case.label)]
        self.reads += 1
        return case

    def _segment_case(self, predictor, case, decision=None, progress=None):
        labels = segment_case(predictor, case, decision, progress)
        self.alive.append(weakref.ref(labels))
        return labels


@pytest.mark.parametrize("grid", GRIDS)
def test_at_most_one_case_is_alive_at_a_time(tmp_path, monkeypatch, grid):
    subjects, recipe, params, predictor = setup(tmp_path, GRIDS[grid], save_overlays=True, save_predictions=True)
    reader = WatchedReader(recipe, monkeypatch)
    summary = evaluate(predictor, case_source(subjects, recipe, reader), str(tmp_path / "report"), params, 3, "step 3",
                       tf.summary.create_file_writer(str(tmp_path / "logs")))
    assert reader.reads == summary["subjects"] == 4 and len(summary["per_case"]) == 8
    assert sorted(os.listdir(tmp_path / "report" / "predictions")) == [f"{s.id}.nii.gz" for s in subjects]
    targets = Targets.from_params(params.data)
    saved = SavedPredictions([case_source(subjects, recipe, reader)], str(tmp_path / "report"), targets)
    decision = postprocessing.decide(saved, targets)  # every pass over the saved predictions holds one case too
    assert reader.reads > 8 and decision["cases"] == 4
    assert write_report(str(tmp_path / "after"), saved.segmentations(decision), params, 3)["subjects"] == 4


def test_converted_cases_are_read_only_when_asked_for(tmp_path, monkeypatch):
    """tf.data reads ahead by default (a parallel map, a prefetch): the converted cases of a split must not."""
    root = synthetic_dataset(tmp_path / "data", cases=4, shape=(16, 18, 14))
    experiment = tiny_params(root, tmp_path / "run", data={"split": {"val": 0.5}})
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(experiment))
    params, model_dir, _ = open_model_dir(str(tmp_path / "exp.yaml"))
    convert_dataset(params)
    reads, read_case = [], cases_module.read_case

    def counted(entry, params, vectors):
        volume = read_case(entry, params, vectors)
        with tf.control_dependencies([tf.py_function(lambda: reads.append(1) or 0, [], tf.int32)]):
            return {key: tf.identity(value) for key, value in volume.items()}
    monkeypatch.setattr(cases_module, "read_case", counted)
    cases = iter(split_cases(params, model_dir, "train", 0.1))
    for number in (1, 2):
        next(cases)
        time.sleep(0.5)  # time for a read ahead
        assert len(reads) == number


@pytest.mark.parametrize("grid", GRIDS)
def test_the_summary_is_the_one_of_all_rows_in_memory(tmp_path, capsys, grid):
    subjects, recipe, params, predictor = setup(tmp_path, GRIDS[grid])
    cases = case_source(subjects, recipe)
    summary = evaluate(predictor, cases, str(tmp_path / "report"), params, 7, "step 7")
    rows = []
    for case in cases:  # the reference: every case segmented and scored in memory
        _, reference, affine = cases.original_grid(case)
        spacing_mm = np.sqrt((affine[:3, :3] ** 2).sum(0))
        for row in scoring.score_case(reference, segment_case(predictor, case), Targets.from_params(params.data),
                                      spacing_mm, params.evaluation.surface_tolerance_mm):
            rows.append({"subject": case.subject_id, **row})
    assert {row["class_name"] for row in rows} == {"class_1", "class_2"}
    expected = {"step": 7, "subjects": 4, **scoring.summarize(rows), "per_case": rows}
    assert canonical(summary) == canonical(expected)
    assert canonical(json.load(open(tmp_path / "report" / "summary.json"))) == canonical(expected)
    with open(tmp_path / "report" / "metrics.csv") as f:
        assert [(r["subject"], int(r["class"]), float(r["dice"])) for r in csv.DictReader(f)] == \
               [(r["subject"], r["class"], r["dice"]) for r in rows]
    out = capsys.readouterr().out
    assert "step 7: case 1/4 case_00 done in" in out and "step 7: case 4/4 case_03 done in" in out


def canonical(summary):
    """`summary` as JSON with sorted keys, numpy scalars as their Python values (NaN as NaN): equal values,
    whatever the order of the keys."""
    return json.dumps(summary, sort_keys=True, default=lambda value: value.item())


HEADER = ("subject,class,class_name,dice,jaccard,assd_mm,hd95_mm,surface_dice,reference_mm3,predicted_mm3,"
          "empty_reference,empty_prediction,distance_penalised")  # metrics.csv: the same with labels and regions
REGIONS = [{"name": "whole_tumour", "labels": [1, 2, 3], "paint": 2},
           {"name": "tumour_core", "labels": [1, 3], "paint": 1}]


@pytest.mark.parametrize("regions", [None, REGIONS], ids=["labels", "regions"])
def test_a_report_scores_the_structures_and_leaves_out_the_ignore_label(tmp_path, monkeypatch, regions):
    """Rows and summary per structure (class or region); foreground predicted where the reference is the ignore
    label (9) costs nothing; the overlays draw the ignored voxels as background."""
    drawn = []
    monkeypatch.setattr(report_module.plotting, "orthogonal_overlay",
                        lambda image, path, reference, **kwargs: drawn.append(reference))
    params = Params.from_dict({"data": {"num_classes": 4, "class_names": ["background", "necrosis", "edema", "enh"],
                                        "regions": regions, "ignore_label": 9}, "evaluation": {"save_overlays": True}})
    reference = np.zeros((10, 8, 6), np.uint8)
    reference[2:6, 2:6, 1:5], reference[3:5, 3:5, 2:4], reference[6:9] = 2, 1, 9
    prediction = reference.copy()
    prediction[6:9] = 0
    prediction[6:9, 2:6, 1:5] = 2  # edema grown into the ignored slab
    prediction[3:5, 3:5, 2:3] = 3  # half the necrosis predicted enhancing: core 8 of 8, necrosis 4 of 8
    image = np.random.default_rng(0).normal(size=(10, 8, 6, 1)).astype(np.float32)
    case = Segmentation("case_a", image, reference, prediction, np.ones(3), np.eye(4))
    summary = write_report(str(tmp_path / "report"), [case], params, 3, tf.summary.create_file_writer(str(tmp_path)))
    dice = ({"necrosis": 2 * 4 / 12, "edema": 1.0, "enh": 0.0} if regions is None
            else {"whole_tumour": 1.0, "tumour_core": 1.0})
    assert {name: stats["dice"]["mean"] for name, stats in summary["classes"].items()} == dice
    assert summary["mean_dice"] == pytest.approx(np.mean(list(dice.values())), rel=1e-15)
    assert [(row["class"], row["class_name"]) for row in summary["per_case"]] == list(enumerate(dice, start=1))
    with open(tmp_path / "report" / "metrics.csv") as f:
        assert f.readline().strip() == HEADER
    np.testing.assert_array_equal(drawn[0], np.where(reference == 9, 0, reference))


class Killed(Exception):
    pass


def test_a_killed_evaluation_leaves_no_report_and_no_history_entry_and_is_redone_whole(tmp_path):
    subjects, recipe, params, predictor = setup(tmp_path)
    model_dir = ModelDir(str(tmp_path / "run"))
    for folder in (model_dir.checkpoints, model_dir.eval_root, model_dir.best):
        os.makedirs(folder)
    for name in ("ckpt-5.index", "ckpt-5.data-00000-of-00001"):
        (tmp_path / "run" / "checkpoints" / name).write_bytes(b"weights")

    def killed_at_the_third(subject):
        if subject.id == subjects[2].id:
            raise Killed
        return subject_case(subject, recipe)

    def runner(cases):
        return lambda staged, step: evaluate(predictor, cases, model_dir.report_dir(step), params, step, f"step {step}")

    prefix = os.path.join(model_dir.checkpoints, "ckpt-5")
    evaluator = Evaluator(params, model_dir, runner(case_source(subjects, recipe, killed_at_the_third)),
                          str(tmp_path / "run" / "eval" / "staging-1"))
    with pytest.raises(Killed):
        evaluator.evaluate(prefix)
    assert not os.path.exists(model_dir.report_dir(5)) and not os.path.exists(model_dir.history)
    assert [n for n in os.listdir(model_dir.eval_root) if n != "staging-1"] == []  # no partial report
    restarted = Evaluator(params, model_dir, runner(case_source(subjects, recipe)),
                          str(tmp_path / "run" / "eval" / "staging-2"))
    summary = restarted.evaluate(prefix)
    with open(os.path.join(model_dir.report_dir(5), "metrics.csv")) as f:
        assert [(r["subject"], r["class"]) for r in csv.DictReader(f)] == [(s.id, c) for s in subjects for c in "12"]
    assert summary["subjects"] == 4 and json.load(open(model_dir.history))["5"]["mean_dice"] == summary["mean_dice"]


@pytest.mark.parametrize("regions", [None, CASE_REGIONS], ids=["labels", "regions"])
@pytest.mark.parametrize("grid", GRIDS)
def test_the_cv_decision_from_saved_predictions_is_the_one_from_predictions_in_memory(tmp_path, grid, regions):
    subjects, recipe, params, predictor = setup(tmp_path, GRIDS[grid], cases=6, regions=regions, save_predictions=True)
    parts = [case_source(subjects[:3], recipe), case_source(subjects[3:], recipe)]  # two folds' validation cases
    for k, part in enumerate(parts):
        evaluate(predictor, part, str(tmp_path / f"fold_{k}"), params, None, f"cv fold {k}")
        for name in os.listdir(tmp_path / f"fold_{k}" / "predictions"):
            os.renames(tmp_path / f"fold_{k}" / "predictions" / name, tmp_path / "cv" / "predictions" / name)
    in_memory = []
    for part in parts:
        for case in part:
            _, reference, affine = part.original_grid(case)
            in_memory.append((reference, segment_case(predictor, case), np.sqrt((affine[:3, :3] ** 2).sum(0))))
    targets = Targets.from_params(params.data)
    saved = SavedPredictions(parts, str(tmp_path / "cv"), targets)
    decision = postprocessing.decide(saved, targets)
    assert decision == postprocessing.decide(in_memory, targets) and decision["cases"] == 6
    assert decision["dice_after"] != decision["dice_before"]  # some post-processing was accepted
    after = write_report(str(tmp_path / "after"), saved.segmentations(decision), params, None)
    expected = [row for reference, prediction, spacing_mm in in_memory for row in scoring.score_case(
        reference, postprocess.apply(prediction, decision, spacing_mm, targets), targets, spacing_mm,
        params.evaluation.surface_tolerance_mm)]
    assert [(r["class"], r["class_name"], r["dice"], r["hd95_mm"]) for r in after["per_case"]] == \
           [(r["class"], r["class_name"], r["dice"], r["hd95_mm"]) for r in expected]
    assert list(after["classes"]) == [name for name, _ in targets.structures]
