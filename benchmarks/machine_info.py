"""The machine a benchmark ran on: the `machine` field of every benchmark's JSON line."""
import os
import platform
import sys


def describe_machine():
    """'<cores> cores, <CPU model>', then the GPUs (or 'no GPU') when TensorFlow is already imported."""
    model = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    description = f"{os.cpu_count()} cores, {model}"
    tensorflow = sys.modules.get("tensorflow")
    if tensorflow is not None:
        gpus = [device.name for device in tensorflow.config.list_physical_devices("GPU")]
        description += f", GPU {gpus}" if gpus else ", no GPU"
    return description
