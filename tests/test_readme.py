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
