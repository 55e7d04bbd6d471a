"""The two-process workflow on one device: training steps/s alone and with the evaluator beside it, and
each process's peak device memory, for each precision. Run by `benchmarks/gpu_workflow.sh`.

For each precision (float32, and mixed_float16 on a GPU): `medseg train` on the hippocampus experiment
runs alone for `--minutes`, then again (a fresh model folder) with `medseg evaluate` watching it (a
checkpoint every `--checkpoint-every` steps); both are stopped with SIGTERM. Steps/s is the median over
the logged intervals after the first (tracing); every interval's is kept (`steps_per_s_runs`). Peak
memory: GPU memory per process from `nvidia-smi --query-compute-apps` sampled every 0.5 s (the
evaluator's child processes counted as the evaluator), or, without a GPU (`--cpu`), the peak RSS of
each process tree (`harness.RSS_METHOD`). Prints one JSON line per run and appends them to
benchmarks/results/gpu_workflow.jsonl.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time

from experiments import step_times_s
from harness import MEDSEG, REPO, TreeRssSampler, process_tree
from machine_info import record

CPU_SETTINGS = ["model.base_filters=8", "sampling.patch_size=[32,40,32]", "sampling.batch_size=4"]


def medseg(log, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([*MEDSEG, *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


class GpuSampler(threading.Thread):
    """Samples the GPU memory of the process tree of `pid` (`nvidia-smi --query-compute-apps`) every 0.5 s until
    `stop()`, which returns its peak in MB."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.stopped = pid, 0.0, threading.Event()

    def run(self):
        while not self.stopped.wait(0.5):
            usage = gpu_usage_mb()
            self.peak_mb = max(self.peak_mb, sum(usage.get(p, 0.0) for p in process_tree(self.pid)))

    def stop(self):
        self.stopped.set()
        self.join()
        return self.peak_mb


def gpu_usage_mb():
    """{pid: GPU memory in MB} of the processes on the GPUs."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    usage = {}
    for line in out.strip().splitlines():
        pid, used = (part.strip() for part in line.split(","))
        usage[int(pid)] = float(used)
    return usage


def one_run(args, precision, beside, work):
    model_dir = os.path.join(work, f"{precision}-{'beside' if beside else 'alone'}")
    settings = [f"experiment.model_dir={model_dir}", f"data.converted_dir={os.path.join(work, 'converted')}",
                "training.steps=1000000", "training.log_every=20", f"training.checkpoint_every={args.checkpoint_every}",
                f"training.precision={precision}", *args.set]
    overrides = [a for s in settings for a in ("--set", s)]
    processes = {"trainer": medseg(model_dir + "-train.log", "train", "--params", args.params, *overrides)}
    if beside:
        while not os.path.isfile(os.path.join(model_dir, "checkpoints", "run_params.yaml")):
            time.sleep(1.0)
        processes["evaluator"] = medseg(model_dir + "-eval.log", "evaluate", "--params",
                                        os.path.join(model_dir, "params.yaml"))
    samplers = {name: (GpuSampler if args.gpu else TreeRssSampler)(process.pid)
                for name, process in processes.items()}
    for sampler in samplers.values():
        sampler.start()
    time.sleep(args.minutes * 60)
    for process in processes.values():
        os.killpg(process.pid, signal.SIGTERM)
    for process in processes.values():
        process.wait(timeout=300)
    peak_mb = {name: sampler.stop() for name, sampler in samplers.items()}
    evaluated = len(json.load(open(os.path.join(model_dir, "eval", "history.json")))) \
        if os.path.isfile(os.path.join(model_dir, "eval", "history.json")) else 0
    unit = "gpu_mb" if args.gpu else "rss_mb"
    rates = [1.0 / s for s in step_times_s(model_dir)]  # each logged interval after the first (tracing)
    return {"benchmark": "gpu_workflow", "precision": precision, "evaluator_beside": beside,
            "steps_per_s": statistics.median(rates) if rates else float("nan"), "steps_per_s_runs": rates,
            "minutes": args.minutes, "checkpoints_evaluated": evaluated,
            **{f"peak_{unit}_{name}": round(mb, 1) for name, mb in peak_mb.items()}, "settings": args.set}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="no GPU: the CPU form (float32, a small network)")
    parser.add_argument("--minutes", type=float, default=3.0, help="per run")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--params", default=os.path.join(REPO, "params", "hippocampus.yaml"))
    parser.add_argument("--work", default=os.path.join(REPO, "runs", "gpu-workflow"))
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    args.gpu = not args.cpu and shutil.which("nvidia-smi") is not None
    if args.cpu:
        args.set = CPU_SETTINGS + args.set
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    for precision in ["float32", "mixed_float16"] if args.gpu else ["float32"]:
        for beside in (False, True):
            record("gpu_workflow", one_run(args, precision, beside, args.work), keep=True)


if __name__ == "__main__":
    main()
