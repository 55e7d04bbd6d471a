"""The training process: loss falls, checkpoints rotate, resume is exact, faults are handled."""
import json
import os
import re
import socket

import numpy as np
import pytest
import tensorflow as tf

from helpers import checkpoint_counters, damage_checkpoint, read_scalars, tiny_params_file
from medseg_dl.data.convert import convert_dataset
from medseg_dl.errors import ModelDirError, TrainingError
from medseg_dl.experiment.experiment import open_model_dir
from medseg_dl.runtime import devices
from medseg_dl.training import loop as training


def prepare(path, overrides=()):
    params, model_dir, _ = open_model_dir(path, overrides)
    convert_dataset(params)
    return params, model_dir


def test_loss_falls_checkpoints_rotate_done_marker(tmp_path):
    params, model_dir = prepare(tiny_params_file(tmp_path, training={"steps": 30, "log_every": 10}))
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
    params, model_dir = prepare(tiny_params_file(tmp_path, data={"regions": regions},
                                             training={"steps": 10, "image_summary_every": 5}))  # images painted
    assert training.run_training(params, model_dir) == 10
    rows = read_scalars(model_dir)
    assert [int(r["step"]) for r in rows] == [5, 10]
    assert [c for c in rows[0] if c.startswith("dice_")] == ["dice_mean_foreground", "dice_any", "dice_cube"]


def test_nonfinite_loss_stops_and_keeps_checkpoints(tmp_path, monkeypatch):
    params, model_dir = prepare(tiny_params_file(tmp_path))
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
    params, model_dir = prepare(tiny_params_file(tmp_path, training={"steps": 5}))
    training.run_training(params, model_dir)
    before = folder_state(model_dir.root)
    with pytest.raises(ModelDirError, match=rf"{re.escape(key)} was .*nothing was changed on disk"):
        open_model_dir(model_dir.params_path, [change])
    assert folder_state(model_dir.root) == before


def test_an_extended_run_continues_its_learning_rate(tmp_path, monkeypatch):
    """Stopped at step 7 of 12, then resumed with 20 steps (a first resume killed before it saved
    anything): the logged rate goes on from the rate at step 7 (no jump) and decays to 0 at step 20."""
    params, model_dir = prepare(tiny_params_file(tmp_path, training={"steps": 12, "log_every": 1,
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


def test_scalars_csv_drops_rows_after_checkpoint_and_cut_lines(tmp_path):
    from medseg_dl.training.reporting import ScalarCsv

    path = tmp_path / "scalars.csv"
    path.write_text("step,loss\n5,1.0\n10,0.9\n15,0.8\n2")  # killed while writing step 20
    ScalarCsv(str(path), restored_step=10).append({"step": 15, "loss": 0.5})
    assert path.read_text() == "step,loss\n5,1.0\n10,0.9\n15,0.5\n"


@pytest.mark.parametrize("damage, steps", [("truncated data", 10), ("missing index", 10), ("truncated data", 12)])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_training_resumes_from_the_one_before(
        tmp_path, capsys, damage, steps):
    """Resumed with the same steps (the final checkpoint is damaged and must be written again) or more."""
    params, model_dir = prepare(tiny_params_file(tmp_path, training={"steps": 10, "keep_last": 3}))
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
    params, model_dir = prepare(tiny_params_file(tmp_path, training={"steps": 6}))
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


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
    params, model_dir = prepare(tiny_params_file(tmp_path, training={"steps": 10}))
    training.run_training(params, model_dir)
    for name in os.listdir(model_dir.checkpoints):
        if ".data-" in name:
            os.truncate(os.path.join(model_dir.checkpoints, name), 10)
    with pytest.raises(TrainingError, match=r"none of the checkpoints \['ckpt-5', 'ckpt-10'\] can be read"):
        training.run_training(*prepare(model_dir.params_path, ["training.steps=12"]))


def test_a_second_trainer_on_the_folder_is_refused(tmp_path):
    from medseg_dl.runtime.locks import process_start_time

    params, model_dir = prepare(tiny_params_file(tmp_path))
    holder = os.getppid()  # a live process of this machine: as if it trained this folder
    with open(model_dir.train_lock, "w") as f:
        json.dump({"pid": holder, "host": socket.gethostname(), "start_time": process_start_time(holder),
                   "role": "trainer", "started": "2026-12-02T10:00:00Z", "command": "medseg train"}, f)
    with pytest.raises(ModelDirError, match=rf"another trainer runs on this model folder \(pid {holder}"):
        training.run_training(params, model_dir)
    assert not os.listdir(model_dir.checkpoints)


def test_an_xla_compiled_step_trains_and_the_resolved_precision_is_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bfloat16", lambda: False)
    params, model_dir = prepare(tiny_params_file(tmp_path, training={"steps": 3, "log_every": 1, "jit_compile": True}))
    assert params.training.precision == "auto"
    assert training.run_training(params, model_dir) == 3
    assert "precision: float32 (auto), XLA-compiled step" in capsys.readouterr().out
    losses = [float(r["loss"]) for r in read_scalars(model_dir)]
    assert len(losses) == 3 and all(np.isfinite(losses))
