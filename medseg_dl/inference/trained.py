"""A trained network from a model folder: the network of its params with the weights of one checkpoint.

    trained = load_trained(model_dir, "best")          # or "latest", or a checkpoint path
    predictor = Predictor.from_params(trained.network, trained.params)

Only the network is built (no optimizer, loss or schedule); the optimizer slots of a training
checkpoint are ignored. The compute dtype follows `training.precision` as in training.
"""
import os
from dataclasses import dataclass

import keras
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.errors import CheckpointError, MedsegError
from medseg_dl.experiment.checkpoints import BestCheckpoints, checkpoint_step, completed_checkpoints
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.experiment.resume import NETWORK_KEYS, check_resume
from medseg_dl.model.architectures import build_network, create_variables
from medseg_dl.model.model_fn import set_precision_policy


@dataclass(frozen=True)
class TrainedModel:
    """params: the model folder's params; network: the keras.Model with the checkpoint's weights;
    checkpoint: the checkpoint prefix (…/ckpt-<step>); step: its training step."""

    params: Params
    network: keras.Model
    checkpoint: str
    step: int


def inference_network(params: Params) -> keras.Model:
    """The network of `params` with its variables created, ready to receive checkpoint weights."""
    set_precision_policy(params.training.precision)
    network = build_network(params)
    create_variables(network, params.sampling.patch_size)
    return network


def restore_weights(network: keras.Model, prefix: str) -> None:
    """Load the model weights of the training checkpoint `prefix` into `network` (optimizer slots are
    ignored); `CheckpointError` naming the checkpoint when its files cannot be read."""
    try:
        tf.train.Checkpoint(model=network).restore(prefix).expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError, IndexError, KeyError) as err:
        raise CheckpointError(f"{prefix}: cannot read this checkpoint ({type(err).__name__}); it was removed or is "
                              f"damaged: choose another with --checkpoint") from None


def resolve_checkpoint(model_dir: ModelDir, which: str) -> str:
    """The checkpoint prefix for `--checkpoint latest|best|PATH` (PATH: a prefix or its .index file)."""
    if which == "best":
        prefix = BestCheckpoints(model_dir.best, model_dir.best_index, 1, "").best_prefix()
    elif which == "latest":
        found = completed_checkpoints(model_dir.checkpoints)
        prefix = found[-1] if found else None
    else:
        prefix = which[: -len(".index")] if which.endswith(".index") else which
        prefix = prefix if os.path.isfile(prefix + ".index") else None
    if prefix is None:
        raise MedsegError(f"{model_dir.root}: no '{which}' checkpoint found; train first, or give the path of a "
                          f"checkpoint prefix (…/ckpt-<step>)")
    return prefix


def load_trained(model_dir: ModelDir, which: str = "best", params: Params = None) -> TrainedModel:
    """The trained network of a model folder at checkpoint `which` (latest, best or a path).
    params: the experiment's params when already loaded, else `<model_dir>/params.yaml`."""
    params = params if params is not None else Params.load(model_dir.params_path)
    check_resume(model_dir.run_params, params, model_dir.params_path, NETWORK_KEYS)
    prefix = resolve_checkpoint(model_dir, which)
    network = inference_network(params)
    restore_weights(network, prefix)
    return TrainedModel(params, network, prefix, checkpoint_step(prefix))
