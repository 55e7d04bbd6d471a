"""The experiment on disk: `Experiment`, the one place that names the folders and files of an experiment root,
and opening or preparing a model folder of it (`open_model_dir`, `load_experiment`).

Without cross-validation the experiment root is the one model folder (experiment.model_dir; its files:
experiment/model_dir.py). With k-fold cross-validation (`data.split.folds` = k > 0) experiment.model_dir is
the root, and fold j trains in a complete model folder of its own (`open_model_dir(..., fold=j)`, the CLI's
`--fold j`):

    <root>/fold_<j>/                       the model folder of fold j (its params say data.split.fold = j)
    <root>/converted/                      the converted subjects, shared by the folds (the default of
                                           data.converted_dir, resolved with the params: config/params.py)
    <root>/cv/raw/, cv/postprocessed/      cross-validation reports of the folds' validation cases (evaluate --cv)
    <root>/cv/test-ensemble/raw/, .../postprocessed/   the test cases scored by the ensemble of all folds
    <root>/postprocessing.json             the post-processing chosen on the cross-validation predictions
                                           (the decision of the root, applied by predict and export)

Each fold's splits are its file lists, `<root>/fold_<j>/filelists/` (experiment/filelists.py).

The folder can be moved or copied: its params.yaml and checkpoints/run_params.yaml hold the paths that lie
inside the experiment (the folder itself: `experiment.model_dir: .`, its records, the records of the folds'
root) relative to the folder (`save_params`), and are loaded from where the folder lies now
(config/params.py). A moved data folder with the same subjects is followed (filelists.py `follow_moved_data`).
"""
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from medseg_dl.config.params import Params
from medseg_dl.errors import ModelDirError, ParamsError
from medseg_dl.experiment.filelists import filelists_written, follow_moved_data, write_filelists
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.experiment.resume import NETWORK_KEYS, check_resume
from medseg_dl.runtime import atomic
from medseg_dl.runtime.cluster import is_chief

FOLD_PREFIX = "fold_"
FOLD_FOLDER = re.compile(rf"^{FOLD_PREFIX}(\d+)$")  # <root>/fold_<k>/: one complete model folder per fold
PARAMS_HEADER = ("# Saved by medseg_dl. experiment.model_dir '.' is the folder of this file; the relative paths are\n"
                 "# relative to it, so the folder can be moved or copied. Resume with --params <this file>.\n")


def fold_name(k: int) -> str:
    """The name of fold k's model folder, fold_<k> (also its key in the cross-validation summaries)."""
    return f"{FOLD_PREFIX}{k}"


@dataclass(frozen=True)
class Reports:
    """The two report folders (str, absolute) of one cross-validation evaluation: raw (the predictions as the
    models made them, with predictions/) and postprocessed (those predictions after the decision)."""

    raw: str
    postprocessed: str


@dataclass(frozen=True)
class Experiment:
    """Paths inside one experiment root (`root`, absolute): its folds, cross-validation reports and
    post-processing decision."""

    root: str

    @classmethod
    def of(cls, params: Params) -> "Experiment":
        """The experiment of `params`: experiment.model_dir, or its parent for the params of one fold."""
        folder = params.experiment.model_dir
        return cls(os.path.dirname(folder) if _is_fold_folder(params) else folder)

    def fold(self, k: int) -> ModelDir:
        """The model folder of fold k: <root>/fold_<k>/."""
        return ModelDir(os.path.join(self.root, fold_name(k)))

    def folds(self, which: Union[str, Sequence[int]] = "all") -> List[ModelDir]:
        """The fold folders found on disk that hold a params.yaml, ordered by fold number for "all", else
        those of the fold numbers `which` in their order. `ParamsError` (one line) when there is none or one
        of `which` is missing."""
        found = self._found_folds()
        if not found:
            raise ParamsError(f"{self.root}: no fold folders ({FOLD_PREFIX}<k>/{ModelDir.PARAMS_NAME}) in this "
                              f"experiment root; give the root that holds them, or model folders without --folds")
        chosen = sorted(found) if which == "all" else [int(k) for k in which]
        missing = [k for k in chosen if k not in found]
        if missing or not chosen:
            raise ParamsError(f"{self.root}: fold(s) {missing} not found; its folds are {sorted(found)} (--folds "
                              f"all, or some of these numbers)")
        return [found[k] for k in chosen]

    def _found_folds(self) -> Dict[int, ModelDir]:
        """{k: ModelDir} of the folders fold_<k>/ that hold a params.yaml."""
        names = os.listdir(self.root) if os.path.isdir(self.root) else []
        matches = (FOLD_FOLDER.match(name) for name in names)
        folders = {int(m.group(1)): self.fold(int(m.group(1))) for m in matches if m}
        return {k: folder for k, folder in folders.items() if os.path.isfile(folder.params_path)}

    def holds_fold_folders(self) -> bool:
        """Whether the root holds any entry named fold_* (an experiment root rather than a model folder)."""
        return os.path.isdir(self.root) and any(name.startswith(FOLD_PREFIX) for name in os.listdir(self.root))

    @property
    def cv(self) -> str:
        """The cross-validation results (all folds' validation predictions and metrics): <root>/cv/."""
        return os.path.join(self.root, "cv")

    @property
    def cv_reports(self) -> Reports:
        """<root>/cv/raw/ and <root>/cv/postprocessed/: the folds' validation cases (evaluate --cv)."""
        return _reports(self.cv)

    @property
    def test_ensemble_reports(self) -> Reports:
        """<root>/cv/test-ensemble/raw/ and .../postprocessed/: the test cases scored by the folds' ensemble."""
        return _reports(os.path.join(self.cv, "test-ensemble"))

    @property
    def decision_path(self) -> str:
        """The post-processing decision, chosen on the cross-validation predictions: <root>/postprocessing.json."""
        return os.path.join(self.root, "postprocessing.json")


def _reports(folder: str) -> Reports:
    return Reports(os.path.join(folder, "raw"), os.path.join(folder, "postprocessed"))


def open_model_dir(params_path: str, overrides=(), overwrite: bool = False,
                   fold: Optional[int] = None, trainer: bool = True) -> Tuple[Params, ModelDir, bool]:
    """Load params (once) and prepare their model folder; returns (params, ModelDir, resumed).

    Resume when `params_path` is the folder's own `params.yaml`, or when the folder already holds
    the same resolved parameters. A non-empty folder with other parameters is refused unless
    `overwrite`, which empties it first. A non-chief worker of a multi-worker run (cluster.py) waits
    until the chief has prepared the folder and changes nothing. With cross-validation
    (`data.split.folds` > 0) the params become those of fold `fold` (`fold_params`) first; a fold's own
    params.yaml needs no `fold`. `ParamsError` when no fold is given or set, or another one is.
    `trainer`: False for a process that is never one of several workers (convert), which then needs no
    cluster (TF_CONFIG) even for training.strategy: multi_worker."""
    params = select_fold(Params.load(params_path, overrides), fold, params_path)
    if trainer and not is_chief(params.training.strategy):
        return params, _wait_for_folder(ModelDir(params.experiment.model_dir)), True
    model_dir, resumed = _prepare(params, params_path, overwrite)
    return params, model_dir, resumed


def select_fold(params: Params, fold: Optional[int], params_path: str = "params") -> Params:
    """The params of one model folder: unchanged without cross-validation and for a fold's own params.yaml
    (already fold `fold`); `fold_params` of the experiment root's params for `fold` (or their
    data.split.fold). Raises `ParamsError` (one line) for a missing, out-of-range or contradicting fold."""
    folds, current = params.data.split.folds, params.data.split.fold
    if fold is not None:
        if not folds:
            raise ParamsError(f"{params_path}: --fold {fold} needs cross-validation; set data.split.folds (e.g. 5)")
        if not 0 <= fold < folds:
            raise ParamsError(f"--fold {fold}: expected 0..{folds - 1} for data.split.folds = {folds}")
        if current is not None and current != fold:
            raise ParamsError(f"{params_path}: these are the params of fold {current}, not {fold}; pass --fold "
                              f"{current}, or the experiment's own params file with --fold {fold}")
    elif current is None:
        if folds:
            raise ParamsError(f"data.split.folds = {folds}: train one fold at a time with --fold k (0..{folds - 1})")
        return params
    else:
        fold = current
    return params if _is_fold_folder(params) else fold_params(params, fold)


def _is_fold_folder(params: Params) -> bool:
    """Whether `params` are those of a fold's model folder (<root>/fold_<k>/, k = data.split.fold)."""
    fold = params.data.split.fold
    return fold is not None and os.path.basename(params.experiment.model_dir) == fold_name(fold)


def fold_params(params: Params, fold: int) -> Params:
    """The params of fold `fold` from the experiment root's: experiment.model_dir -> <root>/fold_<fold>,
    data.split.fold -> fold; data.converted_dir stays (resolved: <root>/converted unless given), so the
    folds share the converted records."""
    values = params.to_dict()
    values["experiment"]["model_dir"] = Experiment(params.experiment.model_dir).fold(fold).root
    values["data"]["split"]["fold"] = fold
    return Params.from_dict(values, source=f"fold {fold} of {params.experiment.model_dir}")


def fold_model_dirs(params: Params) -> List[ModelDir]:
    """The model folders of all folds (evaluate --cv), from the root's params or one fold's;
    `ParamsError` without cross-validation."""
    folds = params.data.split.folds
    if not folds:
        raise ParamsError("data.split.folds = 0: no cross-validation folds; set data.split.folds (e.g. 5) and "
                          "train each fold with --fold k")
    return [Experiment.of(params).fold(k) for k in range(folds)]


def _wait_for_folder(model_dir: ModelDir, timeout_s: float = 600.0) -> ModelDir:
    started = time.time()
    while not filelists_written(model_dir):
        if time.time() - started > timeout_s:
            raise ModelDirError(f"{model_dir.root}: the chief worker has not prepared the model folder after "
                                f"{timeout_s:.0f} s; start it (TF_CONFIG task index 0) with the same params")
        time.sleep(1.0)
    return model_dir


def load_experiment(params_path: str, overrides=(), fold: Optional[int] = None) -> Tuple[Params, ModelDir]:
    """Params (loaded once) and their model folder, for a process beside training (the evaluator):
    the folder is prepared only when training has not created it yet, and never rewritten. `fold`:
    as for `open_model_dir`."""
    params = select_fold(Params.load(params_path, overrides), fold, params_path)
    model_dir = ModelDir(params.experiment.model_dir)
    if not os.path.isfile(model_dir.params_path):
        model_dir, _ = _prepare(params, params_path, overwrite=False)
    check_resume(model_dir.load_run_params(), params, params_path, NETWORK_KEYS)
    follow_moved_data(params, model_dir)
    return params, model_dir


def _prepare(params: Params, params_path: str, overwrite: bool) -> Tuple[ModelDir, bool]:
    model_dir = ModelDir(params.experiment.model_dir)
    own_params = os.path.abspath(params_path) == os.path.abspath(model_dir.params_path)
    resumed = own_params or _same_experiment(model_dir, params)
    if resumed:
        for change in check_resume(model_dir.load_run_params(), params, params_path):
            print(f"resume: {change.describe()}", flush=True)
        follow_moved_data(params, model_dir)
    elif _is_non_empty(model_dir.root):
        if not overwrite:
            raise ModelDirError(f"{model_dir.root}: model folder is not empty and holds another experiment; "
                                f"resume it with --params {model_dir.params_path}, choose another "
                                f"experiment.model_dir, or pass --overwrite to empty it")
        shutil.rmtree(model_dir.root)
    with atomic.disk_full_reported(model_dir.root, "the params and file lists", "run the command again"):
        _make_folders(model_dir)
        save_params(model_dir, params)
        if not filelists_written(model_dir):
            write_filelists(params, model_dir)
    return model_dir, resumed


def save_params(model_dir: ModelDir, params: Params, path: Optional[str] = None) -> None:
    """Write `params` to the folder's params.yaml (or `path`, e.g. `ModelDir.run_params`), the paths inside the
    experiment (`Experiment.of`) relative to the folder, with a header saying so."""
    params.save(path or model_dir.params_path, relative_to=model_dir.root, within=Experiment.of(params).root,
                header=PARAMS_HEADER)


def _same_experiment(model_dir: ModelDir, params: Params) -> bool:
    if not os.path.isfile(model_dir.params_path):
        return False
    try:
        return Params.load(model_dir.params_path).to_dict() == params.to_dict()
    except ParamsError:  # an unreadable old params.yaml is just "another experiment"
        return False


def _is_non_empty(folder: str) -> bool:
    return os.path.isdir(folder) and bool(os.listdir(folder))


def _make_folders(model_dir: ModelDir) -> None:
    try:
        for folder in (model_dir.root, model_dir.filelists, model_dir.checkpoints, model_dir.best,
                       model_dir.train_logs, model_dir.eval_logs, model_dir.eval_root):
            os.makedirs(folder, exist_ok=True)
        atomic.write_text(model_dir.write_probe, "ok")
        os.remove(model_dir.write_probe)
    except OSError as err:
        if atomic.is_disk_full(err):
            raise
        raise ModelDirError(f"{model_dir.root}: cannot write the model folder ({err.strerror}); choose a "
                            f"writable experiment.model_dir") from None
