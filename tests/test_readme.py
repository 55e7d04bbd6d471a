"""The README's test command and .ci/run must stay identical."""
import os

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
    from medseg_dl.experiment.resume import APPLIED, REFUSED, rule

    assert {rule(dotted)[0] for dotted, _ in all_keys()} <= {APPLIED, REFUSED}
    assert rule("model.depth")[0] == REFUSED and rule("training.steps")[0] == APPLIED
    assert rule("data.split.val")[0] == REFUSED and rule("sampling.batch_size")[0] == APPLIED
