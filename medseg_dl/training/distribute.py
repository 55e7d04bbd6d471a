"""The `tf.distribute` strategy named by `training.strategy`.

- `auto`: MirroredStrategy over all local GPUs when there are several, else the default strategy.
- `default`: one device (the default strategy).
- `mirrored`: MirroredStrategy over all local GPUs (or all logical CPUs when there is no GPU).
- `multi_worker`: MultiWorkerMirroredStrategy configured by the `TF_CONFIG` environment variable.
"""
import json
import os

import tensorflow as tf

from medseg_dl.config import schema
from medseg_dl.errors import ParamsError


def make_strategy(name: str) -> tf.distribute.Strategy:
    """A `tf.distribute.Strategy` for `training.strategy` = name (one of the schema's choices)."""
    schema.check("training.strategy", name)
    if name == "multi_worker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "default":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)  # mirrored


def _check_tf_config():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ParamsError("training.strategy = multi_worker needs the TF_CONFIG environment variable "
                          "(cluster and task of this worker); see README, 'Several GPUs and machines'")
    try:
        config = json.loads(raw)
        config["cluster"], config["task"]
    except (ValueError, KeyError, TypeError):
        raise ParamsError("TF_CONFIG must be JSON with 'cluster' and 'task' keys; see README") from None


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes checkpoints and logs (always true outside multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in (None, "chief") or (resolver.task_type == "worker" and resolver.task_id == 0
                                                      and "chief" not in resolver.cluster_spec().as_dict())
