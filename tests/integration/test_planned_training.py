"""What `medseg plan` writes trains: the planned params file of four kinds of dataset validates, converts
and trains two steps."""
import json
import os

import pytest
import yaml

from helpers import ellipsoid_dataset
from medseg_dl.config.params import Params
from medseg_dl.experiment.experiment import open_model_dir
from medseg_dl.planning.command import run_plan
from medseg_dl.training.loop import run_training


@pytest.mark.parametrize("case, spacing, shape, channels, modality", [
    ("isotropic_mri", [1.0, 1.0, 1.0], (24, 28, 20), 1, []),
    ("anisotropic", [0.7, 0.7, 5.0], (40, 40, 8), 1, []),
    ("ct_hu", [1.0, 1.0, 1.0], (24, 24, 24), 1, ["CT"]),
    ("two_channels", [1.0, 1.0, 1.5], (24, 24, 16), 2, ["MRI", "CT"]),
])
def test_planned_files_validate_and_train_two_steps(tmp_path, case, spacing, shape, channels, modality):
    root = ellipsoid_dataset(tmp_path / case, spacing, shape, channels, hu=modality[-1:] == ["CT"])
    output = tmp_path / "planned" / f"{case}.yaml"
    run_plan(str(root), "images_labels", str(output), modality,
             overrides=[f"experiment.model_dir={tmp_path / 'run'}", "data.workers=1"])
    params = Params.load(str(output))  # valid, and every planned key carries its reason
    text = output.read_text()
    for key in ("patch_size", "target_spacing_mm", "normalization", "depth", "batch_size"):
        assert next(line for line in text.splitlines() if line.strip().startswith(f"{key}:")).count("#") == 1, key
    plan_json = json.load(open(output.parent / f"{case}.plan.json"))
    assert plan_json["fingerprint"]["cases"] == 4 and len(plan_json["fingerprint"]["intensity"]) == channels
    if modality[-1:] == ["CT"]:
        assert plan_json["fingerprint"]["intensity"][-1]["foreground"]["median"] > 0  # HU of the structure
    params, model_dir, _ = open_model_dir(str(output), ["training.steps=2", "training.checkpoint_every=2",
                                                        "model.base_filters=4"])
    assert run_training(params, model_dir) == 2
    assert os.path.isfile(os.path.join(model_dir.checkpoints, "ckpt-2.index"))
    yaml.safe_load(text)
