"""The machine a benchmark ran on, and the one place where benchmark lines are printed and kept.

Every benchmark prints its JSON lines through `record`; a measured run (not `--quick`) also appends
them to benchmarks/results/<name>.jsonl, the raw figures the README's tables are generated from
(benchmarks/tables.py). Each line carries the machine and the versions of Python and of the packages
that produced its figures (`library_versions`); a kept line also carries the date.
"""
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys

from interpreters import python_for

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
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
    `isolated` (`interpreters.python_for`), else this one (the process itself or a child with its interpreter)."""
    library = line.get("library", "medseg_dl")
    python = python_for(library)[0] if line.get("isolated") else sys.executable
    done = subprocess.run([python, "-c", VERSIONS_SCRIPT, *PACKAGES_OF[library]], capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout)


def record(name, line, keep):
    """Print `line` (a dict) as one JSON line with its machine (where it lacks one) and the versions of
    what produced it; with `keep`, also add the date and append it to benchmarks/results/<name>.jsonl."""
    line = {**line, "machine": line.get("machine") or describe_machine(), "versions": library_versions(line)}
    if keep:
        line = {**line, "date": line.get("date") or datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
    text = json.dumps(line)
    print(text, flush=True)
    if keep:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(os.path.join(RESULTS_DIR, f"{name}.jsonl"), "a") as f:
            f.write(text + "\n")
