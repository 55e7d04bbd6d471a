"""The training process: `medseg train --params P` / `python train.py --params P`.

Runs a `tf.function` step over the training pipeline under the strategy of `training.strategy`,
saves `tf.train.Checkpoint`s (model, optimizer, step) every `training.checkpoint_every` steps and at
the end, keeps the last `training.keep_last`, and writes `checkpoints/done.json` when finished.
Resuming (`--params <model_dir>/params.yaml`) restores the latest checkpoint: the step, the
optimizer state and the schedule continue exactly; the input pipeline is reseeded with
`seed + step` (its buffers are not checkpointed). SIGINT/SIGTERM save a checkpoint and exit 0;
a non-finite loss stops with `TrainingError`, keeps the earlier checkpoints, and records the
batch's subjects in `<model_dir>/nonfinite_batch.json`.
"""
import json
import os
import signal
import time

import numpy as np
import tensorflow as tf

from medseg_dl import atomic
from medseg_dl.config.params import Params
from medseg_dl.data.convert import convert_dataset
from medseg_dl.errors import ModelDirError, TrainingError
from medseg_dl.experiment.model_dir import ModelDir, split_record_paths
from medseg_dl.model.model_fn import model_fn
from medseg_dl.pipeline.inputs import train_inputs
from medseg_dl.training import reporting
from medseg_dl.training.distribute import is_chief, make_strategy


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


def check_structure(model_dir: ModelDir, params: Params) -> None:
    """Refuse to resume into checkpoints of another network structure; record it the first time."""
    path = model_dir.structure_file
    structure = params.model_structure()
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != json.loads(json.dumps(structure)):
            raise TrainingError(f"{path}: the checkpoints were trained with model structure {saved}, but the "
                                f"params now give {structure}; keep the model section unchanged when resuming, "
                                f"or start a new experiment.model_dir")
        return
    atomic.write_json(path, structure)


def make_train_step(strategy, spec):
    """A `tf.function` running one step on every replica; returns (mean loss, logits of replica 0)."""
    replicas = strategy.num_replicas_in_sync

    def replica_step(batch):
        with tf.GradientTape() as tape:
            outputs = spec.network(batch, training=True)
            loss = spec.loss_fn(batch["label"], outputs)
            scaled = spec.optimizer.scale_loss(loss / replicas)
        variables = spec.network.trainable_variables
        gradients = tape.gradient(scaled, variables)
        spec.optimizer.apply(gradients, variables)
        logits = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        spec.metrics["dice"].update_state(batch["label"], logits)
        return loss, logits

    @tf.function
    def step(batch):
        losses, logits = strategy.run(replica_step, args=(batch,))
        mean_loss = strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)
        return mean_loss, strategy.experimental_local_results(logits)[0]

    return step


def run_training(params: Params, model_dir: ModelDir) -> int:
    """`medseg train`: convert the subjects not converted yet, then train to `training.steps`; returns
    the final step. Resumes from the latest checkpoint of the model folder."""
    convert_dataset(params)  # skips the subjects already converted with the same settings
    strategy = make_strategy(params.training.strategy)
    check_structure(model_dir, params)
    with strategy.scope():
        spec = model_fn(params)
        spec.build(params.sampling.patch_size)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        checkpoint = tf.train.Checkpoint(model=spec.network, optimizer=spec.optimizer, step=step)
    manager = tf.train.CheckpointManager(checkpoint, _checkpoint_dir(strategy, model_dir),
                                         max_to_keep=params.training.keep_last)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        print(f"resumed from {manager.latest_checkpoint} at step {int(step.numpy())}", flush=True)
    start = int(step.numpy())
    if start >= params.training.steps:
        _write_done(model_dir, start, manager.latest_checkpoint)
        return start
    batches = train_inputs(params, split_record_paths(params, model_dir, "train"), seed=params.seed + start)
    dataset = strategy.experimental_distribute_dataset(batches)
    loop = _Loop(params, model_dir, strategy, spec, step, manager, start)
    return loop.run(iter(dataset))


def _checkpoint_dir(strategy, model_dir):
    if is_chief(strategy):
        return model_dir.checkpoints
    return model_dir.worker_checkpoints(os.getpid())  # required by the strategy, then discarded


def _write_done(model_dir, final_step, checkpoint_path):
    atomic.write_json(model_dir.done_marker,
                      {"step": final_step, "checkpoint": os.path.basename(checkpoint_path or "")})


class _Loop:
    """The step loop with its logging, checkpointing, fault and signal handling."""

    def __init__(self, params, model_dir, strategy, spec, step, manager, start):
        self.params, self.model_dir, self.spec, self.step, self.manager = params, model_dir, spec, step, manager
        self.train_step = make_train_step(strategy, spec)
        self.writer = tf.summary.create_file_writer(model_dir.train_logs)
        self.csv = reporting.ScalarCsv(model_dir.scalars_csv, start)
        self.progress = reporting.Progress(start, params.training.steps, params.training.log_every)
        self.patches_per_step = params.sampling.batch_size
        self.timing = {"data_s": 0.0, "step_s": 0.0, "steps": 0, "loss": 0.0}

    def run(self, iterator):
        training = self.params.training
        current = int(self.step.numpy())
        try:
            with StopRequest() as stop:
                while current < training.steps and stop.signal_name is None:
                    current = self._one_step(iterator, trace_graph=current == 0)
                    if current % training.checkpoint_every == 0:
                        self._save(current)
                if stop.signal_name is not None:
                    self._save(current)
                    print(f"{stop.signal_name}: saved checkpoint at step {current}; resume with "
                          f"--params {self.model_dir.params_path}", flush=True)
                    return current
        except (OSError, tf.errors.ResourceExhaustedError) as err:
            raise ModelDirError(f"{self.model_dir.root}: cannot write logs or checkpoints ({err}); free disk "
                                f"space or make the folder writable, then resume") from None
        finally:
            self.progress.close()
            self.writer.flush()
        self._save(current)
        _write_done(self.model_dir, current, self.manager.latest_checkpoint)
        return current

    def _one_step(self, iterator, trace_graph):
        waited = time.perf_counter()
        batch = next(iterator)
        started = time.perf_counter()
        if trace_graph:
            tf.summary.trace_on(graph=True)
        loss, logits = self.train_step(batch)
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
        return current

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
            reporting.write_images(self.writer, current, _local(batch), logits.numpy())

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
        scalars.update({f"dice_{name}": float(d) for name, d in zip(dice_metric.class_names, dice)})
        reporting.write_scalars(self.writer, current, scalars)
        self.csv.append({"step": current, **scalars})
        dice_metric.reset_state()
        self.timing = {"data_s": 0.0, "step_s": 0.0, "steps": 0, "loss": 0.0}

    def _save(self, current):
        if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(f"-{current}"):
            return
        self.manager.save(checkpoint_number=current)

    def _stop_nonfinite(self, batch, loss):
        subjects = sorted({s.decode() for s in _local(batch)["subject"].tolist()})
        path = self.model_dir.nonfinite_batch
        atomic.write_json(path, {"step": int(self.step.numpy()) + 1, "loss": str(loss), "subjects": subjects})
        raise TrainingError(f"non-finite loss ({loss}) at step {int(self.step.numpy()) + 1}; the last good "
                            f"checkpoints are kept in {self.model_dir.checkpoints}, the batch's subjects are "
                            f"in {path}. Lower training.learning_rate or check those subjects, then resume")


def _local(batch):
    """The first replica's part of a (distributed) batch as numpy arrays."""
    return {k: (v.values[0] if hasattr(v, "values") else v).numpy() for k, v in batch.items()}
