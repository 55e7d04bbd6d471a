"""Smoke runs of the benchmark scripts whose peers run in subprocesses (`--quick`): one JSON line per
measured configuration, each saying whether it ran in its library's own environment, and nothing kept
in benchmarks/results/."""
import json
import os
import subprocess
import sys

import pytest

from conftest import BRATS, REPO

RESULTS = os.path.join(REPO, "benchmarks", "results")


def quick_lines(script, *arguments):
    """The JSON lines of `benchmarks/<script> --quick <arguments>`; checks that no results file changed."""
    before = {name: os.path.getsize(os.path.join(RESULTS, name)) for name in os.listdir(RESULTS)}
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), "--quick", *arguments],
                          capture_output=True, text=True, timeout=600, check=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert {name: os.path.getsize(os.path.join(RESULTS, name)) for name in os.listdir(RESULTS)} == before
    return [json.loads(text) for text in done.stdout.splitlines() if text.startswith("{")]


def test_training_step_quick_measures_our_step_in_each_precision():
    lines = [line for line in quick_lines("training_step.py", "--skip-jit") if line["library"] == "medseg_dl"]
    assert [line["precision"] for line in lines] == ["float32", "mixed_bfloat16"]
    for line in lines:
        assert line["workload"] == "W5" and line["unit"] == "patches/s" and line["value"] > 0
        assert line["median_of"] == 1 and line["jit_compile"] is False and isinstance(line["isolated"], bool)


@pytest.mark.skipif(not os.path.isdir(BRATS), reason="BraTS data not available")
def test_augmentation_quick_deforms_a_crop_of_a_brats_volume():
    (line,) = quick_lines("augmentation.py")
    assert line["workload"] == "W4" and line["library"] == "medseg_dl" and line["unit"] == "s"
    assert line["shape"] == [64, 64, 48, 2] and line["value"] > 0 and line["peak_rss_mb"] > 0
    assert isinstance(line["isolated"], bool) and "cores" in line["machine"]
