"""What a CPU user sees on stderr (helpers.USER_ENV: without the TF_CPP_MIN_LOG_LEVEL this suite sets, without
CUDA_VISIBLE_DEVICES): a failed conversion in a process pool leaves no leaked-semaphore warning, and TensorFlow's
warnings still reach the user. test_end_to_end.py checks that convert (in a pool), train, evaluate, predict and show
print no TensorFlow C++ chatter."""
import os
import re
import subprocess
import sys

import yaml

from helpers import REPO, USER_ENV, synthetic_dataset, tensorflow_noise, tiny_params

MEDSEG = os.path.join(os.path.dirname(sys.executable), "medseg")


def medseg(*args):
    done = subprocess.run([MEDSEG, *args], env=USER_ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    noise = tensorflow_noise(done.stderr)
    assert not noise, f"medseg {args[0]} printed:\n" + "\n".join(noise)
    return done


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
