"""The experiment root: its folds found on disk and ordered, its reports and decision; and every name of the
experiment's and the model folder's layout written in one module of the package."""
import ast
import os
import re

import pytest

from conftest import REPO
from medseg_dl.errors import ParamsError
from medseg_dl.experiment.experiment import Experiment, fold_name
from medseg_dl.experiment.model_dir import ModelDir


@pytest.fixture
def root(tmp_path):
    """An experiment root with fold_0, fold_2, fold_10 (params.yaml); fold_1 without; fold_x, other/ beside."""
    folder = tmp_path / "experiment"
    for name in ("fold_0", "fold_10", "fold_2", "fold_x", "other"):
        (folder / name).mkdir(parents=True)
        (folder / name / "params.yaml").write_text("{}\n")
    (folder / "fold_1").mkdir()
    return str(folder)


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
