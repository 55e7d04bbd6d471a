"""The benchmark harness (benchmarks/harness.py): the peak RSS of a child's whole process tree, timeouts,
repetitions and ratios; and the fields and appending of a kept line (benchmarks/machine_info.py)."""
import ast
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import harness  # noqa: E402
import machine_info  # noqa: E402

BENCHMARKS = os.path.join(REPO, "benchmarks")
# holds `mb` resident MB for a second (bytes filled with ones: every page touched)
HOLD = "import sys, time; block = b'\\x01' * (int(sys.argv[1]) * 2**20); time.sleep(1.0)"
# starts `count` children of HOLD with `mb` each and waits for them
SPAWN = ("import subprocess, sys; children = [subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]) "
         "for _ in range(int(sys.argv[3]))]; [child.wait() for child in children]")


def test_peak_rss_of_a_child_that_allocates_200_mb():
    measured = harness.run_measured([sys.executable, "-c", HOLD, "200"])
    assert 200 <= measured.peak_rss_mb < 400 and measured.wall_s >= 1.0


def test_peak_rss_counts_the_grandchildren_of_the_child_together():
    """Two grandchildren holding 150 MB at once: the tree's peak is their sum, more than either process."""
    measured = harness.run_measured([sys.executable, "-c", SPAWN, HOLD, "150", "2"])
    assert measured.peak_rss_mb >= 300


def test_a_failing_child_raises_with_its_stderr_and_a_slow_one_is_killed():
    with pytest.raises(harness.ChildFailed, match="boom"):
        harness.run_measured([sys.executable, "-c", "raise SystemExit('boom')"])
    with pytest.raises(harness.ChildFailed, match="ran past 1 s"):
        harness.run_measured([sys.executable, "-c", SPAWN, HOLD, "1", "1"], timeout_s=1)


def test_run_python_returns_the_last_json_line_of_the_child():
    measured, isolated = harness.run_python("medseg_dl", ["-c", "print('noise'); print('{\"a\": [1, 2]}')"])
    assert measured.result == {"a": [1, 2]} and isinstance(isolated, bool)


def test_timed_runs_splits_warm_ups_from_timed_calls(monkeypatch):
    ticks = iter([0.0, 5.0, 10.0, 13.0, 20.0, 21.0, 30.0, 32.0])
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(ticks))
    called = []
    assert harness.timed_runs(called.append, 3) == ([5.0], [3.0, 1.0, 2.0])
    assert called == [0, 1, 2, 3]


def test_spread_is_the_median_of_the_runs_with_each_kept():
    assert harness.spread([3.0, 1.0, 2.0, 10.0], 2) == {"value": 2.5, "median_of": 4, "min": 1.0, "max": 10.0,
                                                        "value_runs": [3.0, 1.0, 2.0, 10.0]}


def test_speedup_reads_seconds_and_rates_each_their_way():
    ours = {"value": 2.0, "unit": "s", "peak_rss_mb": 300.0}
    harness.add_ratios(ours, {"value": 6.0, "unit": "s", "peak_rss_mb": 600.0}, "peer")
    assert ours["speedup_vs_peer"] == 3.0 and ours["peak_rss_ratio_vs_peer"] == 0.5
    assert harness.speedup({"value": 6.0, "unit": "patches/s"}, {"value": 2.0, "unit": "patches/s"}) == 3.0


def test_a_kept_line_has_the_machine_versions_commit_date_and_rss_method(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    machine_info.record("kept", {"library": "medseg_dl", "value": 1.0, "peak_rss_mb": 5.0}, keep=True)
    machine_info.record("kept", {"benchmark": "hippocampus_accuracy"}, keep=True)
    with open(tmp_path / "kept.jsonl") as f:
        measured, accuracy = [json.loads(text) for text in f]
    for line in (measured, accuracy):
        assert "cores" in line["machine"] and line["date"] and line["commit"] != "unknown"
        assert line["versions"]["python"] and "tensorflow" in line["versions"]
    assert measured["rss_method"] == harness.RSS_METHOD and "rss_method" not in accuracy


def test_scripts_import_no_other_script_and_measure_no_rss_themselves():
    """A benchmark script (a module of benchmarks/ with a main) imports the harness's modules, never another
    script, and leaves peak RSS to the harness (no ru_maxrss, VmHWM or /proc of its own)."""
    sources = {name[:-3]: open(os.path.join(BENCHMARKS, name)).read()
               for name in os.listdir(BENCHMARKS) if name.endswith(".py")}
    scripts = {name for name, source in sources.items() if 'if __name__ == "__main__":' in source}
    assert {"augmentation", "deploy", "scale", "tables"} <= scripts and "harness" not in scripts
    for name in scripts:
        nodes = list(ast.walk(ast.parse(sources[name])))
        imported = {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & scripts, f"{name} imports {imported & scripts}"
        assert not any(word in sources[name] for word in ("ru_maxrss", "VmHWM", "/proc/")), name


def test_the_commit_is_dirty_for_changed_code_but_not_for_the_lines_a_run_appends(tmp_path, monkeypatch):
    """A measured run appends to a tracked benchmarks/results/*.jsonl: that alone leaves the commit clean."""
    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.setattr(harness, "REPO", str(tmp_path))
    clean = machine_info.commit()
    assert clean and not clean.endswith("-dirty")
    with open(tmp_path / "benchmarks" / "results" / "x.jsonl", "a") as f:
        f.write("{}\n")
    assert machine_info.commit() == clean
    (tmp_path / "code.py").write_text("a = 2\n")
    assert machine_info.commit() == clean + "-dirty"
