"""What `medseg show` draws: a volume with labels, a batch of training patches, learning curves."""
import json
import os
from typing import Dict, List, Optional

import numpy as np

from medseg_dl.config.params import Params, default_class_name
from medseg_dl.data.io import read_volume
from medseg_dl.experiment.filelists import split_case_paths
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.viz import plotting


def show_files(image_path: str, label_path: Optional[str] = None, prediction_path: Optional[str] = None,
               out: Optional[str] = None, class_names=None) -> Optional[str]:
    """A volume file with optional label and prediction files: a viewer or a PNG (see plotting.show_volume).
    class_names: names indexed by label value; the values they do not name are called `default_class_name`."""
    image = read_volume(image_path)
    reference, prediction = (np.rint(read_volume(p).data).astype(np.int32) if p else None
                             for p in (label_path, prediction_path))
    top_label = max((int(m.max()) for m in (reference, prediction) if m is not None), default=0)
    names = list(class_names or [])
    names += [default_class_name(label) for label in range(len(names), top_label + 1)]
    return plotting.show_volume(image.data, reference, prediction, out, spacing_mm=image.spacing_mm,
                                class_names=names, title=os.path.basename(image_path))


def show_batch(params: Params, model_dir: ModelDir, out: str) -> str:
    """One augmented training batch (seed params.seed) as a PNG grid: what the network is fed. Devices as
    training's (training.device: its GPU memory setting before TensorFlow starts)."""
    from medseg_dl.runtime.devices import configure_devices  # TensorFlow only for this picture
    from medseg_dl.pipeline.inputs import train_inputs

    configure_devices(params.training, "training")
    batches = train_inputs(params, split_case_paths(params, model_dir, "train"), seed=params.seed)
    return plotting.batch_grid({k: v.numpy() for k, v in next(iter(batches)).items()}, out)


def evaluation_rows(model_dir: ModelDir) -> List[Dict]:
    """Per evaluated step of the validation split: step, mean_dice and dice_<class>."""
    rows = []
    for step, path in model_dir.validation_summaries():
        with open(path) as f:
            summary = json.load(f)
        row = {"step": step, "mean_dice": summary["mean_dice"]}
        row.update({f"dice_{name}": stats["dice"]["mean"] for name, stats in summary["classes"].items()})
        rows.append(row)
    return rows


def show_curves(model_dir: ModelDir, class_names, out: str) -> str:
    """Training loss and validation Dice per checkpoint of a model folder, as a PNG; class_names: the name of
    each scored structure by its number (index 0, the background, is not drawn)."""
    train_rows = plotting.read_csv_rows(model_dir.scalars_csv)
    return plotting.learning_curves(train_rows, evaluation_rows(model_dir), out, class_names)
