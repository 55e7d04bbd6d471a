"""ProcessLock: one holder per lock file; stale locks (kill -9, reused pid, corrupt file) taken over."""
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import REPO

from medseg_dl.errors import ModelDirError
from medseg_dl.runtime import locks
from medseg_dl.runtime.locks import ProcessLock, process_start_time

# SIGINT as in a terminal: a shell that starts the tests in the background (`... &`) makes its children ignore it.
# The child says "held" once inside its `with` block, so a signal never lands inside acquire().
HOLD = ("import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from medseg_dl.runtime.locks import ProcessLock\n"
        "with ProcessLock(sys.argv[1], 'trainer'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n")


def start_holder(path):
    """A child process that acquires the lock at `path` and sleeps; returns it once it holds the lock."""
    env = dict(os.environ, PYTHONPATH=REPO)
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=env, stdout=subprocess.PIPE)
    ready, _, _ = select.select([child.stdout], [], [], 60)
    if ready and child.stdout.readline() == b"held\n":
        return child
    child.kill()
    raise AssertionError(f"the child did not take the lock {path} in 60 s (exit code {child.wait()})")


def signal_masks(pid):
    """The pending, blocked, ignored and caught signal masks of process `pid` (/proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        return " ".join(line.strip() for line in status if line.startswith(("SigPnd", "ShdPnd", "SigBlk",
                                                                          "SigIgn", "SigCgt")))


def stop(child, sig=signal.SIGINT):
    """Send `sig` to `child` and wait for it to end; a child still running after 60 s fails the test with its
    signal masks (a blocked or ignored SIGINT would show there)."""
    child.send_signal(sig)
    try:
        child.wait(60)
    except subprocess.TimeoutExpired:
        masks = signal_masks(child.pid)
        child.kill()
        child.wait()
        raise AssertionError(f"the lock holder (pid {child.pid}) ignored {sig.name} for 60 s: {masks}")
    finally:
        child.stdout.close()


def write_lock(path, **fields):
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": None, "role": "trainer",
              "started": "2026-12-02T10:00:00Z", "command": "medseg train --params p.yaml"}
    holder.update(fields)
    path.write_text(json.dumps(holder))


def holder_of(path):
    return json.loads(path.read_text())


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    path = tmp_path / "eval" / "eval.lock"  # the parent folder does not exist yet
    with ProcessLock(str(path), "evaluator") as lock:
        holder = holder_of(path)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["start_time"] == process_start_time(os.getpid()) is not None
        assert holder["role"] == "evaluator" and holder["command"] == " ".join(sys.argv)
        assert holder["started"].endswith("Z") and holder["started"][:2] == "20"
        with pytest.raises(RuntimeError, match="holds this lock already"):
            ProcessLock(str(path), "evaluator").acquire()
        assert holder_of(path)["pid"] == os.getpid()  # the failed second acquire left it alone
        assert lock.path == str(path)
    assert not path.exists()
    ProcessLock(str(path), "evaluator").release()  # already gone: no error


def test_a_live_holder_is_refused(tmp_path):
    path = tmp_path / "train.lock"
    child = start_holder(path)
    try:
        with pytest.raises(ModelDirError) as error:
            ProcessLock(str(path), "trainer").acquire()
        message = str(error.value)
        assert str(path) in message and f"pid {child.pid}" in message and "delete" in message
        assert "another trainer runs" in message and "\n" not in message
        assert holder_of(path)["pid"] == child.pid
    finally:
        stop(child)
    assert not path.exists()  # SIGINT's KeyboardInterrupt left the child's `with` block


def test_a_lock_left_by_kill_9_is_taken_over(tmp_path):
    path = tmp_path / "train.lock"
    child = start_holder(path)
    stop(child, signal.SIGKILL)
    assert holder_of(path)["pid"] == child.pid  # it never released
    with ProcessLock(str(path), "trainer"):
        assert holder_of(path)["pid"] == os.getpid()


def test_a_reused_pid_is_taken_over(tmp_path):
    path = tmp_path / "train.lock"
    parent = os.getppid()
    write_lock(path, pid=parent, start_time=process_start_time(parent) + 1)
    with ProcessLock(str(path), "trainer"):
        assert holder_of(path)["pid"] == os.getpid()
    write_lock(path, pid=parent, start_time=process_start_time(parent))  # the same process: held
    with pytest.raises(ModelDirError, match=f"pid {parent} on host"):
        ProcessLock(str(path), "trainer").acquire()


def test_a_lock_from_another_host_is_refused(tmp_path):
    path = tmp_path / "train.lock"
    write_lock(path, host="elsewhere", pid=2 ** 22 + 7)  # no such pid here, but it is not ours to judge
    with pytest.raises(ModelDirError) as error:
        ProcessLock(str(path), "evaluator").acquire()
    message = str(error.value)
    assert "host elsewhere" in message and "cannot be checked from here" in message
    assert f"delete {path}" in message and "\n" not in message
    assert holder_of(path)["host"] == "elsewhere"


@pytest.mark.parametrize("content", ['{"pid": 12', "", '["not", "a", "lock"]'])
def test_a_corrupt_lock_file_is_taken_over_with_a_warning(tmp_path, capsys, content):
    path = tmp_path / "train.lock"
    path.write_text(content)
    with ProcessLock(str(path), "trainer"):
        assert holder_of(path)["pid"] == os.getpid()
    output = capsys.readouterr().out
    assert "not valid JSON" in output and str(path) in output and output.count("\n") == 1


def test_release_keeps_a_lock_taken_over_by_another_process(tmp_path):
    path = tmp_path / "train.lock"
    lock = ProcessLock(str(path), "trainer").acquire()
    write_lock(path, pid=os.getppid(), start_time=process_start_time(os.getppid()))
    lock.release()
    assert holder_of(path)["pid"] == os.getppid()
    write_lock(path, start_time=process_start_time(os.getpid()) + 1)  # our pid, an earlier process
    lock.release()
    assert path.exists()


@pytest.mark.parametrize("stale", [True, False])
def test_a_concurrent_takeover_while_we_wait_for_the_flock_wins_alone(tmp_path, monkeypatch, stale):
    """Another process replaces the file while we wait for its flock (after taking over the stale
    lock we read, or our still empty fresh file): we must notice, and not win a second time."""
    path = tmp_path / "train.lock"
    if stale:
        write_lock(path, pid=2 ** 22 + 7)  # a pid that does not run
    real_flock, other, calls = locks.fcntl.flock, os.getppid(), []

    def flock_after_the_other_takeover(fd, operation):
        if not calls:  # the other process removes the file and creates its own, a live holder's
            path.unlink()
            write_lock(path, pid=other, start_time=process_start_time(other))
        calls.append(operation)
        real_flock(fd, operation)

    monkeypatch.setattr(locks.fcntl, "flock", flock_after_the_other_takeover)
    with pytest.raises(ModelDirError, match=f"pid {other} on host"):
        ProcessLock(str(path), "trainer").acquire()
    assert holder_of(path)["pid"] == other

