"""The code map of docs/architecture.md holds: every import of the package points down the stage order, and
training and inference do not know each other."""
import ast
import os

from helpers import REPO

# rank of each room (viz.plotting is a leaf of numpy/matplotlib; viz.show sits beside the CLI)
RANKS = {"errors": 0, "runtime": 1, "config": 2, "viz.plotting": 2, "data": 3, "planning": 4,
         "experiment": 4, "pipeline": 5, "model": 6, "training": 7, "inference": 7, "evaluation": 8,
         "viz.show": 9, "cli": 10}


def room(module):
    """'medseg_dl.viz.show' -> 'viz.show'; 'medseg_dl.data.cases' -> 'data'."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    if parts[0] == "viz" and len(parts) > 1:
        return f"viz.{parts[1]}"
    return parts[0]


def imports_of(path):
    """Every medseg_dl module imported anywhere in the file (also inside functions)."""
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medseg_dl"):
            names = [node.module] if node.module != "medseg_dl" else [f"medseg_dl.{a.name}" for a in node.names]
            if node.module.count(".") == 1 and node.module.split(".")[1] == "viz":
                names = [f"{node.module}.{a.name}" for a in node.names]
            yield from names
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("medseg_dl."))


def package_modules():
    package = os.path.join(REPO, "medseg_dl")
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                yield module, path


def test_every_import_points_down_the_stage_order():
    wrong = []
    for module, path in package_modules():
        own = room(module)
        if own is None:
            continue
        for imported in imports_of(path):
            target = room(imported)
            if target is not None and target != own and RANKS[target] >= RANKS[own]:
                wrong.append(f"{module} imports {imported}")
    assert wrong == []



# package modules whose tests are not in a unit test module of their own name: where they are tested
TESTED_ELSEWHERE = {
    "errors": ["unit/test_cli.py"],
    "config/architectures": ["unit/model/test_architectures.py"],
    "config/schema": ["unit/config/test_params.py", "integration/test_docs.py"],
    "data/dicom": ["unit/data/test_io.py"],
    "data/index": ["unit/data/test_convert.py", "unit/pipeline/test_inputs.py"],
    "data/targets": ["unit/model/test_losses.py", "unit/evaluation/test_scoring.py"],
    "evaluation/cases": ["unit/evaluation/test_evaluate.py"],
    "evaluation/report": ["unit/evaluation/test_evaluate.py", "integration/test_disk_full.py"],
    "evaluation/runner": ["unit/evaluation/test_watcher.py", "unit/runtime/test_devices.py"],
    "experiment/checkpoints": ["unit/experiment/test_model_dir.py", "unit/training/test_loop.py"],
    "experiment/resume": ["unit/training/test_loop.py", "unit/evaluation/test_watcher.py", "integration/test_docs.py"],
    "inference/export": ["integration/test_export.py"],
    "inference/onnx_export": ["integration/test_export.py"],
    "inference/original_grid": ["unit/inference/test_predict.py"],
    "inference/postprocess": ["unit/evaluation/test_postprocessing.py", "unit/inference/test_postprocess_graph.py"],
    "inference/probability_files": ["unit/inference/test_predict.py"],
    "model/architectures/medpatchnet": ["unit/model/test_architectures.py"],
    "model/architectures/unet": ["unit/model/test_architectures.py"],
    "model/metrics": ["unit/model/test_losses.py"],
    "pipeline/service": ["integration/test_input_service.py"],
    "pipeline/streams": ["unit/pipeline/test_inputs.py", "unit/pipeline/test_spatial.py"],
    "planning/command": ["unit/planning/test_planner.py", "integration/test_planned_training.py"],
    "planning/fingerprint": ["unit/planning/test_planner.py"],
    "runtime/cluster": ["integration/test_multi_worker.py"],
    "training/distribute": ["unit/model/test_model_fn.py", "unit/training/test_loop.py"],
}


def _relative_names(folder, prefix=""):
    """{path relative to `folder` without .py} of every .py file (and, with `prefix`, only test_<name>.py
    files, named by <name>), and every sub-folder."""
    names = set()
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        names.update(os.path.relpath(os.path.join(root, d), folder) for d in dirs)
        for name in files:
            if name.endswith(".py") and name.startswith(prefix) and name != "__init__.py":
                names.add(os.path.relpath(os.path.join(root, name[len(prefix):-3]), folder))
    return names


def test_the_unit_tests_mirror_the_package():
    """tests/unit/<room>/test_<module>.py tests medseg_dl/<room>/<module>.py (or its sub-package); a module
    without one says where it is tested, so a new module needs one or a line here."""
    tests_root = os.path.join(REPO, "tests")
    modules = _relative_names(os.path.join(REPO, "medseg_dl"))
    mirrored = _relative_names(os.path.join(tests_root, "unit"), "test_") - {"layout"}  # (this file)
    assert mirrored - modules == set(), "unit test modules that name no module of the package"
    packages = {name for name in modules if os.path.isdir(os.path.join(REPO, "medseg_dl", name))}
    untested = modules - mirrored - packages
    assert untested == set(TESTED_ELSEWHERE), "a module needs tests/unit/.../test_<module>.py or a line here"
    missing = [path for paths in TESTED_ELSEWHERE.values() for path in paths
               if not os.path.isfile(os.path.join(tests_root, path))]
    assert missing == []
