"""The machine a benchmark ran on: the `machine` field of every benchmark's JSON line."""
import os
import platform
import shutil
import subprocess


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
