"""The `medseg` runs that several benchmarks share: the planned experiment of a dataset folder, training in a child
process (with a wall-time budget), the scores of a model folder's test split and its logged step times."""
import csv
import os
import signal
import subprocess
import time

from datasets import HIPPO_CLASS_NAMES
from harness import MEDSEG, REPO


def train(params_path, overrides, minutes):
    """Run `medseg train` in a subprocess; SIGTERM after `minutes` (None: run to training.steps).

    Returns the wall time in minutes."""
    command = [*MEDSEG, "train", "--params", params_path, "--overwrite"]
    for override in overrides:
        command += ["--set", override]
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO)
    try:
        process.wait(timeout=None if minutes is None else minutes * 60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        process.wait()
    if process.returncode != 0:
        raise SystemExit(f"training failed with exit code {process.returncode}")
    return (time.time() - started) / 60


def planned_experiment(data_dir, work_dir):
    """`medseg plan` of the dataset folder (CPU budget) into <work_dir>/planned.yaml."""
    from medseg_dl.planning.command import run_plan

    return run_plan(data_dir, "images_labels", os.path.join(work_dir, "planned.yaml"), overrides=[HIPPO_CLASS_NAMES])


def score_test_split(model_dir_path, overrides):
    """(params, summary of the last checkpoint, [(step, mean Dice)] of every kept checkpoint) on the test cases."""
    from medseg_dl.config.params import Params
    from medseg_dl.evaluation.cases import split_cases
    from medseg_dl.evaluation.watcher import score_checkpoint
    from medseg_dl.experiment.checkpoints import checkpoint_step, completed_checkpoints
    from medseg_dl.experiment.model_dir import ModelDir

    model_dir = ModelDir(model_dir_path)
    params = Params.load(model_dir.params_path, overrides)
    cases = split_cases(params, model_dir, "test", 1.0)
    curve = []
    for prefix in completed_checkpoints(model_dir.checkpoints):
        summary = score_checkpoint(params, model_dir, cases, "test", prefix)
        curve.append([checkpoint_step(prefix), round(summary["mean_dice"], 4)])
    return params, summary, curve


def step_times_s(model_dir_path):
    """The mean step time of each logged interval of a run, without the first (it includes tracing) unless it
    is the only one."""
    from medseg_dl.experiment.model_dir import ModelDir

    path = ModelDir(model_dir_path).scalars_csv
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: the training logged no step (see its log); give it more time")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [float(row["step_time_s"]) for row in (rows[1:] or rows)]
