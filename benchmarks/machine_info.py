"""The machine a benchmark ran on, and the one place where benchmark lines are printed and kept.

Every benchmark prints its JSON lines through `record`; a measured run (not `--quick`) also appends
them to benchmarks/results/<name>.jsonl, the raw figures the README's tables are generated from
(benchmarks/tables.py). Each line carries the machine, the versions of Python and of the packages
that produced its figures (`library_versions`), the commit of this checkout (`commit`)
and, where it has a peak RSS, the method that measured it (`harness.RSS_METHOD`); a kept line also
carries the date. A line is appended with one write to a file opened for appending, under an
exclusive lock: lines of concurrent runs never interleave.
"""
import datetime
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys

import harness
# the packages behind each library's figures (a line that names no library is medseg_dl's)
PACKAGES_OF = {"medseg_dl": ("tensorflow", "keras", "numpy", "scipy"), "monai": ("monai", "torch", "numpy"),
               "torchio": ("torchio", "torch", "numpy"), "torchio_per_patch": ("torchio", "torch", "numpy"),
               "elasticdeform": ("elasticdeform", "numpy", "scipy"), "medpy": ("medpy", "numpy", "scipy"),
               "surface_distance": ("surface-distance", "numpy", "scipy"),
               "nnunetv2": ("nnunetv2", "torch", "blosc2", "numpy"),
               "savedmodel": ("tensorflow", "keras", "numpy"), "onnxruntime": ("onnxruntime", "numpy")}
# run by the interpreter in question: {"python": its version, package: version} of the installed packages among argv
VERSIONS_SCRIPT = """
import importlib.metadata, json, platform, sys
versions = {"python": platform.python_version()}
for package in sys.argv[1:]:
    try:
        versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        pass
print(json.dumps(versions))
"""


def describe_machine():
    """'<cores> cores, <CPU model>, GPU [<names>]' or '..., no GPU' (GPUs as `nvidia-smi -L` lists
    them, so that scripts which only start other processes report them too)."""
    model = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    gpus = []
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        gpus = [line.split(":", 1)[1].split("(UUID")[0].strip()  # "GPU 0: <name> (UUID: ...)"
                for line in listing.splitlines() if line.startswith("GPU ")]
    return f"{os.cpu_count()} cores, {model}, " + (f"GPU {gpus}" if gpus else "no GPU")


def library_versions(line):
    """{"python": version, package: version} of the line's library (`library`; medseg_dl where it names none),
    as installed for the interpreter that ran it: the library's own environment when the line says
    `isolated` (`harness.python_for`), else this one (the process itself or a child with its interpreter)."""
    library = line.get("library", "medseg_dl")
    python = harness.python_for(library)[0] if line.get("isolated") else sys.executable
    done = subprocess.run([python, "-c", VERSIONS_SCRIPT, *PACKAGES_OF[library]], capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout)


def commit():
    """This checkout's commit, `git describe --always` (e.g. 5de2df9), with "-dirty" where a tracked file outside
    benchmarks/results differs from it (the lines a run appends there do not count); "unknown" outside git."""
    described = subprocess.run(["git", "-C", harness.REPO, "describe", "--always"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    changed = subprocess.run(["git", "-C", harness.REPO, "status", "--porcelain", "--untracked-files=no", "--", ".",
                              ":(exclude)benchmarks/results"], capture_output=True, text=True, timeout=60).stdout
    return (described + ("-dirty" if changed.strip() else "")) if described else "unknown"


def record(name, line, keep):
    """Print `line` (a dict) as one JSON line with its machine (where it lacks one), the versions of what
    produced it, the commit and the RSS method (where it has a peak RSS); with `keep`, also add the date and
    append it to benchmarks/results/<name>.jsonl."""
    line = {**line, "machine": line.get("machine") or describe_machine(), "versions": library_versions(line),
            "commit": commit()}
    if any(key.startswith("peak_rss") for key in line):
        line["rss_method"] = harness.RSS_METHOD
    if keep:
        line = {**line, "date": line.get("date") or datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
    text = json.dumps(line)
    print(text, flush=True)
    if keep:
        append_line(os.path.join(harness.RESULTS_DIR, f"{name}.jsonl"), text)


def append_line(path, text):
    """Append `text` and a newline to `path` in one write, under an exclusive lock of the file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.write(descriptor, (text + "\n").encode())
    finally:
        os.close(descriptor)
