"""One trainer and one evaluator per model folder: a lock file that a process holds for its lifetime.

`ProcessLock(path, role)` creates `path` with O_CREAT | O_EXCL, so of two processes that start at
once exactly one gets it, and writes into it who holds it: pid, host, the process start time (to
tell a reused pid apart), role, start date and command line. A second process is refused with a
`ModelDirError` that names the holder and the fix. The callers hold it with `with ProcessLock(...)`;
the class installs no atexit or signal handler. A holder killed with kill -9 (or a power cut) leaves
its file behind; the next process takes such a stale lock over: one that names this host and a pid
that no longer runs, or a pid that runs with another start time (reused), or a file that is not
valid JSON (cut by a power loss; a one-line warning is printed).

Races: every step that reads, checks or deletes an existing lock file runs under `fcntl.flock` on
that file's inode, and re-checks that the path still names that inode. So of two processes taking
over the same stale lock only one deletes it, and both then race for the O_EXCL create again; a
writer that is still filling its fresh file is not judged before it finishes. A takeover retries a
bounded number of times.

Limits: liveness is checked on this machine only. In a folder shared between machines a lock from
another host is never taken over automatically (its pid means nothing here); the message says to
delete the file by hand. Without /proc (not Linux) the start time is None and a reused pid is taken
for the holder. `flock` on a network file system is only as reliable as that file system's locks.
"""
import contextlib
import fcntl
import json
import os
import socket
import sys
from datetime import datetime, timezone
from typing import Iterator, Optional, Tuple

from medseg_dl.errors import ModelDirError
from medseg_dl.runtime import atomic

TAKEOVER_ATTEMPTS = 5


def process_start_time(pid: int) -> Optional[int]:
    """The start time of process `pid` (int, clock ticks since boot: field 22 of /proc/<pid>/stat),
    or None where /proc is missing or the process does not run."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            stat = stream.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name (field 2) may hold spaces and ')'
    return int(fields[22 - 3])


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def _locked_file(path: str) -> Iterator[Optional[Tuple[int, bytes]]]:
    """Open the existing file `path` under an exclusive flock. Yields (fd, content), or None if the
    file vanished or was replaced meanwhile (then the caller starts over)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield ((fd, os.read(fd, 1 << 20)) if _same_file(path, fd) else None)
    finally:
        os.close(fd)  # releases the flock


def _same_file(path: str, fd: int) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        now, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _parse(content: bytes) -> Optional[dict]:
    """The holder described by a lock file's content, or None if it is not a valid lock."""
    try:
        holder = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return None
    return holder if isinstance(holder.get("host"), str) else None


class ProcessLock:
    """A lock file at `path` (str) naming the process that holds it (`role`, str, e.g. "trainer" or
    "evaluator"). `acquire` raises `ModelDirError` while another live process on this host (or any
    process on another host) holds it; `release` removes it if it still names this process."""

    def __init__(self, path: str, role: str):
        self.path, self.role = os.path.abspath(os.fspath(path)), role

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def _me(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "start_time": process_start_time(pid),
                "role": self.role, "started": _now(), "command": " ".join(sys.argv)}

    def acquire(self) -> "ProcessLock":
        """Create the lock file, taking over a stale one; returns self. Raises `ModelDirError` if
        another process holds it, RuntimeError if this process holds it already."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(TAKEOVER_ATTEMPTS):
            if self._create():
                return self
            self._remove_if_stale()
        raise ModelDirError(f"{self.path}: could not take over this lock in {TAKEOVER_ATTEMPTS} "
                            f"attempts (other processes keep taking it); try again")

    def _create(self) -> bool:
        """Create the lock file naming this process; False if a file exists (or took our place)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # nobody judges the file before it is complete
            if not _same_file(self.path, fd):  # taken over as empty before we held the flock
                return False
            os.write(fd, json.dumps(self._me(), indent=1).encode("utf-8"))
            os.fsync(fd)
            return True
        finally:
            os.close(fd)

    def _remove_if_stale(self) -> None:
        """Delete the existing lock file if it is stale; raise if a live process holds it."""
        with _locked_file(self.path) as opened:
            if opened is None:  # gone or replaced meanwhile: try the create again
                return
            holder = _parse(opened[1])
            if holder is None:
                print(f"warning: {self.path}: the lock file is not valid JSON (cut by a crash?); "
                      f"taking it over", flush=True)
            elif not self._is_stale(holder):
                raise self._held_error(holder)
            os.remove(self.path)  # under the flock, and the path still names the file we read

    def _is_stale(self, holder: dict) -> bool:
        """Whether the (valid) lock `holder` names a process that is gone; raises RuntimeError if it
        names this process."""
        if holder["host"] != socket.gethostname():
            return False
        pid, recorded = holder["pid"], holder.get("start_time")
        if not atomic.process_alive(pid):
            return True
        current = process_start_time(pid)
        if recorded is not None and current is not None and recorded != current:
            return True  # the pid was reused by another process
        if pid == os.getpid():
            raise RuntimeError(f"{self.path}: this process (pid {pid}) holds this lock already")
        return False

    def _held_error(self, holder: dict) -> ModelDirError:
        """The one-line error naming the holder of the lock and the fix."""
        role, host = holder.get("role", "process"), holder["host"]
        who = (f"pid {holder['pid']} on host {host}, since {holder.get('started', '?')}: "
               f"{holder.get('command', '?')}")
        if host != socket.gethostname():
            return ModelDirError(
                f"{self.path}: another {role} may run on this model folder ({who}); it runs on "
                f"another host, so its liveness cannot be checked from here; stop it first, or "
                f"delete {self.path} if that process is gone")
        return ModelDirError(f"{self.path}: another {role} runs on this model folder ({who}); stop "
                             f"it first, or delete {self.path} if that process is gone")

    def release(self) -> None:
        """Remove the lock file if it still names this process (pid and start time); never raises
        if it is gone."""
        with _locked_file(self.path) as opened:
            if opened is None:
                return
            holder = _parse(opened[1])
            me = self._me()
            if holder is not None and all(holder.get(k) == me[k] for k in ("pid", "host", "start_time")):
                os.remove(self.path)
