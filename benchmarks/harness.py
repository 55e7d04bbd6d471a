"""The benchmark harness: where things are, child processes with their peak RSS, repetitions and ratios.

Every benchmark script keeps only its workloads and measures them through this module; it keeps its lines
through `machine_info.record` (machine, versions, commit, date, RSS method), takes its data from `datasets`
and the `medseg` runs several scripts share from `experiments`; no script imports another script.

Repetitions: `timed_runs` (warm-up calls, then the timed ones) and `spread` (the median as the line's
`value`, with `median_of`, `min`, `max` and every run in `value_runs`). Peers: `peers_available` (the
libraries whose interpreter imports them). Ratios: `speedup` (how many times faster ours is, the direction
read from the line's unit) and `add_ratios` (speedup_vs_<peer>, peak_rss_ratio_vs_<peer>).

Child processes. A workload that must run alone (its imports, its memory, its library's own environment)
runs in a child process: `run_python(library, arguments)` runs it with the interpreter of `library`
(`python_for`: its environment under .venv-bench/ made by benchmarks/venvs.sh, else this interpreter;
`isolated` says which), `run_measured(command)` any command. Both wait for it (with an optional timeout),
raise `ChildFailed` with the tail of its stderr when it fails, and return a `Measured`: its stdout (`result`:
the JSON object of its last line), its wall time and its peak RSS.

Peak RSS, one method for every script (RSS_METHOD, recorded on each line that carries a peak RSS): the
child and all its descendants (from the parent ids in /proc) are sampled every SAMPLE_EVERY_S seconds; the
peak is the largest sum of their resident sets (VmRSS) over the samples, and never less than the largest
high-water mark (VmHWM) read from any one of them. So a process tree (conversion workers, data-loader
workers, nnU-Net's augmentation processes) counts whole, as the README's scale tables claim ("peak RSS of
the whole process tree"), and a single process gets its exact peak (VmHWM: what the in-process runners
read of themselves). Not chosen: `ru_maxrss` of the waited children, which is the largest single process
only (workers not added) and, as Linux keeps a process's peak across exec, never less than the parent's
peak when the child started. Pages shared between the processes of a tree are counted once per process,
and a peak shorter than a sampling interval is seen only through VmHWM.
"""
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
if REPO not in sys.path:  # the in-process workloads import this checkout's medseg_dl, not an installed one
    sys.path.insert(0, REPO)
MEDSEG = [sys.executable, "-m", "medseg_dl.cli"]  # the `medseg` command of this checkout
RSS_METHOD = "tree_rss_sampled"
SAMPLE_EVERY_S = 0.1
# the environment under .venv-bench/ (benchmarks/venvs.sh) that each library's process runs with
VENV_OF = {"medseg_dl": "ours", "monai": "peers", "torchio": "peers", "torchio_per_patch": "peers",
           "elasticdeform": "elasticdeform", "nnunetv2": "nnunet"}


def python_for(library):
    """(interpreter path, True when it is the library's own environment) for `library`. In one environment with
    everything, MONAI imports TensorFlow (about 640 MB of peak RSS charged to MONAI) and ITK imports torch
    (charged to medseg_dl): only an isolated line's peak RSS is the library's own."""
    path = os.path.join(REPO, ".venv-bench", VENV_OF[library], "bin", "python")
    return (path, True) if os.path.exists(path) else (sys.executable, False)


def child_env(pythonpath=REPO):
    """This environment with `pythonpath` first on PYTHONPATH and TensorFlow's C++ logging quiet."""
    paths = [pythonpath, os.environ.get("PYTHONPATH", "")]
    return {"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


class ChildFailed(RuntimeError):
    """A measured child process exited with an error or ran past its timeout."""


@dataclasses.dataclass
class Measured:
    """What a finished child process gave: its stdout, wall time and the peak RSS of its process tree."""
    stdout: str
    wall_s: float
    peak_rss_mb: float

    @property
    def result(self):
        """The JSON object the child printed last (its last stdout line)."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def process_tree(pid):
    """`pid` and all its descendants (from the parent id of every process in /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def resident_mb(pid):
    """(VmRSS, VmHWM) of process `pid` in MB; zeros when it is gone (or a zombie)."""
    sizes = {"VmRSS": 0.0, "VmHWM": 0.0}
    try:
        with open(f"/proc/{pid}/status") as status:
            for row in status:
                key, _, value = row.partition(":")
                if key in sizes:
                    sizes[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return sizes["VmRSS"], sizes["VmHWM"]


class TreeRssSampler(threading.Thread):
    """Samples the process tree of `pid` every SAMPLE_EVERY_S seconds until `stop()`, which returns its peak
    RSS in MB by RSS_METHOD (see the module docstring)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.stopped = pid, 0.0, threading.Event()

    def run(self):
        while True:
            sizes = [resident_mb(p) for p in process_tree(self.pid)]
            self.peak_mb = max(self.peak_mb, sum(rss for rss, _ in sizes), *(hwm for _, hwm in sizes))
            if self.stopped.wait(SAMPLE_EVERY_S):
                return

    def stop(self):
        self.stopped.set()
        self.join()
        return self.peak_mb


def kill_tree(pid):
    """SIGKILL to `pid` and its descendants, the deepest first."""
    for member in reversed(process_tree(pid)):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_measured(command, env=None, cwd=None, timeout_s=None):
    """Run `command` (environment `child_env()` unless given) and wait for it: a `Measured`; `ChildFailed` with
    the tail of its stderr when it exits with an error or runs past `timeout_s` (its process tree is killed)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env or child_env(), cwd=cwd)
    sampler = TreeRssSampler(process.pid)
    sampler.start()
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        process.communicate()
        raise ChildFailed(f"{' '.join(map(str, command[:4]))} ran past {timeout_s} s") from None
    finally:
        peak_mb = sampler.stop()
    if process.returncode != 0:
        raise ChildFailed(f"{' '.join(map(str, command[:4]))} failed with exit code {process.returncode}:\n"
                          f"{err[-3000:]}")
    return Measured(out, time.perf_counter() - started, peak_mb)


def run_python(library, arguments, env=None, cwd=None, timeout_s=None):
    """(`run_measured` of `arguments` run by the interpreter of `library`, whether that is its own environment)."""
    python, isolated = python_for(library)
    return run_measured([python, *map(str, arguments)], env, cwd, timeout_s), isolated


def timed_runs(call, repetitions, warmups=1):
    """(seconds of each warm-up call, seconds of each of `repetitions` timed calls); call(i) gets the call's index,
    0 .. warmups + repetitions - 1 (a seed, a volume, or nothing to it)."""
    seconds = []
    for index in range(warmups + repetitions):
        started = time.perf_counter()
        call(index)
        seconds.append(time.perf_counter() - started)
    return seconds[:warmups], seconds[warmups:]


def spread(runs, digits):
    """The figure of repeated measurements: their median (`value`), count, min, max and every run, rounded."""
    return {"value": round(statistics.median(runs), digits), "median_of": len(runs), "min": round(min(runs), digits),
            "max": round(max(runs), digits), "value_runs": [round(run, digits) for run in runs]}


def speedup(ours, theirs, key="value", digits=3):
    """How many times faster `ours` is than `theirs` (two lines) on `key`: theirs / ours for seconds, ours /
    theirs for a rate (a unit ending in /s)."""
    rate = ours.get("unit", "s").endswith("/s")
    return round(ours[key] / theirs[key] if rate else theirs[key] / ours[key], digits)


def add_ratios(ours, theirs, peer, rss=True):
    """On the line `ours`: speedup_vs_<peer> against the line `theirs` and, with `rss`, peak_rss_ratio_vs_<peer>
    (our peak RSS / theirs)."""
    ours[f"speedup_vs_{peer}"] = speedup(ours, theirs)
    if rss:
        ours[f"peak_rss_ratio_vs_{peer}"] = round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3)


def peers_available(imports):
    """The libraries of `imports` ({library: "module, module"}) whose interpreter imports those modules; each
    left out is said on stderr."""
    found = []
    for library, modules in imports.items():
        python, _ = python_for(library)
        if subprocess.run([python, "-c", f"import {modules}"], capture_output=True).returncode == 0:
            found.append(library)
        else:
            print(f"{library}: {python} does not import {modules}: left out (benchmarks/venvs.sh)", file=sys.stderr)
    return found
