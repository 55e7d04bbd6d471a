"""The training process: `medseg train --params P` / `python train.py --params P`.

Runs a `tf.function` step over the training pipeline under the strategy of `training.strategy`,
saves `tf.train.Checkpoint`s (model, optimizer, step, learning-rate segment) every
`training.checkpoint_every` steps and at the end, keeps the last `training.keep_last`, and writes
`checkpoints/done.json` when finished. Resuming (`--params <model_dir>/params.yaml`) restores the
newest readable checkpoint: the step, the optimizer state and the schedule continue exactly (a changed
step count continues the learning rate from its current value, experiment/resume.py); the input
pipeline is reseeded with `seed + step` (its buffers are not checkpointed). SIGINT/SIGTERM save a
checkpoint and exit 0 (on every worker, at the same step); a non-finite loss stops with
`TrainingError`, keeps the earlier checkpoints, and records the batch's subjects in
`<model_dir>/nonfinite_batch.json`; running out of memory and a full disk are told apart.
"""
import contextlib
import os
import shutil
import signal
import time
from typing import Optional

import numpy as np
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.data.convert import convert_dataset
from medseg_dl.errors import DataError, ModelDirError, OutOfMemoryError, TrainingError
from medseg_dl.experiment.checkpoints import (completed_checkpoints, remove_unlisted_checkpoints,
                                              set_aside_checkpoints)
from medseg_dl.experiment.experiment import save_params
from medseg_dl.experiment.filelists import split_case_paths
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.model.model_fn import model_fn
from medseg_dl.pipeline.inputs import train_inputs
from medseg_dl.runtime import atomic
from medseg_dl.runtime.cluster import is_chief
from medseg_dl.runtime.devices import configure_devices
from medseg_dl.runtime.locks import ProcessLock
from medseg_dl.training import reporting
from medseg_dl.training.distribute import make_strategy


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def make_train_step(strategy, spec, jit_compile=False):
    """A `tf.function` (batch, stop flag) running one step on every replica; returns (mean loss, logits of
    replica 0, stop): the stop flags of all workers summed, so that every worker stops at the same step.
    jit_compile (training.jit_compile): each replica's step is XLA-compiled (on the batch's numeric
    tensors: XLA takes no strings such as the subject names)."""
    replicas = strategy.num_replicas_in_sync

    def replica_step(batch, stop):
        with tf.GradientTape() as tape:
            outputs = spec.network(batch, training=True)
            loss = spec.loss_fn(batch["label"], outputs)
            scaled = spec.optimizer.scale_loss(loss / replicas)
        variables = spec.network.trainable_variables
        gradients = tape.gradient(scaled, variables)
        spec.optimizer.apply(gradients, variables)
        logits = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        spec.metrics["dice"].update_state(batch["label"], logits)
        return loss, logits, tf.identity(stop)

    if jit_compile:
        compiled = tf.function(replica_step, jit_compile=True)

        def replica_function(batch, stop):
            return compiled({key: value for key, value in batch.items() if value.dtype != tf.string}, stop)
    else:
        replica_function = replica_step

    @tf.function
    def step(batch, stop):
        losses, logits, stops = strategy.run(replica_function, args=(batch, stop))
        mean_loss = strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)
        any_stop = strategy.reduce(tf.distribute.ReduceOp.SUM, stops, axis=None)  # over all workers' replicas
        return mean_loss, strategy.experimental_local_results(logits)[0], any_stop

    return step


def run_training(params: Params, model_dir: ModelDir) -> int:
    """`medseg train`: convert the subjects not converted yet, then train to `training.steps`; returns
    the final step. Resumes from the newest readable checkpoint of the model folder. The chief holds
    the folder's train lock and removes what killed processes left behind; the other workers of a
    multi-worker run wait for its conversion."""
    configure_devices(params.training, "training")
    strategy = make_strategy(params.training.strategy)
    chief = is_chief(params.training.strategy)
    with ProcessLock(model_dir.train_lock, "trainer") if chief else contextlib.nullcontext():
        if chief:
            _remove_leftovers(model_dir)
            convert_dataset(params)  # skips the subjects already converted with the same settings
        files = _training_files(params, model_dir, wait=not chief)
        with atomic.disk_full_reported(model_dir.root, "the params or the done marker",
                                       f"resume with --params {model_dir.params_path}"):
            return _train(params, model_dir, strategy, chief, files)


def _train(params, model_dir, strategy, chief, files):
    with strategy.scope():
        spec = model_fn(params)
        spec.build(params.sampling.patch_size)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        checkpoint = tf.train.Checkpoint(model=spec.network, optimizer=spec.optimizer, step=step,
                                         schedule=spec.learning_rate.segment)
    restored = restore_newest(checkpoint, model_dir, move_unreadable=chief)
    start = int(step.numpy())
    print(f"precision: {spec.precision}" + (" (auto)" if params.training.precision == "auto" else "")
          + (", XLA-compiled step" if params.training.jit_compile else ""), flush=True)
    if restored:
        print(f"resumed from {restored} at step {start}", flush=True)
        _continue_schedule(spec, start, params)
    if chief:
        save_params(model_dir, params, model_dir.run_params)
    saved_dir = model_dir.checkpoints if chief else model_dir.worker_checkpoints(os.getpid())
    manager = tf.train.CheckpointManager(checkpoint, saved_dir, max_to_keep=params.training.keep_last)
    try:
        if start >= params.training.steps:
            if chief:
                _write_done(model_dir, start, restored)
            return start
        if chief and os.path.exists(model_dir.done_marker):
            os.remove(model_dir.done_marker)  # stale: training goes on (steps were extended)
        batches = train_inputs(params, files, seed=params.seed + start)
        loop = _Loop(params, model_dir, strategy, spec, step, manager, chief)
        return loop.run(iter(strategy.experimental_distribute_dataset(batches)))
    finally:
        if not chief:
            shutil.rmtree(saved_dir, ignore_errors=True)


def restore_newest(checkpoint: tf.train.Checkpoint, model_dir: ModelDir, move_unreadable: bool) -> Optional[str]:
    """Restore the newest readable checkpoint listed in the folder's checkpoint state; returns its prefix,
    or None when there is none (a first run). Newer unreadable ones (truncated, files missing) are reported
    and, with `move_unreadable`, moved to checkpoints/unreadable/ and dropped from the checkpoint state;
    `TrainingError` (nothing moved) if none can be read."""
    listed = completed_checkpoints(model_dir.checkpoints)
    unreadable = []
    for prefix in reversed(listed):
        try:
            checkpoint.restore(prefix).assert_existing_objects_matched()
        except (tf.errors.OpError, AssertionError, ValueError, IndexError, KeyError) as err:
            print(f"warning: checkpoint {prefix} cannot be read ({type(err).__name__}); trying the one before",
                  flush=True)
            unreadable.append(prefix)
            continue
        if move_unreadable and unreadable:
            if os.path.exists(model_dir.done_marker):
                os.remove(model_dir.done_marker)  # it may name a checkpoint set aside: training is not done
            set_aside_checkpoints(unreadable, model_dir.unreadable_checkpoints)
        return prefix
    if listed:
        raise TrainingError(f"{model_dir.checkpoints}: none of the checkpoints {[os.path.basename(p) for p in listed]} "
                            f"can be read (damaged, or written by an older medseg_dl); restore them from a backup, "
                            f"or start a new experiment.model_dir")
    return None


def verify_checkpoint(prefix: str) -> None:
    """Read every tensor of the checkpoint `prefix` back from disk; `TrainingError` naming it when one
    cannot be read (the save did not reach the disk intact)."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (tf.errors.OpError, ValueError, IndexError) as err:
        raise TrainingError(f"{prefix}: the checkpoint just saved cannot be read back ({type(err).__name__}); "
                            f"check the disk of the model folder, then resume") from None


def _continue_schedule(spec, start, params):
    """After a resume that changes training.steps, learning_rate or schedule (the restored segment was made
    for other values): a new segment from the current rate (or from a new learning_rate), decaying to 0 at
    the new last step."""
    schedule, training = spec.learning_rate, params.training
    if schedule.follows(training):
        return
    changed_rate = float(training.learning_rate) != schedule.segment.numpy()[3]
    rate = float(training.learning_rate) if changed_rate else float(schedule(start))
    schedule.restart(start, rate, training)
    print(f"resume: the learning rate continues from {rate:.3g} at step {start} and decays to 0 at step "
          f"{training.steps}", flush=True)


def _training_files(params, model_dir, wait):
    """The case folders of the training split; with `wait`, until the chief has converted them."""
    while True:
        try:
            return split_case_paths(params, model_dir, "train")
        except DataError:
            if not wait:
                raise
            time.sleep(2.0)


def _remove_leftovers(model_dir):
    """What killed processes left: temporaries, half-written checkpoints (files and TensorFlow's _temp
    folders), the checkpoint folders of non-chief workers."""
    atomic.remove_stale_temporaries(model_dir.root, recursive=True)
    remove_unlisted_checkpoints(model_dir.checkpoints)
    for path in model_dir.stale_worker_checkpoints():
        shutil.rmtree(path, ignore_errors=True)


def _write_done(model_dir, final_step, checkpoint_path):
    atomic.write_json(model_dir.done_marker,
                      {"step": final_step, "checkpoint": os.path.basename(checkpoint_path or "")})


class _Loop:
    """The step loop with its logging, checkpointing, fault and signal handling. Only the chief writes
    logs, scalars.csv and the done marker; every worker saves checkpoints (others into a private folder)."""

    def __init__(self, params, model_dir, strategy, spec, step, manager, chief):
        self.params, self.model_dir, self.spec, self.step, self.manager = params, model_dir, spec, step, manager
        self.chief = chief
        start = int(step.numpy())
        self.saved_step = start  # restored from a checkpoint of this step, or 0: nothing to save
        self.train_step = make_train_step(strategy, spec, params.training.jit_compile)
        self.writer = tf.summary.create_file_writer(model_dir.train_logs) if chief else tf.summary.create_noop_writer()
        self.csv = reporting.ScalarCsv(model_dir.scalars_csv, start) if chief else None
        self.progress = reporting.Progress(start, params.training.steps, params.training.log_every)
        self.patches_per_step = params.sampling.batch_size
        self.timing = {"data_s": 0.0, "step_s": 0.0, "steps": 0, "loss": 0.0}

    def run(self, iterator):
        training = self.params.training
        current = int(self.step.numpy())
        try:
            with StopRequest() as stop:
                while current < training.steps:
                    current, stopping = self._one_step(iterator, stop.signal_name is not None, current == 0)
                    if current % training.checkpoint_every == 0 or stopping:
                        self._save(current)
                    if stopping and current < training.steps:
                        print(f"{stop.signal_name or 'stop requested on another worker'}: saved checkpoint at step "
                              f"{current}; resume with --params {self.model_dir.params_path}", flush=True)
                        return current
            self._save(current)
        except (tf.errors.ResourceExhaustedError, OSError) as err:
            raise self._fault(err, current) from None
        finally:
            self.progress.close()
            self.writer.flush()
        if self.chief:
            verify_checkpoint(self.manager.latest_checkpoint)
            _write_done(self.model_dir, current, self.manager.latest_checkpoint)
        return current

    def _fault(self, err, current):
        """The one-line error of a failed step or write: a full disk (TensorFlow reports one with the class
        of running out of memory), out of memory, or another write failure."""
        resume = f"resume with --params {self.model_dir.params_path}"
        if atomic.is_disk_full(err):
            remove_unlisted_checkpoints(self.manager.directory)  # the cut save's files: give their space back
            return atomic.disk_full_error(self.model_dir.root, "checkpoints or logs", resume)
        if isinstance(err, tf.errors.ResourceExhaustedError):
            return OutOfMemoryError(f"out of memory (GPU or host) at step {current + 1}; lower sampling.batch_size "
                                    f"or sampling.patch_size ({resume}), or train a new model folder with "
                                    f"training.precision: mixed_bfloat16 or mixed_float16")
        return ModelDirError(f"{self.model_dir.root}: cannot write logs or checkpoints ({err.strerror or err}); make "
                             f"the folder writable, then {resume}")

    def _one_step(self, iterator, stop_requested, trace_graph):
        """One step; returns (the new step, whether any worker asked to stop)."""
        waited = time.perf_counter()
        batch = next(iterator)
        started = time.perf_counter()
        if trace_graph:
            tf.summary.trace_on(graph=True)
        loss, logits, stops = self.train_step(batch, tf.constant(float(stop_requested)))
        loss = float(loss.numpy())
        finished = time.perf_counter()
        if trace_graph:
            with self.writer.as_default(step=0):
                tf.summary.trace_export("train_step")
        if not np.isfinite(loss):
            self._stop_nonfinite(batch, loss)
        self.step.assign_add(1)
        current = int(self.step.numpy())
        self._account(current, loss, started - waited, finished - started, batch, logits)
        return current, float(stops.numpy()) > 0

    def _account(self, current, loss, data_s, step_s, batch, logits):
        timing = self.timing
        timing["data_s"] += data_s
        timing["step_s"] += step_s
        timing["steps"] += 1
        timing["loss"] += loss
        self.progress.update(current, loss)
        training = self.params.training
        if current % training.log_every == 0 or current == training.steps:
            self._log_scalars(current)
        if current % training.image_summary_every == 0:
            reporting.write_images(self.writer, current, _local(batch), logits.numpy(), self.spec.targets)

    def _log_scalars(self, current):
        timing, dice_metric = self.timing, self.spec.metrics["dice"]
        total_s = timing["data_s"] + timing["step_s"]
        dice = dice_metric.result().numpy()
        scalars = {"loss": timing["loss"] / timing["steps"],
                   "learning_rate": float(self.spec.learning_rate(current - 1)),
                   "patches_per_s": timing["steps"] * self.patches_per_step / max(total_s, 1e-9),
                   "step_time_s": total_s / timing["steps"],
                   "data_wait_fraction": timing["data_s"] / max(total_s, 1e-9),
                   "dice_mean_foreground": float(dice_metric.mean_foreground())}
        scalars.update({f"dice_{name}": float(d) for name, d in zip(dice_metric.output_names, dice)})
        reporting.write_scalars(self.writer, current, scalars)
        if self.csv is not None:
            self.csv.append({"step": current, **scalars})
        dice_metric.reset_state()
        self.timing = {"data_s": 0.0, "step_s": 0.0, "steps": 0, "loss": 0.0}

    def _save(self, current):
        """Save step `current`, unless this process has saved or restored that step already."""
        if current != self.saved_step:
            self.manager.save(checkpoint_number=current)
            self.saved_step = current

    def _stop_nonfinite(self, batch, loss):
        subjects = sorted({s.decode() for s in _local(batch)["subject"].tolist()})
        path = self.model_dir.nonfinite_batch
        if self.chief:
            atomic.write_json(path, {"step": int(self.step.numpy()) + 1, "loss": str(loss), "subjects": subjects})
        raise TrainingError(f"non-finite loss ({loss}) at step {int(self.step.numpy()) + 1}; the last good "
                            f"checkpoints are kept in {self.model_dir.checkpoints}, the batch's subjects are "
                            f"in {path}. Lower training.learning_rate or check those subjects, then resume")


def _local(batch):
    """The first replica's part of a (distributed) batch as numpy arrays."""
    return {k: (v.values[0] if hasattr(v, "values") else v).numpy() for k, v in batch.items()}
