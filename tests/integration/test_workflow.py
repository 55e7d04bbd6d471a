"""The two-process workflow as users run it, with real processes: `medseg train` and `medseg evaluate`
side by side on one model folder, an extension by editing params.yaml while the evaluator watches,
kill -9 of either at several moments. Each run must end with every surviving checkpoint evaluated
exactly once, best/ equal to best.json, the final step evaluated, no crash, nothing left behind."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from helpers import REPO, synthetic_dataset, tiny_params

ENV = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
LEFTOVER = re.compile(r"^(\.tmp-|staging-|\.worker-checkpoints|.*_temp$|.*\.lock$)")


class Process:
    """A `medseg` subprocess whose output goes to a log file (appended over restarts)."""

    def __init__(self, log, *args):
        self.log = log
        with open(log, "a") as stream:
            self.popen = subprocess.Popen([sys.executable, "-m", "medseg_dl.cli", *args], stdout=stream,
                                          stderr=subprocess.STDOUT, env=ENV, cwd=REPO)

    def wait_ok(self, timeout_s=300):
        assert self.popen.wait(timeout=timeout_s) == 0, self.output()[-4000:]

    def kill9(self):
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=60)

    def output(self):
        return open(self.log).read()


def wait_until(condition, processes, timeout_s=240):
    deadline = time.time() + timeout_s
    while not condition():
        for process in processes:
            assert process.popen.poll() in (None, 0), process.output()[-4000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def experiment(tmp_path, **training):
    root = synthetic_dataset(tmp_path / "data")
    run = tmp_path / "run"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_params(root, run, training={"log_every": 1, **training},
                                               evaluation={"poll_seconds": 0.2, "keep_best": 2,
                                                           "save_overlays": False})))
    return str(path), run


def history(run):
    return json.load(open(run / "eval" / "history.json"))


def check_the_end(run, final_step, evaluator_log):
    """Every checkpoint still on disk evaluated, each step evaluated at most once, the final one
    evaluated, best/ equal to best.json, nothing left behind."""
    evaluated = history(run)
    surviving = sorted(int(n[len("ckpt-"):-len(".index")]) for n in os.listdir(run / "checkpoints")
                       if n.endswith(".index"))
    assert surviving and all(not evaluated[str(s)]["skipped"] for s in surviving)
    assert not evaluated[str(final_step)]["skipped"]
    printed = re.findall(r"^step (\d+): mean_dice", open(evaluator_log).read(), flags=re.M)
    assert len(printed) == len(set(printed)), printed  # no step evaluated twice
    assert {int(s) for s in printed} == {int(s) for s, e in evaluated.items() if not e["skipped"]}
    for step, entry in evaluated.items():
        if not entry["skipped"]:
            summary = json.load(open(run / "eval" / step / "summary.json"))
            assert summary["mean_dice"] == pytest.approx(entry["mean_dice"], nan_ok=True)
    best = json.load(open(run / "best" / "best.json"))
    files = {n.split(".")[0] for n in os.listdir(run / "best") if n.startswith("ckpt-")}
    assert files == {e["checkpoint"] for e in best} and 1 <= len(best) <= 2
    assert [e["value"] for e in best] == sorted((e["value"] for e in best), reverse=True)
    for entry in best:
        assert entry["value"] == pytest.approx(evaluated[str(entry["step"])]["mean_dice"])
    left = [os.path.join(folder, n) for folder, dirs, files in os.walk(run) for n in dirs + files if LEFTOVER.match(n)]
    assert left == []


def test_evaluator_beside_a_live_training_that_rotates_every_checkpoint(tmp_path):
    path, run = experiment(tmp_path, steps=12, checkpoint_every=1, keep_last=1)
    trainer = Process(tmp_path / "train.log", "train", "--params", path)
    wait_until(lambda: (run / "params.yaml").exists(), [trainer])
    evaluator = Process(tmp_path / "eval.log", "evaluate", "--params", str(run / "params.yaml"), "--timeout", "120")
    trainer.wait_ok()
    evaluator.wait_ok()
    check_the_end(run, 12, tmp_path / "eval.log")


def test_extension_by_editing_params_yaml_while_the_evaluator_watches(tmp_path):
    """The evaluator starts with training.steps = 6; while training runs, params.yaml is edited to 12
    (the README's advice). Training ends at 6 (done.json says 6), the evaluator follows the new target
    and keeps watching; the resumed training reaches 12, and the evaluator stops after evaluating it."""
    path, run = experiment(tmp_path, steps=6, checkpoint_every=3, keep_last=5)
    trainer = Process(tmp_path / "train.log", "train", "--params", path)
    wait_until(lambda: (run / "checkpoints" / "run_params.yaml").exists(), [trainer])
    evaluator = Process(tmp_path / "eval.log", "evaluate", "--params", str(run / "params.yaml"), "--timeout", "120")
    wait_until(lambda: (run / "eval" / "eval.lock").exists(), [evaluator])  # it has read steps = 6
    params = yaml.safe_load(open(run / "params.yaml"))
    params["training"]["steps"] = 12
    (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    trainer.wait_ok()
    wait_until(lambda: "6" in history(run) if (run / "eval" / "history.json").exists() else False, [evaluator])
    time.sleep(2.0)
    assert evaluator.popen.poll() is None  # done.json says 6, the target is now 12: it keeps watching
    trainer = Process(tmp_path / "train.log", "train", "--params", str(run / "params.yaml"))
    trainer.wait_ok()
    evaluator.wait_ok()
    assert "resume: training.steps: 6 -> 12 (applied" in trainer.output()
    check_the_end(run, 12, tmp_path / "eval.log")


def test_kill9_of_trainer_and_evaluator_at_several_moments(tmp_path):
    path, run = experiment(tmp_path, steps=12, checkpoint_every=3, keep_last=3)
    with open(path) as f:
        params = yaml.safe_load(f)
    params["evaluation"]["checkpoint_process"] = "always"  # one child process per checkpoint (the GPU mode)
    open(path, "w").write(yaml.safe_dump(params))
    trainer = Process(tmp_path / "train.log", "train", "--params", path)
    wait_until(lambda: (run / "checkpoints" / "ckpt-3.index").exists(), [trainer])
    trainer.kill9()  # between checkpoints, holding its lock
    own = str(run / "params.yaml")
    evaluator = Process(tmp_path / "eval.log", "evaluate", "--params", own, "--timeout", "180")
    wait_until(lambda: any(n.startswith("staging-") and os.listdir(run / "eval" / n)
                           for n in os.listdir(run / "eval")), [evaluator])
    evaluator.kill9()  # while a checkpoint is staged
    trainer = Process(tmp_path / "train.log", "train", "--params", own)  # takes over the stale lock
    evaluator = Process(tmp_path / "eval.log", "evaluate", "--params", own, "--timeout", "180")
    wait_until(lambda: (run / "checkpoints" / "ckpt-9.index").exists(), [trainer, evaluator])
    trainer.kill9()
    trainer = Process(tmp_path / "train.log", "train", "--params", own)
    trainer.wait_ok()
    evaluator.wait_ok()
    assert "Traceback" not in trainer.output() + evaluator.output()
    check_the_end(run, 12, tmp_path / "eval.log")
