"""The code map of docs/architecture.md holds: every import of the package points down the stage order, and
training and inference do not know each other."""
import ast
import os

from conftest import REPO

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

