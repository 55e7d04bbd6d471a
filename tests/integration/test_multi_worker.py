"""Several workers for real: two `medseg train` processes under MultiWorkerMirroredStrategy on 127.0.0.1
train one model folder to the end of their steps, and both resume from the same step; only the chief writes the
folder's checkpoints, logs and done marker. A SIGTERM to one of them (the non-chief while they resume, or the
chief of a fresh run) stops both at the same step, saved by the chief."""
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import tensorflow as tf
import yaml

from helpers import REPO, synthetic_dataset, tiny_params


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch_workers(params_path, logs, *extra):
    """Start the two workers (index 0 is the chief); worker i writes its output to logs/worker-<i>.log."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = []
    for index in range(2):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": config}
        with open(logs / f"worker-{index}.log", "w") as log:
            processes.append(subprocess.Popen([sys.executable, "-m", "medseg_dl.cli", "train", "--params",
                                               params_path, *extra], stdout=log, stderr=subprocess.STDOUT,
                                              text=True, env=env, cwd=REPO))
    return processes


def finish_workers(processes, logs, timeout_s=300):
    """Wait for both workers (killed after `timeout_s`); checks that both exit 0; returns their outputs."""
    try:
        for process in processes:
            process.wait(timeout=timeout_s)
    finally:
        for process in processes:
            process.kill()
    outputs = [(logs / f"worker-{index}.log").read_text() for index in range(2)]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


def start_workers(params_path, logs, *extra):
    return finish_workers(launch_workers(params_path, logs, *extra), logs)


def counters(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return (int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")),
            int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")))


def signal_both_in_the_step_loop(processes, logs, signalled, after_step):
    """Wait until both workers logged step `after_step` (their signal handlers are set), then SIGTERM worker
    `signalled`; returns both outputs once they exit 0, each with the step it saved at."""
    logs = [logs / f"worker-{index}.log" for index in range(2)]
    deadline = time.time() + 240
    while not all(f"step {after_step}/" in log.read_text() for log in logs):
        assert time.time() < deadline and all(p.poll() is None for p in processes), [log.read_text()[-2000:]
                                                                                     for log in logs]
        time.sleep(0.2)
    processes[signalled].send_signal(signal.SIGTERM)
    outputs = finish_workers(processes, logs[0].parent, timeout_s=90)
    assert outputs[signalled].count("SIGTERM: saved checkpoint at step") == 1
    assert outputs[1 - signalled].count("stop requested on another worker: saved checkpoint at step") == 1
    steps = [int(re.search(r"saved checkpoint at step (\d+)", output)[1]) for output in outputs]
    assert steps[0] == steps[1], steps
    return outputs, steps[0]


def check_stopped_at(run, stopped):
    """The chief saved the stop step as the latest checkpoint, with no done marker and no worker leftovers."""
    checkpoints = run / "checkpoints"
    assert tf.train.latest_checkpoint(str(checkpoints)) == str(checkpoints / f"ckpt-{stopped}")
    assert counters(str(checkpoints / f"ckpt-{stopped}")) == (stopped, stopped)
    assert not os.path.exists(checkpoints / "done.json")
    assert not [n for n in os.listdir(run) if n.startswith(".worker-checkpoints")]


def test_two_workers_train_then_resume_and_a_sigterm_to_the_non_chief_stops_both_at_the_same_step(tmp_path):
    """Trained to its 4 steps (one writer of the logs, the done marker, no lock left), then resumed with a target
    far away: both resume from step 4, and a SIGTERM to the non-chief stops both at one step, saved by the chief."""
    root = synthetic_dataset(tmp_path / "data", cases=6)
    run = tmp_path / "run"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_params(root, run, training={
        "steps": 4, "checkpoint_every": 2, "log_every": 2, "strategy": "multi_worker"})))
    start_workers(str(path), tmp_path)
    checkpoints = run / "checkpoints"
    assert counters(str(checkpoints / "ckpt-4")) == (4, 4)
    assert json.load(open(checkpoints / "done.json"))["step"] == 4
    with open(run / "logs" / "train" / "scalars.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [2, 4]  # one writer, no clash
    assert not os.path.exists(run / "train.lock")
    assert not [n for n in os.listdir(run) if n.startswith(".worker-checkpoints")]
    processes = launch_workers(str(run / "params.yaml"), tmp_path, "--set", "training.steps=100000",
                               "--set", "training.checkpoint_every=100000", "--set", "training.log_every=1")
    outputs, stopped = signal_both_in_the_step_loop(processes, tmp_path, signalled=1, after_step=6)
    for output in outputs:
        assert "at step 4" in output and "resumed from" in output, output[-2000:]
    assert stopped >= 6
    check_stopped_at(run, stopped)


def test_a_stop_signal_to_the_chief_stops_both_at_the_same_step(tmp_path):
    root = synthetic_dataset(tmp_path / "data", cases=6)
    run = tmp_path / "run"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_params(root, run, training={
        "steps": 100000, "checkpoint_every": 100000, "log_every": 1, "strategy": "multi_worker"})))
    _, stopped = signal_both_in_the_step_loop(launch_workers(str(path), tmp_path), tmp_path, signalled=0,
                                              after_step=2)
    check_stopped_at(run, stopped)
