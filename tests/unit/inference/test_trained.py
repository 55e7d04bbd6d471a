"""Which folders make an ensemble (`--model-dir D [D ...] [--folds ...]`) and what they must share."""
import os

import pytest
import yaml

from helpers import fold_root
from medseg_dl.config.params import Params
from medseg_dl.errors import ParamsError
from medseg_dl.experiment.experiment import Experiment
from medseg_dl.experiment.model_dir import ModelDir
from medseg_dl.inference.trained import load_ensemble, resolve_members


def test_members_and_the_experiment_of_the_post_processing_decision(tmp_path):
    root = fold_root(tmp_path)
    folders, decider = resolve_members([str(root)], "all")
    assert folders == [ModelDir(str(root / f"fold_{k}")) for k in (0, 2, 10)] and decider == Experiment(str(root))
    one = str(root / "fold_0")
    assert resolve_members([one]) == ([ModelDir(one)], Experiment(one))
    assert resolve_members([one, str(root / "fold_2")]) == ([ModelDir(one), ModelDir(str(root / "fold_2"))], None)
    with pytest.raises(ParamsError, match="add --folds all"):
        resolve_members([str(root)])
    with pytest.raises(ParamsError, match="one experiment root"):
        resolve_members([one, str(root / "fold_2")], "all")


def write_params(folder, **sections):
    values = {"experiment": {"model_dir": str(folder)}, "data": {"channels": ["t1"], "num_classes": 3},
              "sampling": {"patch_size": [16, 16, 16]}}
    for section, settings in sections.items():
        values.setdefault(section, {}).update(settings)
    os.makedirs(folder, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(values))
    return ModelDir(str(folder))


@pytest.mark.parametrize("sections, key", [
    ({"sampling": {"patch_size": [16, 16, 8]}}, "sampling.patch_size"),
    ({"data": {"num_classes": 2}}, "data.num_classes"),
    ({"data": {"channels": ["t2"]}}, "data.channels"),
    ({"preprocessing": {"target_spacing_mm": [1.0, 1.0, 1.0]}}, "preprocessing.target_spacing_mm"),
])
def test_members_must_share_window_classes_channels_and_preprocessing(tmp_path, sections, key):
    """Checked from the params before any checkpoint is read: one line naming both folders."""
    first, second = write_params(tmp_path / "a"), write_params(tmp_path / "b", **sections)
    with pytest.raises(ParamsError, match=f"differ in {key}: {first.root} has .*, {second.root} has ") as error:
        load_ensemble([first, second], "latest")
    assert "\n" not in str(error.value)
    params = [Params.load(f.params_path) for f in (first, second)]
    with pytest.raises(ParamsError, match=f"differ in {key}"):
        load_ensemble([first, second], "latest", params)


def test_a_checkpoint_path_is_one_per_member(tmp_path):
    first, second = write_params(tmp_path / "a"), write_params(tmp_path / "b")
    with pytest.raises(ParamsError, match=r"one value \(auto, best, latest or a checkpoint path\) per model folder"):
        load_ensemble([first, second], "a/checkpoints/ckpt-5")
    with pytest.raises(ParamsError, match="per model folder"):
        load_ensemble([first, second], ["best", "latest", "a/checkpoints/ckpt-5"])
