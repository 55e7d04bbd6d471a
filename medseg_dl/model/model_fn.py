"""params -> network, loss, metrics, optimizer and learning-rate schedule (`model_fn`).

A training step with a `ModelSpec` (the same code with and without mixed precision):

    with tf.GradientTape() as tape:
        logits = spec.network(batch, training=True)
        loss = spec.loss_fn(labels, logits)                      # float32
        scaled = spec.optimizer.scale_loss(loss)                 # identity unless mixed precision
    grads = tape.gradient(scaled, spec.network.trainable_variables)
    spec.optimizer.apply(grads, spec.network.trainable_variables)  # unscales, clips, skips inf steps

Call `model_fn` (and `ModelSpec.build`) inside a distribution strategy's scope when using one.
"""
import dataclasses
import math
from typing import Callable

import keras
import tensorflow as tf

from medseg_dl.config import schema
from medseg_dl.data.targets import Targets
from medseg_dl.errors import ParamsError
from medseg_dl.model.architectures import build_network, create_variables
from medseg_dl.model.losses import make_loss
from medseg_dl.model.metrics import StreamingDice
from medseg_dl.runtime.devices import resolve_precision

POLY_EXPONENT = 0.9  # nnU-Net's polynomial decay


@dataclasses.dataclass
class ModelSpec:
    """What training and evaluation need from the model.

    network: keras.Model on {"image", "position"} -> float32 logits (N, X, Y, Z, K) (a list with deep
    supervision in training mode); targets: what the K outputs stand for (data/targets.py: classes or
    regions, the ignore label); loss_fn(labels (N, X, Y, Z) int, logits) -> float32 scalar on those
    targets; metrics: {"dice": StreamingDice of the targets};
    optimizer: a keras optimizer (a LossScaleOptimizer under mixed precision);
    learning_rate: the schedule the optimizer follows, step -> float32; precision: the keras dtype
    policy in force (training.precision with "auto" resolved for training.device).
    """

    network: keras.Model
    targets: Targets
    loss_fn: Callable
    metrics: dict
    optimizer: keras.optimizers.Optimizer
    learning_rate: keras.optimizers.schedules.LearningRateSchedule
    precision: str = "float32"

    def build(self, patch_size_vox):
        """Create the network's and the optimizer's variables by one forward pass of zeros.

        patch_size_vox: (X, Y, Z). Needed before restoring a checkpoint into fresh objects or
        before a step runs inside `strategy.run` (variables cannot be created per replica).
        """
        create_variables(self.network, patch_size_vox)
        self.optimizer.build(self.network.trainable_variables)


@keras.saving.register_keras_serializable(package="medseg_dl")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak` over `warmup_steps`, then constant, poly or cosine decay to 0 at
    `total_steps`; `restart` begins a new segment from a given rate.

    The segment is the variable `segment` (float64, saved in the checkpoints): start step s, start
    rate r, end step e, the learning_rate and the decay (index in DECAYS) it was made for; the first
    is (0, peak, total_steps, peak, decay). With w = warmup_steps in the first segment and 0 after,
    t = (step - s - w) / (e - s - w) clipped to [0, 1]: constant r; poly r (1 - t)^0.9; cosine
    r (1 + cos(pi t)) / 2; during warm-up r (step - s + 1) / w.
    """

    DECAYS = ("constant", "poly", "cosine")

    def __init__(self, peak, total_steps, warmup_steps=0, decay="poly"):
        schema.check_argument("decay", decay, "training.schedule")
        self.peak, self.total_steps, self.warmup_steps, self.decay = peak, total_steps, warmup_steps, decay
        self.segment = tf.Variable(self.segment_values(0, peak, total_steps, peak, decay), trainable=False,
                                   dtype=tf.float64, name="schedule_segment")

    @classmethod
    def segment_values(cls, start, rate, end, learning_rate, decay):
        return [float(start), float(rate), float(end), float(learning_rate), float(cls.DECAYS.index(decay))]

    def __call__(self, step):
        start, rate, end, _, decay = tf.unstack(tf.cast(self.segment, tf.float32))
        since = tf.cast(step, tf.float32) - start
        warmup = tf.where(start == 0.0, float(self.warmup_steps), 0.0)
        progress = tf.clip_by_value((since - warmup) / tf.maximum(end - start - warmup, 1.0), 0.0, 1.0)
        factors = tf.stack([tf.ones_like(progress), (1.0 - progress) ** POLY_EXPONENT,
                            0.5 * (1.0 + tf.cos(math.pi * progress))])
        factor = tf.gather(factors, tf.cast(decay, tf.int32))
        if self.warmup_steps > 0:
            factor = tf.where(since < warmup, (since + 1.0) / tf.maximum(warmup, 1.0), factor)
        return rate * factor

    def follows(self, training) -> bool:
        """Whether the current segment was made for the `training` params section (steps, rate, decay)."""
        _, _, end, learning_rate, decay = self.segment.numpy()
        return (end, learning_rate, decay) == (training.steps, float(training.learning_rate),
                                               self.DECAYS.index(training.schedule))

    def restart(self, step, rate, training):
        """From `step` on: `rate`, decaying by training.schedule to 0 at training.steps (no warm-up)."""
        self.segment.assign(self.segment_values(step, rate, training.steps, training.learning_rate,
                                                training.schedule))

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "decay": self.decay}


def make_schedule(training):
    """The learning-rate schedule of the params' `training` section."""
    return WarmupDecay(float(training.learning_rate), training.steps, training.warmup_steps, training.schedule)


def make_optimizer(training, schedule):
    """Adam, AdamW or SGD with Nesterov momentum, following `schedule`, with decoupled weight decay
    and global-norm gradient clipping (training.clip_norm; null: off); mixed precision wraps it in
    a LossScaleOptimizer (dynamic loss scale)."""
    common = dict(learning_rate=schedule, global_clipnorm=training.clip_norm)
    decay = float(training.weight_decay)
    if training.optimizer == "adam":
        if decay > 0:
            raise ParamsError(f"training.weight_decay = {decay} is applied by adamw and sgd only; set "
                              f"training.optimizer: adamw, or training.weight_decay: 0")
        optimizer = keras.optimizers.Adam(**common)
    elif training.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(weight_decay=decay, **common)
    else:
        optimizer = keras.optimizers.SGD(momentum=float(training.momentum), nesterov=True,
                                         weight_decay=decay or None, **common)
    if training.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def set_precision_policy(precision, device):
    """Set the global keras dtype policy of training.precision ("auto" resolved for a process configured
    for `device`, see `devices.resolve_precision`); layers read it when they are created. Returns the
    policy's name."""
    resolved = resolve_precision(precision, device)
    keras.mixed_precision.set_global_policy(resolved)
    return resolved


def model_fn(params):
    """A `ModelSpec` for the params (sections model, loss, training, data: the `Targets` of data.num_classes,
    regions and ignore_label fix the network's outputs, the loss and the metrics); creates no variables
    of the network (see ModelSpec.build). Sets the global dtype policy from training.precision ("auto"
    resolved for training.device), and seeds Python, numpy, TensorFlow and Keras with params.seed, so that
    the initial weights and the dropout masks of a run repeat (the input pipeline has its own stateless
    seeds)."""
    keras.utils.set_random_seed(params.seed)
    precision = set_precision_policy(params.training.precision, params.training.device)
    schedule = make_schedule(params.training)
    targets = Targets.from_params(params.data)
    return ModelSpec(network=build_network(params), targets=targets, loss_fn=make_loss(params),
                     metrics={"dice": StreamingDice(targets)}, optimizer=make_optimizer(params.training, schedule),
                     learning_rate=schedule, precision=precision)
