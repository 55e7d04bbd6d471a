"""`medseg export`: the SavedModel of a 2-fold ensemble with mirroring TTA, loaded where medseg_dl cannot be
imported, segments preprocessed volumes of any size exactly as the Predictor and `medseg predict` do, with the
experiment's post-processing decision applied to its labels; with regions it returns their sigmoids and the
regions painted, post-processed per region."""
import json
import os
import subprocess
import sys
import time

import keras
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
import yaml

from conftest import synthetic_dataset, tiny_params, write_nifti
from medseg_dl.config.params import Params
from medseg_dl.data.cases import stored_recipe, subject_case
from medseg_dl.data.convert import convert_dataset
from medseg_dl.data.io import spacing_from_affine
from medseg_dl.data.subjects import Subject
from medseg_dl.data.targets import Targets
from medseg_dl.experiment.model_dir import open_model_dir
from medseg_dl.inference import export, graph_windows, postprocess
from medseg_dl.inference.predict import load_predictor, run_prediction
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.trained import TrainedEnsemble, TrainedModel
from medseg_dl.inference.windows import window_starts
from medseg_dl.training.loop import run_training

# outside medseg_dl: the package must not be importable, and the SavedModel alone segments each volume
SERVE = r"""
import sys
sys.modules["medseg_dl"] = None
try:
    import medseg_dl
except ImportError:
    pass
else:
    raise SystemExit("medseg_dl could be imported")
import json, time
import numpy as np
import tensorflow as tf

folder, names = sys.argv[1], sys.argv[2:]
served = tf.saved_model.load(folder)
seconds = []
for name in names:
    image, spacing_mm = tf.constant(np.load(name + ".npy")), tf.constant(np.load(name + "_spacing_mm.npy"))
    served.serve(image, spacing_mm)  # the first call of a shape may allocate; time the second
    begin = time.perf_counter()
    out = served.serve(image, spacing_mm)
    seconds.append(time.perf_counter() - begin)
    np.savez(name + ".npz", probabilities=out["probabilities"].numpy(), labels=out["labels"].numpy())
print(json.dumps({"seconds": seconds, "recipe": json.load(open(folder + "/assets.extra/recipe.json")),
                  "postprocessing": json.load(open(folder + "/assets.extra/postprocessing.json"))}))
"""
SHAPES = [(9, 14, 11), (23, 17, 20), (12, 12, 12)]  # smaller than the 12^3 patch on x and z, not a multiple, one
SPACING_MM = (0.5, 1.0, 1.5)  # of the new images: islands of class 1 under 4 mm^3 are those under 5.33 voxels
DECISION = {"foreground_largest_component": True, "largest_component_classes": [2], "min_island_mm3": {"1": 4.0}}


def train_folds(tmp_path):
    """<root>/fold_0 and fold_1: the tiny experiment trained 5 steps with two seeds, mirroring TTA on."""
    data = synthetic_dataset(tmp_path / "data")
    root = tmp_path / "experiment"
    for fold, seed in enumerate((3, 4)):
        path = tmp_path / f"fold_{fold}.yaml"
        values = tiny_params(data, root / f"fold_{fold}", training={"steps": 5}, evaluation={"tta_mirroring": True})
        path.write_text(yaml.safe_dump({**values, "seed": seed}))
        params, model_dir, _ = open_model_dir(str(path))
        convert_dataset(params)
        run_training(params, model_dir)
    (root / "postprocessing.json").write_text(json.dumps({**DECISION, "dice_before": [0.5, 0.5]}))
    return root


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.33])
def test_in_graph_window_starts_are_those_of_windows_py(overlap):
    for window in (5, 12, 16, 40):
        sizes = range(window, window + 90)
        graph = [graph_windows.window_starts_in_graph(tf.constant(size), window, overlap).numpy() for size in sizes]
        for size, starts in zip(sizes, graph):
            np.testing.assert_array_equal(starts, window_starts(size, window, overlap), err_msg=f"{size} {window}")


def test_exported_ensemble_segments_like_the_predictor_and_predict_without_medseg_dl(tmp_path, capsys):
    root = train_folds(tmp_path)
    output = tmp_path / "exported"
    (output / "stale").mkdir(parents=True)  # replaced whole
    assert export.run_export([str(root)], "latest", str(output), folds="all") == str(output)
    assert not (output / "stale").exists() and (output / "saved_model.pb").is_file()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]

    predictor, ensemble, decision = load_predictor([str(root)], ["latest"], "all")
    assert len(predictor.networks) == 2 and predictor.tta_mirroring and decision["min_island_mm3"] == {"1": 4.0}
    recipe = stored_recipe(ensemble.params)
    rng = np.random.default_rng(0)
    inputs, images, predictor_seconds = [], [], []
    for shape in SHAPES:
        path = tmp_path / f"new_{shape[0]}.nii.gz"
        write_nifti(path, (rng.normal(0, 1, shape) + 2.0 * (rng.uniform(size=shape) > 0.7)).astype(np.float32),
                    np.diag(SPACING_MM + (1.0,)))
        case = subject_case(Subject(path.name[:-7], [str(path)]), recipe)
        image = case.image
        np.save(tmp_path / f"image_{shape[0]}.npy", image)
        np.save(tmp_path / f"image_{shape[0]}_spacing_mm.npy", spacing_from_affine(case.affine).astype(np.float32))
        predictor.probabilities(image)
        begin = time.perf_counter()
        images.append((predictor.probabilities(image), predictor.labels(image)))
        predictor_seconds.append((time.perf_counter() - begin) / 2)
        inputs.append(str(path))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    served = subprocess.run([sys.executable, "-c", SERVE, str(output)] + [str(tmp_path / f"image_{s[0]}")
                                                                         for s in SHAPES],
                            capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:]
    report = json.loads(served.stdout.strip().splitlines()[-1])
    assert report["postprocessing"] == {**DECISION, "dice_before": [0.5, 0.5]}
    assert report["recipe"]["channels"] == ["img"] and report["recipe"]["class_names"] == ["class_0", "class_1",
                                                                                           "class_2"]
    assert report["recipe"]["recipe"]["preprocessing"]["normalization"] == "zscore"
    assert report["recipe"]["normalization_per_channel"] == [{"channel": "img", "method": "zscore", "ct_stats": None}]
    assert report["recipe"]["windows"]["tta_mirroring"] and len(report["recipe"]["members"]) == 2
    assert "after the post-processing" in report["recipe"]["outputs"]["labels"]

    predicted = run_prediction([str(root)], "latest", inputs, str(tmp_path / "predicted"), folds="all",
                               save_probabilities="float16")
    assert len(predicted) == 2 * len(SHAPES)
    changed = 0
    for shape, (probabilities, labels) in zip(SHAPES, images):
        out = np.load(tmp_path / f"image_{shape[0]}.npz")
        assert out["probabilities"].shape == shape + (3,) and out["labels"].shape == shape
        assert out["probabilities"].dtype == np.float32 and out["labels"].dtype == np.int32
        np.testing.assert_allclose(out["probabilities"], probabilities, atol=1e-3, rtol=0)  # float16 sums (evaluation.accumulation)
        np.testing.assert_array_equal(out["labels"], postprocess.apply(labels, DECISION, SPACING_MM,
                                                                       predictor.targets))
        saved = tmp_path / "predicted" / f"new_{shape[0]}"
        saved_probabilities = np.load(f"{saved}_probabilities.npy")
        assert saved_probabilities.dtype == np.float16  # float16 sums on the host, float16 on disk
        np.testing.assert_allclose(saved_probabilities, out["probabilities"], atol=1e-3, rtol=0)
        np.testing.assert_array_equal(np.asanyarray(nib.load(f"{saved}.nii.gz").dataobj), out["labels"])
        changed += int((labels != out["labels"]).sum())
    assert changed > 0  # the decision changes the arg-max, and the SavedModel applies it as predict does
    with capsys.disabled():
        print("\nexport vs Predictor, 2 folds x 8 flips, seconds per volume: " + ", ".join(
            f"{s}: {e:.3f} vs {p:.3f}" for s, e, p in zip(SHAPES, report["seconds"], predictor_seconds))
            + f"; labels per class {np.bincount(np.concatenate([i[1].ravel() for i in images]), minlength=3)}, "
            f"{changed} voxels changed by the post-processing")


class RegionNetwork(keras.Model):
    """A 1x1x1 convolution of 2 channels to the logits of 3 regions, with weights large enough to paint each."""

    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv3D(3, 1, kernel_initializer=keras.initializers.RandomNormal(0.0, 3.0, seed=5),
                                        bias_initializer=keras.initializers.Constant([2.0, 0.0, -2.0]))

    def call(self, inputs, training=None):
        return self.conv(inputs["image"])


def test_exported_regions_return_their_sigmoids_and_the_regions_painted_and_post_processed(tmp_path):
    """With data.regions the SavedModel returns the Predictor's sigmoid per region and its painted labels,
    post-processed per region (structure s = the s-th region) as postprocess.apply; its recipe carries the
    targets (regions, paint order, ignore label)."""
    regions = [{"name": "whole", "labels": [1, 2, 3], "paint": 1}, {"name": "core", "labels": [2, 3], "paint": 2},
               {"name": "enhancing", "labels": [3], "paint": 3}]
    params = Params.from_dict({"data": {"num_classes": 4, "regions": regions, "ignore_label": 5,
                                        "channels": ["a", "b"]}, "sampling": {"patch_size": [8, 8, 8]},
                               "evaluation": {"tta_mirroring": True, "accumulation": "float32"}})
    network = RegionNetwork()
    network({"image": tf.zeros([1, 8, 8, 8, 2]), "position": tf.zeros([1, 3])})
    predictor = Predictor.from_params(network, params)
    assert predictor.targets.uses_regions
    decision = {"foreground_largest_component": False, "largest_component_classes": [3],
                "min_island_mm3": {"2": 3.0}}
    ensemble = TrainedEnsemble((TrainedModel(params, network, "ckpt-1", 1),))
    export.export_savedmodel(predictor, 2, str(tmp_path / "exported"), export.export_recipe(ensemble, predictor),
                             decision)
    served = tf.saved_model.load(str(tmp_path / "exported"))
    recipe = json.loads((tmp_path / "exported" / export.ASSETS / "recipe.json").read_text())
    assert recipe["targets"] == Targets.from_params(params.data).to_dict() and recipe["targets"]["ignore_label"] == 5
    assert "sigmoid per region" in recipe["outputs"]["probabilities"]
    image = np.random.default_rng(6).normal(size=(13, 9, 11, 2)).astype(np.float32)
    out = served.serve(tf.constant(image), tf.constant([1.0, 1.0, 1.0]))
    labels = predictor.labels(image)
    np.testing.assert_allclose(out["probabilities"].numpy(), predictor.probabilities(image), atol=1e-5)
    expected = postprocess.apply(labels, decision, (1.0, 1.0, 1.0), predictor.targets)
    np.testing.assert_array_equal(out["labels"].numpy(), expected)
    assert set(np.unique(labels)) == {0, 1, 2, 3} and (expected != labels).any()
