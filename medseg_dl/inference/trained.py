"""A trained network from a model folder: the network of its params with the weights of one checkpoint;
an ensemble of several model folders, or of the fold folders of a cross-validation experiment root.

    trained = load_trained(model_dir, "auto")          # best where kept, else latest; or best, latest, a path
    predictor = Predictor.from_params(trained.network, trained.params)

    folders, decider = resolve_members([root], folds="all")  # ModelDirs <root>/fold_<k>/ (or [d1, d2, ...])
    ensemble = load_ensemble(folders, "auto")                 # each member's best, else latest
    predictor = Predictor.from_params(ensemble.networks, ensemble.params)

Only the network is built (no optimizer, loss or schedule); the optimizer slots of a training
checkpoint are ignored. The compute dtype follows `training.precision` as in
training ("auto" resolved for evaluation.device).
"""
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import keras
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.data.cases import stored_recipe
from medseg_dl.errors import CheckpointError, MedsegError, ParamsError
from medseg_dl.experiment.checkpoints import BestCheckpoints, checkpoint_step, completed_checkpoints
from medseg_dl.experiment.experiment import Experiment
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
    set_precision_policy(params.training.precision, params.evaluation.device)
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


CHECKPOINT_CHOICES = ("auto", "best", "latest")  # or a checkpoint path


def resolve_checkpoint(model_dir: ModelDir, which: str) -> str:
    """The checkpoint prefix for `--checkpoint auto|best|latest|PATH`: auto is the best checkpoint the
    evaluator kept (best/), else the latest of training (printed: which one, and why); PATH: a prefix
    or its .index file."""
    if which == "auto":
        which = "best" if os.path.isfile(model_dir.best_index) else "latest"
        print(f"{model_dir.root}: checkpoint {which}" + ("" if which == "best" else " (no evaluator kept a best one)"),
              flush=True)
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


def load_trained(model_dir: ModelDir, which: str = "auto", params: Params = None) -> TrainedModel:
    """The trained network of a model folder at checkpoint `which` (auto, best, latest or a path:
    `resolve_checkpoint`).
    params: the experiment's params when already loaded, else `<model_dir>/params.yaml`."""
    params = params if params is not None else Params.load(model_dir.params_path)
    check_resume(model_dir.load_run_params(), params, model_dir.params_path, NETWORK_KEYS)
    prefix = resolve_checkpoint(model_dir, which)
    network = inference_network(params)
    restore_weights(network, prefix)
    return TrainedModel(params, network, prefix, checkpoint_step(prefix))


@dataclass(frozen=True)
class TrainedEnsemble:
    """members: the trained networks of one or more model folders, all with the same window, classes,
    channels and preprocessing (see `load_ensemble`)."""

    members: Tuple[TrainedModel, ...]

    @property
    def params(self) -> Params:
        """The first member's params (window, classes, preprocessing and evaluation settings)."""
        return self.members[0].params

    @property
    def networks(self) -> Tuple[keras.Model, ...]:
        return tuple(m.network for m in self.members)


def resolve_members(model_dirs: Sequence[str], folds: Union[None, str, Sequence[int]] = None
                    ) -> Tuple[List[ModelDir], Optional[Experiment]]:
    """(member folders, the experiment whose post-processing decision applies or None) of `--model-dir D
    [D ...] [--folds all|K ...]`: with folds, the fold folders of the one experiment root D (`Experiment.folds`)
    and D itself; without, the folders D and, for a single one, D itself (several folders have no common
    decision). Folder names are made absolute."""
    roots = [os.path.abspath(d) for d in model_dirs]
    if not roots:
        raise ParamsError("give at least one model folder (--model-dir)")
    if folds is not None:
        if len(roots) != 1:
            raise ParamsError(f"--folds takes the folds of one experiment root, but {len(roots)} folders were "
                              f"given as --model-dir; give the root alone")
        return Experiment(roots[0]).folds(folds), Experiment(roots[0])
    for root in roots:
        if not os.path.isfile(ModelDir(root).params_path) and Experiment(root).holds_fold_folders():
            raise ParamsError(f"{root}: an experiment root of fold folders, not a model folder; add --folds all "
                              f"(or --folds 0 2 ...)")
    return [ModelDir(root) for root in roots], (Experiment(roots[0]) if len(roots) == 1 else None)


def load_ensemble(folders: Sequence[ModelDir], which: Union[str, Sequence[str]] = "auto",
                  params: Optional[Sequence[Params]] = None) -> TrainedEnsemble:
    """The trained networks of the model folders `folders` (see `resolve_members`), each at its own
    checkpoint `which`: auto, best or latest (each folder's), or one value (those, or a path) per folder. params: the
    folders' params when already loaded (one per folder, e.g. with overrides), else their params.yaml.
    `ParamsError` naming two folders when they differ in the window, classes, channels or preprocessing."""
    params = [Params.load(f.params_path) for f in folders] if params is None else list(params)
    checkpoints = _member_checkpoints(which, len(folders))
    if len(params) != len(folders):
        raise ValueError(f"{len(params)} params for {len(folders)} model folders")
    signatures = [_ensemble_signature(p) for p in params]
    for folder, signature in zip(folders[1:], signatures[1:]):
        for key, value in signature.items():
            if value != signatures[0][key]:
                raise ParamsError(f"the ensemble's model folders differ in {key}: {folders[0].root} has "
                                  f"{signatures[0][key]!r}, {folder.root} has {value!r}; every member needs the same "
                                  f"patch size, classes, channels and preprocessing")
    return TrainedEnsemble(tuple(load_trained(f, c, p) for f, c, p in zip(folders, checkpoints, params)))


def _member_checkpoints(which, count):
    """One `--checkpoint` value per member: auto, best or latest for all, or one value (those, or a path) per
    folder."""
    values = [which] if isinstance(which, str) else list(which)
    if len(values) == 1 and (count == 1 or values[0] in CHECKPOINT_CHOICES):
        return values * count
    if len(values) != count:
        raise ParamsError(f"--checkpoint {' '.join(values)}: give auto, best or latest (each folder's own), or one "
                          f"value (auto, best, latest or a checkpoint path) per model folder ({count} folders)")
    return values


def _ensemble_signature(params):
    """What the members of an ensemble must share: the window, classes, channels and preprocessing (with the
    stored CT statistics), as {key: value}."""
    signature = {"sampling.patch_size": list(params.sampling.patch_size),
                 "data.num_classes": params.data.num_classes, "data.regions": params.data.regions,
                 "data.channels": list(params.data.channels)}
    signature.update({f"preprocessing.{k}": v for k, v in params.preprocessing.to_dict().items()})
    signature["ct statistics (dataset.json)"] = stored_recipe(params).ct_stats
    return signature
