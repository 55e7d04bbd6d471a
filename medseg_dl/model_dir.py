"""The model folder of one experiment (DESIGN.md):

    <model_dir>/params.yaml            resolved parameters; passing this path resumes the run
    <model_dir>/filelists/{train,val,test}.json
    <model_dir>/checkpoints/           last N training checkpoints
    <model_dir>/best/                  best K checkpoints + best.json
    <model_dir>/logs/{train,eval}/     TensorBoard event files (+ scalars.csv)
    <model_dir>/eval/<step>/           per-subject metrics.csv, summary.json, predictions, overlays
"""
import os
import shutil
from dataclasses import dataclass

from medseg_dl.data.subjects import find_subjects, save_filelists, split_subjects
from medseg_dl.errors import ModelDirError, ParamsError
from medseg_dl.params import Params

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ModelDir:
    """Paths inside one model folder."""

    root: str

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    @property
    def params_path(self):
        return self.path("params.yaml")

    @property
    def filelists(self):
        return self.path("filelists")

    @property
    def checkpoints(self):
        return self.path("checkpoints")

    @property
    def best(self):
        return self.path("best")

    @property
    def done_marker(self):
        return self.path("checkpoints", "done.json")

    def logs(self, which):
        return self.path("logs", which)

    def eval_dir(self, step):
        return self.path("eval", str(step))


def open_model_dir(params_path, overrides=(), overwrite=False):
    """Load params and prepare their model folder; returns (params, ModelDir, resumed).

    Resume when `params_path` is the folder's own `params.yaml`, or when the folder already holds
    the same resolved parameters. A non-empty folder with other parameters is refused unless
    `overwrite`, which empties it first."""
    params = Params.load(params_path, overrides)
    model_dir = ModelDir(params.experiment.model_dir)
    own_params = os.path.abspath(params_path) == os.path.abspath(model_dir.params_path)
    resumed = own_params or _same_experiment(model_dir, params)
    if not resumed and _is_non_empty(model_dir.root):
        if not overwrite:
            raise ModelDirError(f"{model_dir.root}: model folder is not empty and holds another experiment; "
                                f"resume it with --params {model_dir.params_path}, choose another "
                                f"experiment.model_dir, or pass --overwrite to empty it")
        shutil.rmtree(model_dir.root)
    _make_folders(model_dir)
    params.save(model_dir.params_path)
    if not all(os.path.isfile(os.path.join(model_dir.filelists, f"{s}.json")) for s in SPLITS):
        write_filelists(params, model_dir)
    return params, model_dir, resumed


def write_filelists(params, model_dir):
    """Discover subjects, split them by `data.split` and the seed, and save the file lists."""
    subjects = find_subjects(params.data)
    split = split_subjects([s.id for s in subjects], params.data.split, params.seed)
    save_filelists(model_dir.filelists, split, {s.id: s for s in subjects})
    return split


def _same_experiment(model_dir, params):
    if not os.path.isfile(model_dir.params_path):
        return False
    try:
        return Params.load(model_dir.params_path).to_dict() == params.to_dict()
    except ParamsError:  # an unreadable old params.yaml is just "another experiment"
        return False


def _is_non_empty(folder):
    return os.path.isdir(folder) and bool(os.listdir(folder))


def _make_folders(model_dir):
    try:
        for folder in (model_dir.root, model_dir.filelists, model_dir.checkpoints, model_dir.best,
                       model_dir.logs("train"), model_dir.logs("eval"), model_dir.path("eval")):
            os.makedirs(folder, exist_ok=True)
        probe = model_dir.path(f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ModelDirError(f"{model_dir.root}: cannot write the model folder ({err.strerror}); choose a "
                            f"writable experiment.model_dir or free disk space") from None
