"""Training as processes: two runs with one seed give equal losses; a stop signal, then kill -9, then a resume
continue exactly; kill -9 while a resume retrains after a fallback still ends with a readable final checkpoint;
the mirrored strategy on two logical CPUs in a process of its own."""
import json
import os
import signal
import subprocess
import sys
import time

import tensorflow as tf

from helpers import REPO, checkpoint_counters, damage_checkpoint, read_scalars, tiny_params_file
from medseg_dl.experiment.experiment import open_model_dir


def _start(path, *extra):
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), "--params", path, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(path, process, timeout_s=240):
    deadline = time.time() + timeout_s
    while not os.path.exists(path):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_sigterm_then_kill9_then_resume_continue_exactly(tmp_path):
    path = tiny_params_file(tmp_path, training={"steps": 10000, "checkpoint_every": 5, "keep_last": 3})
    checkpoints = tmp_path / "run" / "checkpoints"
    first = _start(path)
    _wait_for(checkpoints / "ckpt-5.index", first)
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 0, output
    assert "SIGTERM: saved checkpoint" in output
    latest = tf.train.latest_checkpoint(str(checkpoints))
    stopped_at = int(latest.rsplit("-", 1)[1])
    assert checkpoint_counters(latest) == (stopped_at, stopped_at)

    own_params = str(tmp_path / "run" / "params.yaml")
    second = _start(own_params)  # resume, then die hard between checkpoints
    _wait_for(checkpoints / f"ckpt-{(stopped_at // 5 + 2) * 5}.index", second)
    time.sleep(0.3)
    second.kill()
    second.wait(timeout=60)
    for index in checkpoints.glob("ckpt-*.index"):  # every kept checkpoint is readable
        step, iterations = checkpoint_counters(str(index)[: -len(".index")])
        assert step == iterations
    resumed_from = int(tf.train.latest_checkpoint(str(checkpoints)).rsplit("-", 1)[1])
    final_steps = resumed_from + 3
    third = _start(own_params, "--set", f"training.steps={final_steps}")
    output = third.communicate(timeout=240)[0]
    assert third.returncode == 0, output
    assert "resumed from" in output and f"at step {resumed_from}" in output
    assert checkpoint_counters(str(checkpoints / f"ckpt-{final_steps}")) == (final_steps, final_steps)
    assert json.load(open(checkpoints / "done.json"))["step"] == final_steps


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    path = tiny_params_file(tmp_path, training={"steps": 30, "strategy": "mirrored", "log_every": 10})
    script = (
        "import sys, tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from medseg_dl.cli import main\n"
        f"sys.exit(main(['train', '--params', {path!r}]))\n")
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_scalars(open_model_dir(str(tmp_path / "run" / "params.yaml"))[1])
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])


def test_kill9_while_retraining_after_a_fallback_then_resume_saves_the_final_step(tmp_path):
    """The final checkpoint is damaged; the resume (same steps) falls back to the one before and is killed
    while it retrains; the next resume (same steps) still ends with a readable final checkpoint."""
    path = tiny_params_file(tmp_path, training={"steps": 20, "checkpoint_every": 10, "keep_last": 2})
    checkpoints = tmp_path / "run" / "checkpoints"
    own_params = str(tmp_path / "run" / "params.yaml")
    first = _start(path)
    assert first.wait(timeout=240) == 0, first.stdout.read()
    damage_checkpoint(str(checkpoints / "ckpt-20"), "truncated data")
    second = _start(own_params)
    for line in second.stdout:  # killed as soon as it has fallen back, before it can save again
        if "resumed from" in line:
            assert "at step 10" in line, line
            second.kill()
            break
    second.wait(timeout=60)
    assert not (checkpoints / "done.json").exists()
    third = _start(own_params)
    output = third.communicate(timeout=240)[0]
    assert third.returncode == 0, output
    assert "resumed from" in output and "at step 10" in output
    assert checkpoint_counters(str(checkpoints / "ckpt-20")) == (20, 20)
    assert json.load(open(checkpoints / "done.json")) == {"step": 20, "checkpoint": "ckpt-20"}


def test_two_runs_with_one_seed_give_equal_losses(tmp_path):
    """Weights, dropout and the input pipeline are seeded: two training processes, one seed, equal losses."""
    losses = []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        path = tiny_params_file(folder, training={"steps": 4, "log_every": 1}, sampling={"deterministic": True},
                            model={"dropout": 0.3})
        process = _start(path)
        assert process.wait(timeout=240) == 0, process.stdout.read()
        losses.append([float(r["loss"]) for r in read_scalars(open_model_dir(path)[1])])
    assert losses[0] == losses[1] and len(losses[0]) == 4
