"""Errors a user can cause. Each message names the file (or key) and the fix."""
import importlib


class MedsegError(Exception):
    """Base class of every error caused by user input; the CLI prints it without a traceback."""


class ParamsError(MedsegError):
    """A params file or override is malformed, has an unknown key, or a bad value."""


class DataError(MedsegError):
    """A data file or folder is missing, unreadable or inconsistent."""


class ModelDirError(MedsegError):
    """The model folder cannot be created, resumed or written."""


class TrainingError(MedsegError):
    """Training cannot continue (non-finite loss, incompatible checkpoint, ...)."""


class CheckpointError(MedsegError):
    """A checkpoint cannot be read (files missing or damaged)."""


class OutOfMemoryError(MedsegError):
    """The GPU or host memory ran out (TensorFlow's ResourceExhaustedError that is not a full disk)."""


class DiskFullError(MedsegError):
    """A write failed because the disk (or the user's quota) is full: not a memory problem."""


def import_extra(module: str, extra: str, feature: str):
    """The module named `module`, which needs the packages of the optional extra `extra` (pyproject.toml); a
    `MedsegError` naming `feature`, the missing package and the pip command when one is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MedsegError(f"{feature} needs {err.name}, which is not installed; pip install 'medseg_dl[{extra}]'"
                          ) from None
