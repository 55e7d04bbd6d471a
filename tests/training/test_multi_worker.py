"""Several workers for real: two `medseg train` processes under MultiWorkerMirroredStrategy on 127.0.0.1
train one model folder, are stopped after a checkpoint (at the end of their steps), and both resume
from the same step; only the chief writes the folder's checkpoints, logs and done marker."""
import csv
import json
import os
import socket
import subprocess
import sys

import tensorflow as tf
import yaml

from conftest import REPO, synthetic_dataset, tiny_params


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(params_path, *extra):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = []
    for index in range(2):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": config}
        processes.append(subprocess.Popen([sys.executable, "-m", "medseg_dl.cli", "train", "--params", params_path,
                                           *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          env=env, cwd=REPO))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300)[0])
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


def counters(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return (int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")),
            int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")))


def test_two_workers_train_stop_and_resume_at_the_same_step(tmp_path):
    root = synthetic_dataset(tmp_path / "data", cases=6)
    run = tmp_path / "run"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_params(root, run, training={
        "steps": 4, "checkpoint_every": 2, "log_every": 2, "strategy": "multi_worker"})))
    start_workers(str(path))
    checkpoints = run / "checkpoints"
    assert counters(str(checkpoints / "ckpt-4")) == (4, 4)
    assert json.load(open(checkpoints / "done.json"))["step"] == 4
    with open(run / "logs" / "train" / "scalars.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [2, 4]  # one writer, no clash
    assert not [n for n in os.listdir(run) if n.startswith(".worker-checkpoints")]
    outputs = start_workers(str(run / "params.yaml"), "--set", "training.steps=6")
    for output in outputs:
        assert "at step 4" in output and "resumed from" in output, output[-2000:]
    assert counters(str(checkpoints / "ckpt-6")) == (6, 6)
    assert json.load(open(checkpoints / "done.json"))["step"] == 6
    assert not os.path.exists(run / "train.lock")
    assert not [n for n in os.listdir(run) if n.startswith(".worker-checkpoints")]
