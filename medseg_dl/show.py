"""What `medseg show` draws: a volume with labels, a batch of training patches, learning curves."""
import glob
import json
import os

import numpy as np

from medseg_dl import plotting
from medseg_dl.data.io import read_volume


def show_files(image_path, label_path=None, prediction_path=None, out=None, class_names=None):
    """A volume file with optional label and prediction files: a viewer or a PNG (see plotting.show_volume)."""
    image = read_volume(image_path)
    read_labels = lambda p: np.rint(read_volume(p).data).astype(np.int32) if p else None
    return plotting.show_volume(image.data, read_labels(label_path), read_labels(prediction_path), out,
                                spacing_mm=image.spacing_mm, class_names=class_names,
                                title=os.path.basename(image_path))


def show_batch(params, model_dir, out):
    """One augmented training batch as a PNG grid: what the network is fed."""
    from medseg_dl.pipeline.inputs import train_inputs
    from medseg_dl.training import training_files

    batch = next(iter(train_inputs(params, training_files(params, model_dir))))
    return plotting.batch_grid({k: v.numpy() for k, v in batch.items()}, out)


def evaluation_rows(model_dir):
    """Per evaluated step: step, mean_dice and dice_<class> from eval/<step>/summary.json."""
    rows = []
    for path in glob.glob(model_dir.path("eval", "*", "summary.json")):
        step_name = os.path.basename(os.path.dirname(path))
        if not step_name.isdigit():
            continue  # reports of other data folders (<step>-<name>)
        with open(path) as f:
            summary = json.load(f)
        row = {"step": int(step_name), "mean_dice": summary["mean_dice"]}
        row.update({f"dice_{name}": stats["dice"]["mean"] for name, stats in summary["classes"].items()})
        rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def show_curves(model_dir, class_names, out):
    """Training loss and validation Dice per checkpoint of a model folder, as a PNG."""
    train_rows = plotting.read_csv_rows(os.path.join(model_dir.logs("train"), "scalars.csv"))
    return plotting.learning_curves(train_rows, evaluation_rows(model_dir), out, class_names)
