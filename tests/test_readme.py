"""The README's test command and .ci/run must stay identical."""
import os
import sys

from conftest import REPO

TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest tests"


def test_readme_and_ci_run_the_same_tests():
    readme = open(os.path.join(REPO, "README.md")).read()
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert TEST_COMMAND in readme
    assert ".venv/bin/python -m pip install --quiet -e '.[test]'" in ci
    assert ".venv/bin/python -m pytest tests" in ci


def test_readme_resume_table_is_generated_from_the_rules():
    from medseg_dl.experiment.resume import resume_table

    assert resume_table() in open(os.path.join(REPO, "README.md")).read()


def test_every_params_key_has_a_resume_rule():
    from medseg_dl.config.params import all_keys
    from medseg_dl.config.schema import APPLIED, NO_EFFECT, REFUSED, resume_rule

    assert {resume_rule(dotted).verdict for dotted, _ in all_keys()} <= {APPLIED, REFUSED, NO_EFFECT}
    verdict = {dotted: resume_rule(dotted).verdict for dotted, _ in all_keys()}
    assert verdict["training.warmup_steps"] == NO_EFFECT and verdict["data.source_dir"] == APPLIED
    assert verdict["model.depth"] == REFUSED and verdict["training.steps"] == APPLIED
    assert verdict["data.split.val"] == REFUSED and verdict["sampling.batch_size"] == APPLIED


def test_readme_benchmark_tables_are_those_of_the_results_files():
    """Every results table of benchmarks/tables.py is in the README, as rendered from its JSON lines; a figure
    typed over in the README is caught."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import tables

    readme = open(os.path.join(REPO, "README.md")).read()
    assert {m.group(2) for m in tables.TABLE.finditer(readme)} == set(tables.RENDERERS)
    assert tables.regenerate(readme) == readme, "README tables are stale: run python benchmarks/tables.py"
    row = tables.render("hippocampus_accuracy").splitlines()[2]
    edited = readme.replace(row, row.replace("| unet |", "| unet (typed) |"), 1)
    assert edited != readme and tables.regenerate(edited) == readme
