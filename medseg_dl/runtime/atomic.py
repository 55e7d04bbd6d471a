"""Atomic writes: a file or folder appears complete under its name, or not at all.

Every writer of the project goes through `replacing`: the content is written under a temporary
name in the target's folder (`.tmp-<pid>-<token>-<name>`, hidden, ending with the real name so
that writers which pick a format from the suffix, such as nibabel, still do), then renamed onto
the target. A failure (or an exception raised by the caller) in the middle removes the temporary
and leaves the previous file intact. A crash that kills the process may leave a temporary behind,
never a half-written target; `remove_stale_temporaries` deletes those whose process is gone.
"""
import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from typing import Any, Iterator, List, Optional

from medseg_dl.errors import DiskFullError, MedsegError

TEMPORARY_PREFIX = ".tmp-"
_TEMPORARY = re.compile(r"^\.tmp-(\d+)-[0-9a-f]{8}-")


def temporary_name(path: str) -> str:
    """A fresh temporary path beside `path`: <folder>/.tmp-<pid>-<8 hex>-<name>."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{TEMPORARY_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}")


@contextlib.contextmanager
def replacing(path) -> Iterator[str]:
    """Yield a temporary path to write instead of `path`; on leaving the block without an error it
    replaces `path` (a file, or a folder the caller created there). On an error the temporary is
    removed, `path` keeps its previous content, and the error propagates."""
    path = os.fspath(path)
    temporary = temporary_name(path)
    try:
        yield temporary
        _move_onto(temporary, path)
    finally:
        _remove(temporary)


def _move_onto(temporary: str, path: str) -> None:
    """Rename `temporary` onto `path`; an existing folder is moved aside first, then deleted."""
    if not os.path.isdir(path):
        os.replace(temporary, path)
        return
    aside = temporary_name(path)
    os.replace(path, aside)
    os.replace(temporary, path)
    _remove(aside)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def write_text(path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with replacing(path) as temporary, open(temporary, "w", encoding="utf-8") as stream:
        stream.write(text)


def write_json(path, value: Any, indent: int = 1) -> None:
    """Write `value` as JSON to `path` atomically (non-JSON numbers such as numpy floats as float)."""
    write_text(path, json.dumps(value, indent=indent, default=float))


def copy_file(source, target) -> None:
    """Copy the file `source` to `target` atomically (raises FileNotFoundError if `source` is gone)."""
    with replacing(target) as temporary:
        shutil.copyfile(source, temporary)


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = tuple(os.strerror(e) for e in _DISK_FULL_ERRNOS)  # "No space left on device", ...


def is_disk_full(err: BaseException) -> bool:
    """Whether a failed write ran out of disk space or quota: an OSError with errno ENOSPC or EDQUOT, or
    TensorFlow's error for one (it maps both to ResourceExhaustedError, the same class as running out of
    memory, and keeps the system's text in its message)."""
    if isinstance(err, OSError):
        return err.errno in _DISK_FULL_ERRNOS
    return any(text in str(getattr(err, "message", err)) for text in _DISK_FULL_TEXTS)


def disk_full_error(folder, what: str, then: str) -> DiskFullError:
    """The one-line error of a full disk while writing `what` into `folder`, with the space left there
    and the fix: free space, then `then` (e.g. "resume with --params ...")."""
    folder = os.fspath(folder)
    try:
        free_mb = f"{shutil.disk_usage(_existing_parent(folder)).free / 2**20:.0f} MB free"
    except OSError:
        free_mb = "free space unknown"
    return DiskFullError(f"{folder}: the disk is full ({free_mb}) while writing {what}; free disk space, then {then}")


@contextlib.contextmanager
def disk_full_reported(folder, what: str, then: str) -> Iterator[None]:
    """Turn a disk-full error raised in the block (`is_disk_full`) into `disk_full_error`; other errors, and
    the project's own errors, pass unchanged."""
    try:
        yield
    except MedsegError:  # already told apart, with its own message
        raise
    except Exception as err:
        if is_disk_full(err):
            raise disk_full_error(folder, what, then) from None
        raise


def _existing_parent(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (ours included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def temporary_owner(name: str) -> Optional[int]:
    """The process id in a temporary's file name (see `temporary_name`), or None for other names."""
    match = _TEMPORARY.match(os.path.basename(name))
    return int(match.group(1)) if match else None


def remove_stale_temporaries(folder, recursive: bool = False) -> List[str]:
    """Delete the temporaries (files or folders) in `folder` whose writing process no longer runs on
    this machine, left by a kill or a power cut; with `recursive`, in its subfolders too. Returns the
    removed paths. A missing folder has none."""
    removed = []
    for parent, folders, files in os.walk(os.fspath(folder)):
        for name in folders + files:
            owner = temporary_owner(name)
            if owner is not None and not process_alive(owner):
                _remove(os.path.join(parent, name))
                removed.append(os.path.join(parent, name))
        if not recursive:
            break
        folders[:] = [f for f in folders if temporary_owner(f) is None]
    return removed
