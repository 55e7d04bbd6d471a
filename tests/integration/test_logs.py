"""What a CPU user sees on stderr: `medseg convert`, `train` and `evaluate` run as a user runs them (without
the TF_CPP_MIN_LOG_LEVEL this suite sets, without CUDA_VISIBLE_DEVICES) print no TensorFlow C++ chatter
and no leaked-semaphore warning, while TensorFlow's warnings still reach the user."""
import os
import re
import subprocess
import sys

import yaml

from helpers import REPO, synthetic_dataset, tiny_params

NOISE = [
    re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d"),  # a C++ log line in absl's format: I0000 00:00:1796518796.45 ...
    re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IE] "),  # INFO/ERROR in TensorFlow's own older format
    re.compile("cuInit"),  # the CUDA platform's failed start on a machine without an NVIDIA driver (E-level)
    re.compile("oneDNN custom operations"),  # the INFO notice that oneDNN kernels are on
    re.compile("absl::InitializeLog"),  # absl's notice that it logs to stderr before it is set up
    re.compile("leaked semaphore"),  # multiprocessing's resource tracker: a conversion worker was killed
]
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
MEDSEG = os.path.join(os.path.dirname(sys.executable), "medseg")


def medseg(*args):
    done = subprocess.run([MEDSEG, *args], env=USER_ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    noise = [line for line in done.stderr.splitlines() if any(p.search(line) for p in NOISE)]
    assert not noise, f"medseg {args[0]} printed:\n" + "\n".join(noise)
    return done


def test_convert_train_evaluate_print_no_tensorflow_chatter(tmp_path):
    root = synthetic_dataset(tmp_path / "data")
    params = tiny_params(root, tmp_path / "run", training={"steps": 4, "checkpoint_every": 4, "log_every": 2})
    params["data"]["workers"] = 2  # conversion in a process pool
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert medseg("convert", "--params", str(tmp_path / "params.yaml")).returncode == 0
    run_params = str(tmp_path / "run" / "params.yaml")
    assert medseg("train", "--params", run_params).returncode == 0
    assert medseg("evaluate", "--params", run_params, "--once").returncode == 0


def test_failed_conversion_leaves_no_semaphore(tmp_path):
    """A bad subject stops the pool while the other worker converts a subject: stopped, it leaves nothing."""
    root = synthetic_dataset(tmp_path / "data", cases=6)
    (root / "images" / "case_00.nii.gz").write_bytes(b"not a volume")
    params = tiny_params(root, tmp_path / "run")
    params["data"]["workers"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = medseg("convert", "--params", str(tmp_path / "params.yaml"))
    assert done.returncode == 2 and "case_00.nii.gz: cannot read the volume" in done.stderr


def test_tensorflow_warnings_still_reach_the_user():
    """A C++ WARNING that TensorFlow logs while its libraries load, and a Python warning (retracing)."""
    script = ("import medseg_dl, tensorflow as tf\n"
              "f = tf.function(lambda x: x + 1)\n"
              "for i in range(6): f(i)\n")
    done = subprocess.run([sys.executable, "-c", script], env={**USER_ENV, "TF_ENABLE_ONEDNN_OPTS": "maybe"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^W\d{4} .*TF_ENABLE_ONEDNN_OPTS is not set to either", done.stderr, re.M), done.stderr
    assert "triggered tf.function retracing" in done.stderr
    assert "oneDNN custom operations" not in done.stderr
