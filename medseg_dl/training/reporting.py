"""What the training process reports: TensorBoard scalars/images/graph, `scalars.csv`, progress.

On an interactive terminal a tqdm bar shows the ETA and current loss; under nohup (stdout not a
TTY) plain lines are printed every `training.log_every` steps.
"""
import csv
import os
import sys
import time

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from medseg_dl.runtime import atomic
from medseg_dl.viz.plotting import display_scaled


class ScalarCsv:
    """Appends rows of scalars to `<logs>/scalars.csv`; columns fixed by the first row written.
    On resume, rows past the restored step (written after the last checkpoint) are dropped, and so
    is a row cut short by a crash."""

    def __init__(self, path, restored_step):
        self.path = path
        self.columns = None
        if os.path.isfile(path):
            with open(path) as f:
                rows = list(csv.DictReader(f))
            kept = [r for r in rows if _complete(r) and int(r["step"]) <= restored_step]
            if rows:
                self.columns = list(rows[0].keys())
                self._rewrite(kept)

    def _rewrite(self, rows):
        with atomic.replacing(self.path) as temporary, open(temporary, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row):
        if self.columns is None:
            self.columns = list(row.keys())
            self._rewrite([])
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)


def _complete(row):
    """A row with every column and no extra field (a crash can cut the last line)."""
    if None in row or any(v is None or v == "" for v in row.values()):
        return False
    return row["step"].isdigit()


class Progress:
    """A tqdm bar on a TTY, else one line every `every` steps."""

    def __init__(self, start_step, total_steps, every):
        self.every = every
        self.interactive = sys.stdout.isatty()
        self.started = time.time()
        self.start_step = start_step
        self.total = total_steps
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step") if self.interactive else None

    def update(self, step, loss):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif step % self.every == 0 or step == self.total:
            rate = (step - self.start_step) / max(time.time() - self.started, 1e-9)
            eta_s = (self.total - step) / max(rate, 1e-9)
            print(f"step {step}/{self.total}  loss {loss:.4f}  {rate:.2f} steps/s  eta {eta_s / 60:.1f} min",
                  flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def write_scalars(writer, step, scalars):
    """Log a dict of float scalars to TensorBoard at `step`."""
    with writer.as_default(step=step):
        for name, value in scalars.items():
            tf.summary.scalar(name, value)


def mid_slice_images(batch, logits, targets):
    """(3, py, pz, 1) float32 images in [0, 1]: the middle x-slice of the first patch's channel 0, its label
    and the predicted label (`targets.labels_of`: the arg-max, or the regions painted), the labels scaled by
    the largest class value (targets.num_classes - 1; the ignore label shows as 1). batch: numpy
    {"image": (N, X, Y, Z, C) float32, "label": (N, X, Y, Z) int}; logits: (N, X, Y, Z, K) float32."""
    top_label = targets.num_classes - 1
    middle = batch["image"].shape[1] // 2
    image = display_scaled(batch["image"][0, middle, :, :, 0])
    label = np.minimum(batch["label"][0, middle] / top_label, 1.0)
    prediction = targets.labels_of(logits[0, middle]) / top_label
    return np.stack([image, label, prediction]).astype(np.float32)[..., None]


def write_images(writer, step, batch, logits, targets):
    """Log `mid_slice_images` of a batch (numpy dict) and its logits (N, X, Y, Z, K) at `step`."""
    with writer.as_default(step=step):
        tf.summary.image("input_label_prediction", mid_slice_images(batch, logits, targets), max_outputs=3)
