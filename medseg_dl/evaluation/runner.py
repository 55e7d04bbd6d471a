"""Evaluating one checkpoint: restore its weights, evaluate the validation cases (evaluate.py), write the report.

Two runners with one call, `runner(staged_prefix, step) -> summary`:
- `InProcessRunner` builds the network once and reads the cases again, one at a time, for every checkpoint
  (the CPU default);
- `ChildProcessRunner` evaluates each checkpoint in a new process (`python -m
  medseg_dl.evaluation.runner PARAMS PREFIX STEP`), so that nothing stays in GPU memory between
  checkpoints: TensorFlow never hands GPU memory back while a process lives (the default when the
  evaluator uses a GPU; evaluation.checkpoint_process). Its progress lines are passed on as they come.
An unreadable checkpoint raises `CheckpointError` from both; the evaluator skips it.
"""
import ctypes
import json
import signal
import subprocess
import sys
from typing import Dict, Sequence

import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.errors import CheckpointError, MedsegError
from medseg_dl.evaluation.cases import EvaluationCases, split_cases
from medseg_dl.evaluation.evaluate import evaluate
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.trained import inference_network, restore_weights
from medseg_dl.runtime.devices import configure_devices

UNREADABLE_EXIT = 3  # the child's exit code for an unreadable checkpoint
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


class InProcessRunner:
    """Evaluates staged checkpoints in this process on `cases`; the network is built once."""

    def __init__(self, params: Params, model_dir: ModelDir, cases: EvaluationCases):
        self.params, self.model_dir, self.cases = params, model_dir, cases
        self.network = inference_network(params)
        self.predictor = Predictor.from_params(self.network, params)
        self.writer = tf.summary.create_file_writer(model_dir.eval_logs)

    def __call__(self, staged_prefix: str, step: int) -> Dict:
        restore_weights(self.network, staged_prefix)
        return evaluate(self.predictor, self.cases, self.model_dir.report_dir(step), self.params, step,
                        f"step {step}", self.writer)

    def close(self) -> None:
        self.writer.flush()


class ChildProcessRunner:
    """Evaluates each staged checkpoint in a child process of this interpreter; `params_path` is the
    evaluator's resolved params, saved by the caller (the child reads them, not the folder's)."""

    def __init__(self, params_path: str):
        self.params_path = params_path

    def __call__(self, staged_prefix: str, step: int) -> Dict:
        command = [sys.executable, "-m", "medseg_dl.evaluation.runner", self.params_path, staged_prefix, str(step)]
        last = ""
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent) as child:
            for line in child.stdout:  # the child's progress, passed on as it comes; its last line is its summary
                if last:
                    print(last, end="", flush=True)
                last = line
        if child.returncode == UNREADABLE_EXIT:
            print(last, end="", flush=True)
            raise CheckpointError(f"{staged_prefix}: cannot read this checkpoint (see the message above)")
        if child.returncode != 0 or not last:
            print(last, end="", flush=True)
            raise MedsegError(f"the evaluation process of checkpoint {step} stopped (exit code {child.returncode}); "
                              f"its message is above")
        return json.loads(last)

    def close(self) -> None:
        pass


def _die_with_parent():
    """In the child, before it runs: ask Linux to kill it when the evaluator dies (kill -9 included), so
    that no orphan keeps evaluating into the model folder. Elsewhere nothing is done."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str]) -> int:
    """The child: evaluate the staged checkpoint argv[1] at step argv[2] with the params file argv[0];
    prints its progress, then the summary as the last line of stdout."""
    try:
        params = Params.load(argv[0])
        model_dir = ModelDir(params.experiment.model_dir)
        configure_devices(params.evaluation, "evaluation")
        cases = split_cases(params, model_dir, "val", params.evaluation.poll_seconds)
        runner = InProcessRunner(params, model_dir, cases)
        summary = runner(argv[1], int(argv[2]))
        runner.close()
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return UNREADABLE_EXIT
    except MedsegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
