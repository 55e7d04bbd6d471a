"""Training throughput on W1a (hippocampus, patch 40x56x40, batch 9) for both networks.

Runs the real training process (`medseg_dl.training.loop.run_training`) with the W1a augmentations of
../shared/BENCHMARKS.md and reports, per network and training.precision, the median over the timed
log intervals of patches/s and of the share of step time spent waiting for the input pipeline (the
first interval, which includes tracing, is the warm-up); each interval's figures are kept beside the medians
(`<key>_runs`). One JSON line per (network, precision), kept
in results/training.jsonl unless --quick; `precision` is the policy in force ("auto" resolved), and
`precision_option` the value given. The runs share one process: each `model_fn` sets the global keras
dtype policy anew, so none leaks into the next.

    python benchmarks/training.py [--steps 40] [--quick] [--precision P [P ...]] [--architectures A [A ...]]
"""
import argparse
import csv
import os
import tempfile

import numpy as np
from datasets import HIPPO
from harness import spread
from machine_info import record

W1_AUGMENTATION = {"flip": {"p": 0.5}, "rotate": {"p": 1.0, "max_deg": [15, 15, 15]},
                   "scale": {"p": 1.0, "range": [0.85, 1.25]}, "elastic": {"p": 1.0},
                   "noise": {"p": 1.0, "std": [0.1, 0.1]}}


def run(architecture, steps, log_every, work_dir, converted_dir, precision, quick):
    from medseg_dl.config.params import Params
    from medseg_dl.experiment.filelists import write_filelists
    from medseg_dl.experiment.model_dir import ModelDir
    from medseg_dl.training.loop import run_training

    params = Params.from_dict({
        "seed": 0, "experiment": {"model_dir": os.path.join(work_dir, architecture)},
        "data": {"source_dir": HIPPO, "converted_dir": converted_dir, "channels": ["mri"], "num_classes": 3,
                 "split": {"val": 0.0}},
        "sampling": {"patch_size": [40, 56, 40], "batch_size": 9, "samples_per_volume": 8,
                     "class_probabilities": [1 / 3] * 3},
        "augmentation": W1_AUGMENTATION,
        "model": {"architecture": architecture, **({"base_filters": 4, "depth": 2} if quick else {})},
        "training": {"steps": steps, "log_every": log_every, "checkpoint_every": 10 ** 6,
                     "image_summary_every": 10 ** 6, "precision": precision}})
    model_dir = ModelDir(params.experiment.model_dir)
    os.makedirs(model_dir.checkpoints, exist_ok=True)
    os.makedirs(model_dir.train_logs, exist_ok=True)
    write_filelists(params, model_dir)
    run_training(params, model_dir)  # converts first
    with open(model_dir.scalars_csv) as f:
        rows = list(csv.DictReader(f))[1:]  # the first interval includes tracing: warm-up
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="a few steps of a small network (smoke test)")
    parser.add_argument("--precision", nargs="+", default=["float32", "mixed_bfloat16"],
                        choices=["float32", "mixed_bfloat16", "auto", "mixed_float16"])
    parser.add_argument("--architectures", nargs="+", default=["unet", "medpatchnet"])
    args = parser.parse_args()
    steps, log_every = (6, 2) if args.quick else (args.steps, max(args.steps // 4, 1))
    from medseg_dl.runtime.devices import resolve_precision
    with tempfile.TemporaryDirectory() as work_dir:
        converted_dir = os.path.join(work_dir, "converted")
        for architecture in args.architectures:
            for precision in args.precision:
                run_dir = os.path.join(work_dir, precision)
                rows = run(architecture, steps, log_every, run_dir, converted_dir, precision, args.quick)
                rates = [float(r["patches_per_s"]) for r in rows]
                waits = [float(r["data_wait_fraction"]) for r in rows]
                step_times = [float(r["step_time_s"]) for r in rows]
                record("training", {"workload": "W1a-train", "library": "medseg_dl", "network": architecture,
                                    **spread(rates, 3), "unit": "patches/s",
                                    "data_wait_fraction": float(np.median(waits)), "data_wait_fraction_runs": waits,
                                    "step_time_s": float(np.median(step_times)), "step_time_s_runs": step_times,
                                    "precision": resolve_precision(precision, "auto"),
                                    "precision_option": precision}, keep=not args.quick)


if __name__ == "__main__":
    main()
