"""The experiment root: its folds found on disk and ordered, its reports and decision; k-fold cross-validation
(the data.split checks, one model folder per fold beside shared records); and every name of the experiment's
and the model folder's layout written in one module of the package."""
import ast
import json
import os
import re

import pytest
import yaml

from helpers import REPO, fold_root, synthetic_dataset, tiny_params
from medseg_dl.config.params import Params
from medseg_dl.data.subjects import fold_lists
from medseg_dl.errors import ParamsError
from medseg_dl.experiment.experiment import Experiment, fold_model_dirs, fold_name, load_experiment, open_model_dir
from medseg_dl.experiment.filelists import read_filelist
from medseg_dl.experiment.model_dir import ModelDir


@pytest.fixture
def root(tmp_path):
    """helpers.fold_root, as a string."""
    return str(fold_root(tmp_path))


def test_folds_are_found_by_their_params_and_ordered_by_number(root):
    assert Experiment(root).folds() == [ModelDir(os.path.join(root, f"fold_{k}")) for k in (0, 2, 10)]
    assert Experiment(root).folds([10, 0]) == [ModelDir(os.path.join(root, "fold_10")), ModelDir(os.path.join(root,
                                                                                                           "fold_0"))]
    assert Experiment(root).fold(1) == ModelDir(os.path.join(root, "fold_1")) and fold_name(1) == "fold_1"


def test_a_missing_fold_or_a_root_without_folds_is_one_line_naming_the_root(root):
    with pytest.raises(ParamsError, match=r"fold\(s\) \[1\] not found; its folds are \[0, 2, 10\]") as error:
        Experiment(root).folds([0, 1])
    assert str(error.value).startswith(root) and "\n" not in str(error.value)
    other = os.path.join(root, "other")
    with pytest.raises(ParamsError, match=r"no fold folders \(fold_<k>/params.yaml\)") as error:
        Experiment(other).folds()
    assert str(error.value).startswith(other) and "\n" not in str(error.value)


def test_a_root_holds_fold_folders_a_model_folder_does_not(root):
    assert Experiment(root).holds_fold_folders()
    assert not Experiment(os.path.join(root, "other")).holds_fold_folders()
    assert not Experiment(os.path.join(root, "absent")).holds_fold_folders()


def test_the_reports_and_the_decision_of_the_root(root):
    experiment = Experiment(root)
    assert experiment.cv == os.path.join(root, "cv")
    assert (experiment.cv_reports.raw, experiment.cv_reports.postprocessed) == (
        os.path.join(root, "cv", "raw"), os.path.join(root, "cv", "postprocessed"))
    assert (experiment.test_ensemble_reports.raw, experiment.test_ensemble_reports.postprocessed) == (
        os.path.join(root, "cv", "test-ensemble", "raw"), os.path.join(root, "cv", "test-ensemble", "postprocessed"))
    assert experiment.decision_path == os.path.join(root, "postprocessing.json")


# the names of the experiment's and the model folder's files and folders (experiment.py, model_dir.py,
# filelists.py; converted: the default of data.converted_dir, config/params.py); not raw, postprocessed and
# checkpoints, which are keys of the summaries too
LAYOUT_NAMES = ("params.yaml", "postprocessing.json", "fold_", "filelists", "test-ensemble", "cv",
                "converted", "done.json", "run_params.yaml", "best.json",
                "history.json", "scalars.csv", "metrics.csv", "summary.json", "overlays", "predictions", "staging-",
                ".worker-checkpoints-", "train.lock", "eval.lock", "curves.png", "nonfinite_batch.json", "PAUSE",
                "unreadable", ".write-test")


def code_strings(path):
    """The string pieces of a module's code (string constants and the literal parts of f-strings) that hold
    no whitespace (not prose: messages, help texts) and are no docstring."""
    tree = ast.parse(open(path).read())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings and not re.search(r"\s", node.value)]


def spells(piece, name):
    """Whether a string piece names `name` as a path component or a prefix of one (not e.g. --cv, cv_fold)."""
    end = r"(?![\w.-])" if name[-1].isalnum() else ""
    return re.search(rf"(?<![\w-]){re.escape(name)}{end}", piece) is not None


def test_each_name_of_the_layout_is_written_in_one_module():
    package = os.path.join(REPO, "medseg_dl")
    pieces = {os.path.relpath(os.path.join(folder, name), REPO): code_strings(os.path.join(folder, name))
              for folder, _, names in os.walk(package) for name in names if name.endswith(".py")}
    where = {name: sorted(module for module, strings in pieces.items() if any(spells(s, name) for s in strings))
             for name in LAYOUT_NAMES}
    assert {name: modules for name, modules in where.items() if len(modules) != 1} == {}


SPLIT = {"val": 0.2, "test": 0.15, "folds": 3}


@pytest.mark.parametrize("split, message", [
    ({"folds": 1}, r"data\.split\.folds = 1: .*at least 2"),
    ({"folds": 5, "fold": 5}, r"data\.split\.fold = 5: expected 0\.\.4"),
    ({"fold": 0}, r"data\.split\.fold = 0 needs data\.split\.folds"),
    ({"folds": -1}, r"data\.split\.folds = -1: must be >= 0"),
    ({"folds": 5, "lists": {"train": ["a"]}}, r"data\.split\.lists and data\.split\.folds exclude"),
    ({"folds": 5, "group_pattern": "(pat"}, r"data\.split\.group_pattern = '\(pat' does not compile"),
    ({"folds": 5, "group_pattern": r"pat\d+"}, r"data\.split\.group_pattern = .* has no group"),
    ({"group_pattern": r"^(pat\d+)_"}, r"data\.split\.group_pattern is used only by cross-validation"),
])
def test_split_checks_name_their_key(split, message):
    with pytest.raises(ParamsError, match=message) as err:
        Params.from_dict({"data": {"split": split}})
    assert "\n" not in str(err.value)


def test_valid_fold_params_load():
    split = Params.from_dict({"data": {"split": {"folds": 5, "fold": 4, "group_pattern": r"^(pat\d+)_"}}}).data.split
    assert (split.folds, split.fold, split.group_pattern) == (5, 4, r"^(pat\d+)_")


def _root_params(tmp_path, **split):
    data = synthetic_dataset(tmp_path / "data", cases=7, shape=(12, 12, 12))
    path = tmp_path / "exp.yaml"
    params = tiny_params(data, tmp_path / "cv")
    params["data"]["split"] = {**SPLIT, **split}
    path.write_text(yaml.safe_dump(params))
    return str(path), str(tmp_path / "cv")


def _ids(model_dir, split):
    return read_filelist(model_dir, split)


def test_fold_model_folder_and_shared_records(tmp_path):
    path, root = _root_params(tmp_path)
    params, model_dir, resumed = open_model_dir(path, fold=1)
    assert not resumed and model_dir.root == os.path.join(root, "fold_1") and os.listdir(root) == ["fold_1"]
    saved = Params.load(model_dir.params_path)
    assert saved.data.split.fold == 1 and saved.experiment.model_dir == os.path.join(root, "fold_1")
    assert saved.data.converted_dir == params.data.converted_dir == os.path.join(root, "converted")
    test, folds = fold_lists([f"case_{i:02d}" for i in range(7)], saved.data.split, saved.seed)
    train = sorted(folds[0] + folds[2])
    assert (_ids(model_dir, "train"), _ids(model_dir, "val"), _ids(model_dir, "test")) == (train, folds[1], test)
    _, other, _ = open_model_dir(path, fold=0)
    assert _ids(other, "test") == test and _ids(other, "val") == folds[0]
    assert Params.load(other.params_path).data.split.fold == 0
    assert Params.load(other.params_path).data.converted_dir == os.path.join(root, "converted")


def test_explicit_converted_dir_is_kept(tmp_path):
    path, _ = _root_params(tmp_path)
    params, _, _ = open_model_dir(path, overrides=[f"data.converted_dir={tmp_path / 'records'}"], fold=2)
    assert params.data.converted_dir == str(tmp_path / "records")


def test_fold_resume_and_wrong_fold(tmp_path):
    path, root = _root_params(tmp_path)
    _, model_dir, _ = open_model_dir(path, fold=1)
    val = json.load(open(model_dir.filelist("val")))
    for again in [(model_dir.params_path, None), (model_dir.params_path, 1), (path, 1)]:
        params, resumed_dir, resumed = open_model_dir(again[0], fold=again[1])
        assert resumed and resumed_dir == model_dir and params.data.split.fold == 1
    params, _, resumed = open_model_dir(model_dir.params_path, overrides=["training.steps=7"])
    assert resumed and params.training.steps == 7 and json.load(open(model_dir.filelist("val"))) == val
    with pytest.raises(ParamsError, match="params of fold 1, not 2"):
        open_model_dir(model_dir.params_path, fold=2)
    _, evaluated = load_experiment(path, fold=1)
    assert evaluated == model_dir
    _, set_fold, _ = open_model_dir(path, overrides=["data.split.fold=2"])  # the same as --fold 2
    assert set_fold.root == os.path.join(root, "fold_2")


def test_fold_is_required_and_checked(tmp_path):
    path, root = _root_params(tmp_path)
    with pytest.raises(ParamsError) as err:
        open_model_dir(path)
    assert str(err.value) == "data.split.folds = 3: train one fold at a time with --fold k (0..2)"
    with pytest.raises(ParamsError, match="--fold 3: expected 0..2"):
        open_model_dir(path, fold=3)
    with pytest.raises(ParamsError, match="--fold 0 needs cross-validation"):
        open_model_dir(path, overrides=["data.split.folds=0"], fold=0)
    assert not os.path.exists(root)  # refused before anything was written


def test_fold_model_dirs_and_root_files(tmp_path):
    path, root = _root_params(tmp_path)
    expected = [ModelDir(os.path.join(root, f"fold_{k}")) for k in range(3)]
    assert fold_model_dirs(Params.load(path)) == expected
    params, _, _ = open_model_dir(path, fold=2)
    assert fold_model_dirs(params) == expected  # from one fold's params too
    assert Experiment(root).fold(1) == expected[1]
    assert Experiment(root).cv == os.path.join(root, "cv")
    assert Experiment(root).decision_path == os.path.join(root, "postprocessing.json")
    with pytest.raises(ParamsError, match="data.split.folds = 0"):
        fold_model_dirs(Params.load(path, overrides=["data.split.folds=0"]))
