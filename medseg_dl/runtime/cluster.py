"""The task of this process in a multi-worker run, from the `TF_CONFIG` environment variable.

Which process writes the model folder (params, file lists, checkpoints, logs, done marker) is decided
here, once: the chief. That is every process, except the non-chief workers of
`training.strategy: multi_worker`: the chief is the task of type "chief", or worker 0 when the cluster
has no chief (TensorFlow's rule).
"""
import json
import os

from medseg_dl.errors import ParamsError


def tf_config() -> dict:
    """The parsed TF_CONFIG ({"cluster": {...}, "task": {"type", "index"}}); `ParamsError` when it is
    missing or malformed."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ParamsError("training.strategy = multi_worker needs the TF_CONFIG environment variable "
                          "(cluster and task of this worker); see docs/gpus.md")
    try:
        config = json.loads(raw)
        config["cluster"], config["task"]["type"]
    except (ValueError, KeyError, TypeError):
        raise ParamsError("TF_CONFIG must be JSON with 'cluster' and 'task' keys; see docs/gpus.md") from None
    return config


def is_chief(strategy_name: str) -> bool:
    """True for the one process that writes the model folder (see the module docstring)."""
    if strategy_name != "multi_worker":
        return True
    config = tf_config()
    task = config["task"]
    if task["type"] == "chief":
        return True
    return task["type"] == "worker" and int(task.get("index", 0)) == 0 and "chief" not in config["cluster"]
