"""Smoke runs of the benchmark scripts whose peers run in subprocesses (`--quick`): one JSON line per
measured configuration, each saying whether it ran in its library's own environment, keeping every
repetition beside its median and the versions of what produced it, and nothing kept in
benchmarks/results/. And `record`: the versions on a line are those of the interpreter that ran it."""
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys

import pytest

from helpers import BRATS, BRATS_SUBJECT, REPO

RESULTS = os.path.join(REPO, "benchmarks", "results")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


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
        assert len(line["value_runs"]) == len(line["step_time_s_runs"]) == line["median_of"]
        assert line["value"] == statistics.median(line["value_runs"])
        assert line["versions"]["tensorflow"] == importlib.metadata.version("tensorflow")


@pytest.mark.skipif(not os.path.isdir(BRATS), reason="BraTS data not available")
def test_augmentation_quick_deforms_a_crop_of_a_brats_volume():
    (line,) = quick_lines("augmentation.py")
    assert line["workload"] == "W4" and line["library"] == "medseg_dl" and line["unit"] == "s"
    assert line["shape"] == [64, 64, 48, 2] and line["value"] > 0 and line["peak_rss_mb"] > 0
    assert line["value_runs"] == [line["value"]] and "tensorflow" in line["versions"]
    assert isinstance(line["isolated"], bool) and "cores" in line["machine"]


def installed(*packages):
    """{"python": version, package: version} of this interpreter, for the installed ones of `packages`."""
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def test_record_keeps_the_versions_of_the_interpreter_that_ran_the_line(tmp_path, monkeypatch):
    """A peer line that ran in its own environment gets that environment's versions (here a bare venv with a
    stand-in monai 9.9.9 and no numpy); a line that ran with this interpreter gets this one's."""
    import harness
    import machine_info

    peer = tmp_path / "peer"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(peer)], check=True)
    site = next((peer / "lib").glob("python*/site-packages"))
    (site / "monai-9.9.9.dist-info").mkdir()
    (site / "monai-9.9.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: monai\nVersion: 9.9.9\n")
    monkeypatch.setattr(harness, "python_for", lambda library: (str(peer / "bin" / "python"), True))
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path / "results"))
    machine_info.record("kept", {"library": "monai", "isolated": True, "value": 1.0}, keep=True)
    machine_info.record("kept", {"library": "monai", "isolated": False, "value": 2.0}, keep=True)
    machine_info.record("kept", {"benchmark": "hippocampus_accuracy"}, keep=True)
    with open(tmp_path / "results" / "kept.jsonl") as f:
        own_venv, this_venv, ours = [json.loads(text) for text in f]
    assert own_venv["versions"] == {"python": platform.python_version(), "monai": "9.9.9"}
    assert this_venv["versions"] == installed("monai", "torch", "numpy")
    assert ours["versions"] == installed("tensorflow", "keras", "numpy", "scipy")
    assert all("cores" in line["machine"] and line["date"] for line in (own_venv, this_venv, ours))


@pytest.mark.skipif(not os.path.isdir(BRATS_SUBJECT), reason="BraTS data not available")
def test_benchmark_quick_run_prints_one_line_per_workload_and_blending_and_keeps_none():
    results = os.path.join(REPO, "benchmarks", "results")
    before = {name: os.path.getsize(os.path.join(results, name)) for name in os.listdir(results)}
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "sliding_window.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, check=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
    lines = [json.loads(text) for text in result.stdout.strip().splitlines()]
    assert [(item["workload"], item["library"], item["blending"]) for item in lines] == [
        (workload, "medseg_dl", blending) for workload in ("W2", "W2-overhead") for blending in ("gaussian", "constant")]
    for item in lines:
        assert item["unit"] == "s" and item["value"] > 0 and item["probabilities_s"] > 0
        assert item["peak_rss_mb"] > 0 and item["voxels_per_s"] > 0 and "cores" in item["machine"]
    for item in lines:
        assert item["windowing_s"] == pytest.approx(item["value"] - item["network_s"], abs=2e-4)
    assert {name: os.path.getsize(os.path.join(results, name)) for name in os.listdir(results)} == before


def test_benchmark_quick_prints_json_lines():
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "metrics.py"), "--quick"],
                          capture_output=True, text=True, env=env, timeout=120, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    ours = lines[0]
    assert ours["workload"] == "W3" and ours["library"] == "medseg_dl" and ours["unit"] == "s"
    assert ours["value"] > 0 and ours["median_of"] == 1 and ours["subjects"] == 1
    assert ours["anisotropic"]["spacing_mm"] == [0.8, 0.8, 2.5] and "cores" in ours["machine"]
    assert 0.5 < ours["mean_dice_spacing_1"] < 1.0
