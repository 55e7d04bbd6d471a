"""The model folder of one experiment. `ModelDir` is the one place that names its files:

    <model_dir>/params.yaml                resolved parameters; passing this path resumes the run
    <model_dir>/filelists/{train,val,test}.json
    <model_dir>/checkpoints/               last N training checkpoints, done.json, run_params.yaml
    <model_dir>/best/                      best K checkpoints + best.json
    <model_dir>/logs/{train,eval}/         TensorBoard event files; logs/train/scalars.csv
    <model_dir>/eval/<step>/               metrics.csv, summary.json, overlays/, predictions/
    <model_dir>/eval/<step>-<folder>/      the same for another labelled folder (evaluate --data)
    <model_dir>/eval/history.json          evaluated steps; eval/PAUSE pauses the evaluator
    <model_dir>/nonfinite_batch.json       subjects of a batch whose loss was not finite
    <model_dir>/train.lock, eval/eval.lock the pid and host of the running trainer and evaluator
    <model_dir>/curves.png                 learning curves (medseg show --curves)

The default `data.converted_dir`, `<model_dir>/converted`, is resolved with the params (config/params.py).

The folder can be moved or copied: its params.yaml and checkpoints/run_params.yaml hold the paths that lie
inside the experiment (the folder itself: `experiment.model_dir: .`, its records, the records of the folds'
root) relative to the folder (`ModelDir.save_params`), and are loaded from where the folder lies now
(config/params.py). A moved data folder with the same subjects is followed (`follow_moved_data`).

k-fold cross-validation (`data.split.folds` = k > 0): `experiment.model_dir` is the experiment root, and
fold j trains in a complete model folder of its own (`open_model_dir(..., fold=j)`, the CLI's `--fold j`):

    <root>/fold_<j>/                       the model folder of fold j (its params say data.split.fold = j)
    <root>/converted/                       the converted subjects, shared by the folds (unless data.converted_dir)
    <root>/cv/                             cross-validation results of the evaluator (--cv)
    <root>/postprocessing.json             the post-processing chosen on the cross-validation predictions
"""
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from medseg_dl.runtime import atomic
from medseg_dl.runtime.cluster import is_chief
from medseg_dl.config.params import Params
from medseg_dl.data.index import case_paths
from medseg_dl.data.subjects import Subject, find_subjects, split_subjects
from medseg_dl.errors import DataError, ModelDirError, ParamsError
from medseg_dl.experiment.resume import NETWORK_KEYS, check_resume

SPLITS = ("train", "val", "test")
PARAMS_HEADER = ("# Saved by medseg_dl. experiment.model_dir '.' is the folder of this file; the relative paths are\n"
                 "# relative to it, so the folder can be moved or copied. Resume with --params <this file>.\n")


@dataclass(frozen=True)
class ModelDir:
    """Paths inside one model folder (`root`, absolute)."""

    root: str

    REPORT_METRICS = "metrics.csv"
    REPORT_SUMMARY = "summary.json"
    REPORT_OVERLAYS = "overlays"
    REPORT_PREDICTIONS = "predictions"
    STAGING_PREFIX = "staging-"  # eval/staging-*/: the evaluator's private copies of checkpoints

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def params_path(self) -> str:
        return self.path("params.yaml")

    def save_params(self, params: Params, path: Optional[str] = None) -> None:
        """Write `params` to params.yaml (or `path`, e.g. `run_params`), the paths inside the experiment
        (`experiment_root`) relative to this folder, with a header saying so."""
        params.save(path or self.params_path, relative_to=self.root, within=experiment_root(params).root,
                    header=PARAMS_HEADER)

    def load_run_params(self) -> Optional[Params]:
        """The params the checkpoints follow (`run_params`, its paths relative to this folder), or None before
        the first training."""
        return Params.load(self.run_params, base_dir=self.root) if os.path.isfile(self.run_params) else None

    @property
    def filelists(self) -> str:
        return self.path("filelists")

    def filelist(self, split: str) -> str:
        return self.path("filelists", f"{split}.json")

    @property
    def checkpoints(self) -> str:
        return self.path("checkpoints")

    @property
    def done_marker(self) -> str:
        return self.path("checkpoints", "done.json")

    @property
    def run_params(self) -> str:
        """The params the checkpoints follow (written by the trainer when it starts; experiment/resume.py)."""
        return self.path("checkpoints", "run_params.yaml")

    @property
    def unreadable_checkpoints(self) -> str:
        """Where the trainer moves a checkpoint it cannot read."""
        return self.path("checkpoints", "unreadable")

    def worker_checkpoints(self, pid: int) -> str:
        """Where a non-chief multi-worker process must write its (discarded) checkpoints."""
        return self.path(f".worker-checkpoints-{pid}")

    def stale_worker_checkpoints(self) -> List[str]:
        """The `worker_checkpoints` folders of processes that no longer run on this machine."""
        names = [n for n in os.listdir(self.root) if n.startswith(".worker-checkpoints-")]
        return [self.path(n) for n in names if not atomic.process_alive(int(n.rsplit("-", 1)[1]))]

    @property
    def best(self) -> str:
        return self.path("best")

    @property
    def best_index(self) -> str:
        return self.path("best", "best.json")

    @property
    def train_logs(self) -> str:
        return self.path("logs", "train")

    @property
    def eval_logs(self) -> str:
        return self.path("logs", "eval")

    @property
    def scalars_csv(self) -> str:
        return self.path("logs", "train", "scalars.csv")

    @property
    def eval_root(self) -> str:
        return self.path("eval")

    def report_dir(self, step: int, tag: Optional[str] = None) -> str:
        """eval/<step>/ for the validation split, eval/<step>-<tag>/ for another folder."""
        return self.path("eval", str(step) if tag is None else f"{step}-{tag}")

    def summary_path(self, step: int, tag: Optional[str] = None) -> str:
        return os.path.join(self.report_dir(step, tag), self.REPORT_SUMMARY)

    def validation_summaries(self) -> List[Tuple[int, str]]:
        """(step, summary.json path) of every validation report, sorted by step."""
        steps = [int(n) for n in os.listdir(self.eval_root) if n.isdigit()] if os.path.isdir(self.eval_root) else []
        return [(s, self.summary_path(s)) for s in sorted(steps) if os.path.isfile(self.summary_path(s))]

    @property
    def history(self) -> str:
        return self.path("eval", "history.json")

    @property
    def pause_file(self) -> str:
        return self.path("eval", "PAUSE")

    @property
    def train_lock(self) -> str:
        """Held by the one training process of this folder (pid, host)."""
        return self.path("train.lock")

    @property
    def eval_lock(self) -> str:
        """Held by the one evaluation process (watcher) of this folder."""
        return self.path("eval", "eval.lock")

    @property
    def nonfinite_batch(self) -> str:
        return self.path("nonfinite_batch.json")

    @property
    def curves_png(self) -> str:
        return self.path("curves.png")

    def fold(self, k: int) -> "ModelDir":
        """The model folder of fold k of the experiment root `self` (cross-validation): <root>/fold_<k>/."""
        return ModelDir(self.path(f"fold_{k}"))

    @property
    def cv(self) -> str:
        """The experiment root's cross-validation results (all folds' validation predictions and metrics)."""
        return self.path("cv")

    def cv_report(self, kind: str) -> str:
        """<root>/cv/raw/ (the folds' predictions as they are) or <root>/cv/postprocessed/."""
        return self.path("cv", kind)

    @property
    def postprocessing_json(self) -> str:
        """The experiment root's post-processing decision, chosen on the cross-validation predictions."""
        return self.path("postprocessing.json")


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
    return fold is not None and os.path.basename(params.experiment.model_dir) == f"fold_{fold}"


def fold_params(params: Params, fold: int) -> Params:
    """The params of fold `fold` from the experiment root's: experiment.model_dir -> <root>/fold_<fold>,
    data.split.fold -> fold; data.converted_dir stays (resolved: <root>/converted unless given), so the
    folds share the converted records."""
    values = params.to_dict()
    values["experiment"]["model_dir"] = ModelDir(params.experiment.model_dir).fold(fold).root
    values["data"]["split"]["fold"] = fold
    return Params.from_dict(values, source=f"fold {fold} of {params.experiment.model_dir}")


def experiment_root(params: Params) -> ModelDir:
    """The experiment root: experiment.model_dir, or its parent for the params of one fold."""
    folder = params.experiment.model_dir
    return ModelDir(os.path.dirname(folder) if _is_fold_folder(params) else folder)


def fold_model_dirs(params: Params) -> List[ModelDir]:
    """The model folders of all folds (evaluate --cv), from the root's params or one fold's;
    `ParamsError` without cross-validation."""
    folds = params.data.split.folds
    if not folds:
        raise ParamsError("data.split.folds = 0: no cross-validation folds; set data.split.folds (e.g. 5) and "
                          "train each fold with --fold k")
    root = experiment_root(params)
    return [root.fold(k) for k in range(folds)]


def _wait_for_folder(model_dir: ModelDir, timeout_s: float = 600.0) -> ModelDir:
    started = time.time()
    while not all(os.path.isfile(model_dir.filelist(s)) for s in SPLITS):
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
        model_dir.save_params(params)
        if not all(os.path.isfile(model_dir.filelist(s)) for s in SPLITS):
            write_filelists(params, model_dir)
    return model_dir, resumed


def write_filelists(params: Params, model_dir: ModelDir) -> Dict[str, List[str]]:
    """Discover subjects, split them by `data.split` and the seed, and save `filelists/<split>.json`
    (lists of subject dicts: id, source paths and "bytes", the size of each file). Returns the split
    {name: [ids]}."""
    subjects = find_subjects(params.data)
    split = split_subjects([s.id for s in subjects], params.data.split, params.seed)
    by_id: Dict[str, Subject] = {s.id: s for s in subjects}
    os.makedirs(model_dir.filelists, exist_ok=True)
    for name, ids in split.items():
        atomic.write_json(model_dir.filelist(name), [_filelist_entry(by_id[i]) for i in ids])
    return split


def _filelist_entry(subject: Subject) -> Dict:
    """A file list's entry of `subject`: its dict with "bytes", the size of each of its files (a DICOM folder:
    the sum of its files) in `_subject_files` order."""
    return {**subject.to_dict(), "bytes": [_size_bytes(path) for path in _subject_files(subject)]}


def _subject_files(subject: Subject) -> List[str]:
    return [*subject.channels, *(p for p in (subject.label, subject.mask) if p is not None)]


def _size_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)
    return os.path.getsize(path)


def filelist_subjects(model_dir: ModelDir, split: str) -> List[Subject]:
    """The subjects (with their source files) of `filelists/<split>.json`, in its order."""
    return [_entry_subject(entry) for entry in _filelist_entries(model_dir, split)]


def _filelist_entries(model_dir: ModelDir, split: str) -> List[Dict]:
    with open(model_dir.filelist(split)) as f:
        return json.load(f)


def _entry_subject(entry: Dict) -> Subject:
    return Subject(**{k: v for k, v in entry.items() if k != "bytes"})


def follow_moved_data(params: Params, model_dir: ModelDir) -> None:
    """When the subjects of the file lists are no longer where the lists say, or lie outside data.source_dir
    (the data folder was moved or copied): accept data.source_dir only if it holds the same subjects (the same
    ids, file names and sizes), then rewrite the file lists to point there and print one line; else
    `ModelDirError` naming the first difference, before anything is written. Nothing before the lists exist."""
    listed = {split: _filelist_entries(model_dir, split) for split in SPLITS if os.path.isfile(model_dir.filelist(split))}
    entries = [entry for split_entries in listed.values() for entry in split_entries]
    source_dir = params.data.source_dir
    if all(os.path.exists(path) and os.path.commonpath([path, source_dir]) == source_dir
           for entry in entries for path in _subject_files(_entry_subject(entry))):
        return
    found = {s.id: s for s in find_subjects(params.data)}
    difference = _first_difference(entries, found)
    if difference:
        raise ModelDirError(f"{source_dir}: not the data of {model_dir.root} ({difference}); set data.source_dir to "
                            f"the folder of its subjects, or start a new experiment.model_dir")
    for split, split_entries in listed.items():
        atomic.write_json(model_dir.filelist(split), [_filelist_entry(found[entry["id"]]) for entry in split_entries])
    print(f"data: the {len(entries)} subjects of the file lists are now read from {source_dir} (same ids, file names "
          f"and sizes)", flush=True)


def _first_difference(entries: List[Dict], found: Dict[str, Subject]) -> Optional[str]:
    """How the subjects `found` in a data folder differ from the file lists' `entries`, or None when they are
    the same: the same ids, and per subject the same file names and sizes."""
    listed_ids = {entry["id"] for entry in entries}
    if set(found) != listed_ids:
        missing, extra = sorted(listed_ids - set(found)), sorted(set(found) - listed_ids)
        return f"subjects missing: {missing[:3]}, not in the file lists: {extra[:3]}"
    for entry in entries:
        subject = found[entry["id"]]
        names, listed_names = ([os.path.basename(p) for p in _subject_files(s)] for s in (subject, _entry_subject(entry)))
        if names != listed_names:
            return f"{subject.id}: files {names}, the file lists have {listed_names}"
        sizes = [_size_bytes(p) for p in _subject_files(subject)]
        if sizes != entry["bytes"]:
            return f"{subject.id}: file sizes {sizes} bytes, the file lists have {entry['bytes']}"
    return None


def read_filelist(model_dir: ModelDir, split: str) -> List[str]:
    """The subject ids of `filelists/<split>.json`; `DataError` if it does not exist."""
    path = model_dir.filelist(split)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file list not found; run `medseg convert` or `medseg train` with the "
                        f"params file first")
    return [entry["id"] for entry in _filelist_entries(model_dir, split)]


def split_case_paths(params: Params, model_dir: ModelDir, split: str) -> List[str]:
    """Case folder paths of the subjects of `split`; `DataError` if one is not converted yet."""
    return case_paths(params.data.converted_dir, read_filelist(model_dir, split))


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
        atomic.write_text(model_dir.path(".write-test"), "ok")
        os.remove(model_dir.path(".write-test"))
    except OSError as err:
        if atomic.is_disk_full(err):
            raise
        raise ModelDirError(f"{model_dir.root}: cannot write the model folder ({err.strerror}); choose a "
                            f"writable experiment.model_dir") from None
