"""The training process: loss falls, checkpoints rotate, resume is exact, faults are handled."""
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import yaml

from conftest import REPO, synthetic_dataset, tiny_params
from medseg_dl.runtime import devices
from medseg_dl.data.convert import convert_dataset
from medseg_dl.errors import ModelDirError, TrainingError
from medseg_dl.experiment.experiment import open_model_dir
from medseg_dl.training import loop as training


def write_params(tmp_path, **sections):
    root = synthetic_dataset(tmp_path / "data") if not (tmp_path / "data").exists() else tmp_path / "data"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_params(root, tmp_path / "run", **sections)))
    return str(path)


def prepare(path, overrides=()):
    params, model_dir, _ = open_model_dir(path, overrides)
    convert_dataset(params)
    return params, model_dir


def read_scalars(model_dir):
    with open(model_dir.scalars_csv) as f:
        return list(csv.DictReader(f))


def checkpoint_counters(path):
    reader = tf.train.load_checkpoint(path)
    return int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")), \
        int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))


def test_loss_falls_checkpoints_rotate_done_marker(tmp_path):
    params, model_dir = prepare(write_params(tmp_path, training={"steps": 30, "log_every": 10}))
    assert training.run_training(params, model_dir) == 30
    rows = read_scalars(model_dir)
    assert [int(r["step"]) for r in rows] == [10, 20, 30]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    index_files = sorted(f for f in os.listdir(model_dir.checkpoints) if f.endswith(".index"))
    assert index_files == ["ckpt-25.index", "ckpt-30.index"]  # keep_last = 2
    assert json.load(open(model_dir.done_marker))["step"] == 30
    assert checkpoint_counters(os.path.join(model_dir.checkpoints, "ckpt-30")) == (30, 30)
    assert any(f.startswith("events.out") for f in os.listdir(model_dir.train_logs))


def test_a_region_run_logs_a_dice_per_region(tmp_path):
    regions = [{"name": "any", "labels": [1, 2], "paint": 1}, {"name": "cube", "labels": [2], "paint": 2}]
    params, model_dir = prepare(write_params(tmp_path, data={"regions": regions},
                                             training={"steps": 10, "image_summary_every": 5}))  # images painted
    assert training.run_training(params, model_dir) == 10
    rows = read_scalars(model_dir)
    assert [int(r["step"]) for r in rows] == [5, 10]
    assert [c for c in rows[0] if c.startswith("dice_")] == ["dice_mean_foreground", "dice_any", "dice_cube"]


def test_nonfinite_loss_stops_and_keeps_checkpoints(tmp_path, monkeypatch):
    params, model_dir = prepare(write_params(tmp_path))
    real_model_fn = training.model_fn

    def poisoned_model_fn(p):
        spec = real_model_fn(p)
        loss_fn = spec.loss_fn
        spec.loss_fn = lambda labels, logits: loss_fn(labels, logits) * tf.where(
            spec.optimizer.iterations >= 7, np.nan, 1.0)
        return spec

    monkeypatch.setattr(training, "model_fn", poisoned_model_fn)
    with pytest.raises(TrainingError, match="non-finite loss .* at step 8"):
        training.run_training(params, model_dir)
    record = json.load(open(model_dir.nonfinite_batch))
    assert record["step"] == 8 and record["subjects"]
    assert checkpoint_counters(os.path.join(model_dir.checkpoints, "ckpt-5")) == (5, 5)
    assert not os.path.exists(model_dir.done_marker)


def folder_state(root):
    """{relative path: bytes} of every file in a folder (event files excluded: TensorBoard appends)."""
    state = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.startswith("events.out"):
                path = os.path.join(folder, name)
                state[os.path.relpath(path, root)] = open(path, "rb").read()
    return state


@pytest.mark.parametrize("change, key", [
    ("model.base_filters=8", "model.base_filters"), ("data.split.val=0.5", "data.split.val"),
    ("preprocessing.normalization=none", "preprocessing.normalization"), ("seed=4", "seed"),
    ("training.optimizer=sgd", "training.optimizer"), ("data.channels=[a,b]", "data.channels")])
def test_a_refused_resume_names_the_key_and_changes_nothing_on_disk(tmp_path, change, key):
    params, model_dir = prepare(write_params(tmp_path, training={"steps": 5}))
    training.run_training(params, model_dir)
    before = folder_state(model_dir.root)
    with pytest.raises(ModelDirError, match=rf"{re.escape(key)} was .*nothing was changed on disk"):
        open_model_dir(model_dir.params_path, [change])
    assert folder_state(model_dir.root) == before


def test_an_extended_run_continues_its_learning_rate(tmp_path, monkeypatch):
    """Stopped at step 7 of 12, then resumed with 20 steps (a first resume killed before it saved
    anything): the logged rate goes on from the rate at step 7 (no jump) and decays to 0 at step 20."""
    params, model_dir = prepare(write_params(tmp_path, training={"steps": 12, "log_every": 1,
                                                                 "checkpoint_every": 100}))

    class StopAfterSixSteps(training.StopRequest):  # as if SIGTERM came during step 7
        reads = 0

        @property
        def signal_name(self):
            StopAfterSixSteps.reads += 1
            return "SIGTERM" if StopAfterSixSteps.reads > 6 else None

        @signal_name.setter
        def signal_name(self, value):
            pass
    monkeypatch.setattr(training, "StopRequest", StopAfterSixSteps)
    assert training.run_training(params, model_dir) == 7
    monkeypatch.undo()

    def killed(self, iterator):  # the first resume dies before its first checkpoint (run_params says 20)
        raise KeyboardInterrupt
    monkeypatch.setattr(training._Loop, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        training.run_training(*prepare(model_dir.params_path, ["training.steps=20"]))
    monkeypatch.undo()
    params, model_dir = prepare(model_dir.params_path)
    assert training.run_training(params, model_dir) == 20
    rows = read_scalars(model_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    rates = np.array([float(r["learning_rate"]) for r in rows])  # row i: the rate of step i (0-based)
    peak = params.training.learning_rate
    np.testing.assert_allclose(rates[:8], peak * (1 - np.arange(8) / 12) ** 0.9, rtol=1e-5)  # 7: continued
    np.testing.assert_allclose(rates[7:], rates[7] * (1 - np.arange(13) / 13) ** 0.9, rtol=1e-5, atol=1e-9)
    assert np.all(rates[:-1] > 0)


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
    path = write_params(tmp_path, training={"steps": 10000, "checkpoint_every": 5, "keep_last": 3})
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
    path = write_params(tmp_path, training={"steps": 30, "strategy": "mirrored", "log_every": 10})
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


def test_scalars_csv_drops_rows_after_checkpoint_and_cut_lines(tmp_path):
    from medseg_dl.training.reporting import ScalarCsv

    path = tmp_path / "scalars.csv"
    path.write_text("step,loss\n5,1.0\n10,0.9\n15,0.8\n2")  # killed while writing step 20
    ScalarCsv(str(path), restored_step=10).append({"step": 15, "loss": 0.5})
    assert path.read_text() == "step,loss\n5,1.0\n10,0.9\n15,0.5\n"


def damage_checkpoint(prefix, damage):
    if damage == "truncated data":
        data = prefix + ".data-00000-of-00001"
        os.truncate(data, os.path.getsize(data) // 2)
    else:
        os.remove(prefix + ".index")


@pytest.mark.parametrize("damage, steps", [("truncated data", 10), ("missing index", 10), ("truncated data", 12)])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_training_resumes_from_the_one_before(
        tmp_path, capsys, damage, steps):
    """Resumed with the same steps (the final checkpoint is damaged and must be written again) or more."""
    params, model_dir = prepare(write_params(tmp_path, training={"steps": 10, "keep_last": 3}))
    training.run_training(params, model_dir)
    newest = os.path.join(model_dir.checkpoints, "ckpt-10")
    damage_checkpoint(newest, damage)
    params, model_dir = prepare(model_dir.params_path, [f"training.steps={steps}"])
    assert training.run_training(params, model_dir) == steps
    out = capsys.readouterr().out
    assert f"warning: checkpoint {newest} cannot be read" in out and "at step 5" in out
    assert any(n.startswith("ckpt-10") for n in os.listdir(model_dir.unreadable_checkpoints))
    final = os.path.join(model_dir.checkpoints, f"ckpt-{steps}")
    assert checkpoint_counters(final) == (steps, steps)
    assert tf.train.latest_checkpoint(model_dir.checkpoints) == final
    assert json.load(open(model_dir.done_marker)) == {"step": steps, "checkpoint": f"ckpt-{steps}"}
    assert training.run_training(*prepare(model_dir.params_path)) == steps  # nothing left to do, no warning
    assert "cannot be read" not in capsys.readouterr().out


def test_a_final_checkpoint_that_cannot_be_read_back_leaves_no_done_marker(tmp_path, monkeypatch):
    params, model_dir = prepare(write_params(tmp_path, training={"steps": 6}))
    real_save = tf.train.CheckpointManager.save

    def save_then_damage(manager, checkpoint_number=None, **kwargs):
        prefix = real_save(manager, checkpoint_number=checkpoint_number, **kwargs)
        if checkpoint_number == 6:
            damage_checkpoint(prefix, "truncated data")
        return prefix
    monkeypatch.setattr(tf.train.CheckpointManager, "save", save_then_damage)
    with pytest.raises(TrainingError, match=r"ckpt-6: the checkpoint just saved cannot be read back"):
        training.run_training(params, model_dir)
    assert not os.path.exists(model_dir.done_marker)


def test_kill9_while_retraining_after_a_fallback_then_resume_saves_the_final_step(tmp_path):
    """The final checkpoint is damaged; the resume (same steps) falls back to the one before and is killed
    while it retrains; the next resume (same steps) still ends with a readable final checkpoint."""
    path = write_params(tmp_path, training={"steps": 20, "checkpoint_every": 10, "keep_last": 2})
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


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
    params, model_dir = prepare(write_params(tmp_path, training={"steps": 10}))
    training.run_training(params, model_dir)
    for name in os.listdir(model_dir.checkpoints):
        if ".data-" in name:
            os.truncate(os.path.join(model_dir.checkpoints, name), 10)
    with pytest.raises(TrainingError, match=r"none of the checkpoints \['ckpt-5', 'ckpt-10'\] can be read"):
        training.run_training(*prepare(model_dir.params_path, ["training.steps=12"]))


def test_a_second_trainer_on_the_folder_is_refused(tmp_path):
    from medseg_dl.runtime.locks import process_start_time

    params, model_dir = prepare(write_params(tmp_path))
    holder = os.getppid()  # a live process of this machine: as if it trained this folder
    with open(model_dir.train_lock, "w") as f:
        json.dump({"pid": holder, "host": socket.gethostname(), "start_time": process_start_time(holder),
                   "role": "trainer", "started": "2026-12-02T10:00:00Z", "command": "medseg train"}, f)
    with pytest.raises(ModelDirError, match=rf"another trainer runs on this model folder \(pid {holder}"):
        training.run_training(params, model_dir)
    assert not os.listdir(model_dir.checkpoints)


def test_two_runs_with_one_seed_give_equal_losses(tmp_path):
    """Weights, dropout and the input pipeline are seeded: two training processes, one seed, equal losses."""
    losses = []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        path = write_params(folder, training={"steps": 4, "log_every": 1}, sampling={"deterministic": True},
                            model={"dropout": 0.3})
        process = _start(path)
        assert process.wait(timeout=240) == 0, process.stdout.read()
        losses.append([float(r["loss"]) for r in read_scalars(open_model_dir(path)[1])])
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_an_xla_compiled_step_trains_and_the_resolved_precision_is_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bfloat16", lambda: False)
    params, model_dir = prepare(write_params(tmp_path, training={"steps": 3, "log_every": 1, "jit_compile": True}))
    assert params.training.precision == "auto"
    assert training.run_training(params, model_dir) == 3
    assert "precision: float32 (auto), XLA-compiled step" in capsys.readouterr().out
    losses = [float(r["loss"]) for r in read_scalars(model_dir)]
    assert len(losses) == 3 and all(np.isfinite(losses))
