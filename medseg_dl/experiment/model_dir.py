"""The model folder of one training run. `ModelDir` is the one place that names its files (`Report`, those of
its report folders):

    <model_dir>/params.yaml                resolved parameters; passing this path resumes the run
    <model_dir>/filelists/{train,val,test}.json
    <model_dir>/checkpoints/               last N training checkpoints, done.json, run_params.yaml
    <model_dir>/best/                      best K checkpoints + best.json
    <model_dir>/logs/{train,eval}/         TensorBoard event files; logs/train/scalars.csv
    <model_dir>/eval/<step>/               metrics.csv, summary.json, overlays/, predictions/ (`Report`)
    <model_dir>/eval/<step>-<folder>/      the same for another labelled folder (evaluate --data)
    <model_dir>/eval/history.json          evaluated steps; eval/PAUSE pauses the evaluator
    <model_dir>/eval/staging-*/            the evaluator's private copies of checkpoints (and its params.yaml)
    <model_dir>/nonfinite_batch.json       subjects of a batch whose loss was not finite
    <model_dir>/train.lock, eval/eval.lock the pid and host of the running trainer and evaluator
    <model_dir>/curves.png                 learning curves (medseg show --curves)

The experiment that holds model folders (its root, its folds, converted records, cross-validation reports and
post-processing decision), and opening or preparing a model folder: experiment/experiment.py. The file lists
(written, read, followed when the data moves): experiment/filelists.py.
"""
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from medseg_dl.config.params import Params
from medseg_dl.runtime import atomic


@dataclass(frozen=True)
class Report:
    """Paths inside one report folder (`root`): eval/<step>/ of a model folder, or a cross-validation report of
    the experiment root (experiment.py `Reports`); also the folder a report is written into before it replaces
    that one (evaluation/report.py)."""

    root: str

    @property
    def metrics_csv(self) -> str:
        return os.path.join(self.root, "metrics.csv")

    @property
    def summary_json(self) -> str:
        return os.path.join(self.root, "summary.json")

    def overlay(self, subject_id: str) -> str:
        """The picture of one case: overlays/<subject>.png."""
        return os.path.join(self.root, "overlays", f"{subject_id}.png")

    @property
    def predictions(self) -> str:
        return os.path.join(self.root, "predictions")

    def prediction(self, subject_id: str) -> str:
        """The saved prediction of one case: predictions/<subject>.nii.gz."""
        return os.path.join(self.predictions, f"{subject_id}.nii.gz")


@dataclass(frozen=True)
class ModelDir:
    """Paths inside one model folder (`root`, absolute)."""

    root: str

    STAGING_PREFIX = "staging-"  # eval/staging-*/: the evaluator's private copies of checkpoints
    WORKER_PREFIX = ".worker-checkpoints-"  # .worker-checkpoints-<pid>/: a non-chief worker's discarded checkpoints
    PARAMS_NAME = "params.yaml"  # a model folder's params, and the evaluator's in its staging folder

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def params_path(self) -> str:
        return self.path(self.PARAMS_NAME)

    def load_run_params(self) -> Optional[Params]:
        """The params the checkpoints follow (`run_params`, its paths relative to this folder), or None before
        the first training."""
        return Params.load(self.run_params, base_dir=self.root) if os.path.isfile(self.run_params) else None

    @property
    def filelists(self) -> str:
        return self.path("filelists")

    def filelist(self, split: str) -> str:
        return os.path.join(self.filelists, f"{split}.json")

    @property
    def checkpoints(self) -> str:
        return self.path("checkpoints")

    @property
    def done_marker(self) -> str:
        return os.path.join(self.checkpoints, "done.json")

    @property
    def run_params(self) -> str:
        """The params the checkpoints follow (written by the trainer when it starts; experiment/resume.py)."""
        return os.path.join(self.checkpoints, "run_params.yaml")

    @property
    def unreadable_checkpoints(self) -> str:
        """Where the trainer moves a checkpoint it cannot read."""
        return os.path.join(self.checkpoints, "unreadable")

    def worker_checkpoints(self, pid: int) -> str:
        """Where a non-chief multi-worker process must write its (discarded) checkpoints."""
        return self.path(f"{self.WORKER_PREFIX}{pid}")

    def stale_worker_checkpoints(self) -> List[str]:
        """The `worker_checkpoints` folders of processes that no longer run on this machine."""
        names = [n for n in os.listdir(self.root) if n.startswith(self.WORKER_PREFIX)]
        return [self.path(n) for n in names if not atomic.process_alive(int(n.rsplit("-", 1)[1]))]

    @property
    def best(self) -> str:
        return self.path("best")

    @property
    def best_index(self) -> str:
        return os.path.join(self.best, "best.json")

    @property
    def train_logs(self) -> str:
        return self.path("logs", "train")

    @property
    def eval_logs(self) -> str:
        return self.path("logs", "eval")

    @property
    def scalars_csv(self) -> str:
        return os.path.join(self.train_logs, "scalars.csv")

    @property
    def eval_root(self) -> str:
        return self.path("eval")

    def report_dir(self, step: int, tag: Optional[str] = None) -> str:
        """eval/<step>/ for the validation split, eval/<step>-<tag>/ for another folder."""
        return os.path.join(self.eval_root, str(step) if tag is None else f"{step}-{tag}")

    def summary_path(self, step: int, tag: Optional[str] = None) -> str:
        return Report(self.report_dir(step, tag)).summary_json

    def validation_summaries(self) -> List[Tuple[int, str]]:
        """(step, summary.json path) of every validation report, sorted by step."""
        steps = [int(n) for n in os.listdir(self.eval_root) if n.isdigit()] if os.path.isdir(self.eval_root) else []
        return [(s, self.summary_path(s)) for s in sorted(steps) if os.path.isfile(self.summary_path(s))]

    def staging_folders(self) -> List[str]:
        """The evaluator's staging folders eval/staging-*/ (those a killed evaluator left, when none runs)."""
        names = os.listdir(self.eval_root)
        return [os.path.join(self.eval_root, n) for n in names if n.startswith(self.STAGING_PREFIX)]

    @property
    def history(self) -> str:
        return os.path.join(self.eval_root, "history.json")

    @property
    def pause_file(self) -> str:
        return os.path.join(self.eval_root, "PAUSE")

    @property
    def train_lock(self) -> str:
        """Held by the one training process of this folder (pid, host)."""
        return self.path("train.lock")

    @property
    def eval_lock(self) -> str:
        """Held by the one evaluation process (watcher) of this folder."""
        return os.path.join(self.eval_root, "eval.lock")

    @property
    def nonfinite_batch(self) -> str:
        return self.path("nonfinite_batch.json")

    @property
    def curves_png(self) -> str:
        return self.path("curves.png")

    @property
    def write_probe(self) -> str:
        """A file written and removed to learn whether the folder is writable."""
        return self.path(".write-test")
