"""medseg_dl: patch-based segmentation of 3D medical images with TensorFlow 2.

Importing the package sets TensorFlow's process settings, each only where the user has not set it. Every
entry point (`medseg`, train.py, evaluate.py, the conversion workers) imports medseg_dl before anything
imports tensorflow, so the settings are in place when TensorFlow reads them.
"""
import importlib.abc
import importlib.util
import os
import subprocess
import sys

# TensorFlow leaves its oneDNN CPU kernels off on some processors (AMD EPYC here), where they make
# 3D convolutions 4-7x faster; switch them on unless the user chose. Must precede `import tensorflow`.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# TensorFlow's C++ log from WARNING up: its INFO lines (CPU features, XLA service, ...) are not for users.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# On a Linux machine without any GPU driver, TensorFlow's CUDA platform would still call cuInit in every
# process and log its failure as an ERROR ("UNKNOWN ERROR (303)"): only its CPU devices are set up there
# (CUDA_VISIBLE_DEVICES would not stop the call). The paths: NVIDIA's driver, WSL's GPU, ROCm, any DRM GPU.
_GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd", "/dev/dri")
if sys.platform == "linux" and not any(os.path.exists(path) for path in _GPU_DRIVER_PATHS):
    os.environ.setdefault("TF_ENABLED_DEVICE_TYPES", "CPU")

# TensorFlow's libraries log INFO lines while they load, before anything can set their level ("oneDNN
# custom operations are on", "Could not find cuda drivers"), each batch after absl's notice that it logs
# to stderr until it is set up. While `import tensorflow` runs, stderr passes through a child process
# that drops those lines (INFO only, and only while TF_CPP_MIN_LOG_LEVEL hides INFO): a child, not a
# thread, so that a fatal error logged while the libraries load still reaches the user.
_LOAD_NOTICE = rb"I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] |WARNING: All log messages before absl::InitializeLog"
_FILTER = f"""import re, sys
notice = re.compile({_LOAD_NOTICE!r})
for line in sys.stdin.buffer:
    if not notice.match(line):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` for its first import and runs its module with stderr through `_FILTER`."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None:
            exec_module = spec.loader.exec_module
            spec.loader.exec_module = lambda module: _filtered(exec_module, module)
        return spec


def _filtered(exec_module, module):
    """exec_module(module) with file descriptor 2 (C++ code writes to it too) through `_FILTER`."""
    sys.stderr.flush()
    stderr = os.dup(2)
    child = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER], stdin=subprocess.PIPE, stdout=stderr)
    os.dup2(child.stdin.fileno(), 2)
    try:
        exec_module(module)
    finally:
        sys.stderr.flush()
        os.dup2(stderr, 2)
        os.close(stderr)
        child.stdin.close()
        child.wait()


if os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0" and sys.executable and sys.stderr is not None \
        and "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowImport())

from medseg_dl.errors import MedsegError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MedsegError", "__version__"]
