"""The machine a benchmark ran on, and the one place where benchmark lines are printed and kept.

Every benchmark prints its JSON lines through `record`; a measured run (not `--quick`) also appends
them to benchmarks/results/<name>.jsonl, the raw figures the README's tables are generated from
(benchmarks/tables.py). Each kept line carries the machine, the date and the package versions.
"""
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PACKAGES = ("tensorflow", "keras", "numpy", "scipy", "torch", "monai", "torchio", "medpy", "surface-distance",
            "elasticdeform")


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


def package_versions():
    """{package: version} of the installed packages among PACKAGES."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def record(name, line, keep):
    """Print `line` (a dict) as one JSON line with its machine (where it lacks one); with `keep`, also
    add the date and the package versions and append it to benchmarks/results/<name>.jsonl."""
    line = {**line, "machine": line.get("machine") or describe_machine()}
    if keep:
        line = {**line, "date": line.get("date") or datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                "versions": line.get("versions") or package_versions()}
    text = json.dumps(line)
    print(text, flush=True)
    if keep:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(os.path.join(RESULTS_DIR, f"{name}.jsonl"), "a") as f:
            f.write(text + "\n")
