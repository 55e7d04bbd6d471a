"""The `tf.distribute` strategy named by `training.strategy`.

- `auto`: MirroredStrategy over all local GPUs when there are several, else the default strategy.
- `default`: one device (the default strategy).
- `mirrored`: MirroredStrategy over all local GPUs (or all logical CPUs when there is no GPU).
- `multi_worker`: MultiWorkerMirroredStrategy configured by the `TF_CONFIG` environment variable.
"""
import tensorflow as tf

from medseg_dl.config import schema
from medseg_dl.runtime import cluster


def make_strategy(name: str) -> tf.distribute.Strategy:
    """A `tf.distribute.Strategy` for `training.strategy` = name (one of the schema's choices)."""
    schema.check_argument("name", name, "training.strategy")
    if name == "multi_worker":
        cluster.tf_config()  # a clear error when it is missing or malformed
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "default":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)  # mirrored
