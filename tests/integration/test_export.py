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

from helpers import synthetic_dataset, tiny_params, write_nifti
from medseg_dl.config.params import Params
from medseg_dl.data.cases import stored_recipe, subject_case
from medseg_dl.data.convert import convert_dataset
from medseg_dl.data.io import spacing_from_affine
from medseg_dl.data.subjects import Subject
from medseg_dl.data.targets import Targets
from medseg_dl.errors import MedsegError
from medseg_dl.experiment.experiment import open_model_dir
from medseg_dl.inference import export, onnx_runner, postprocess
from medseg_dl.inference.onnx_export import export_onnx
from medseg_dl.inference.predict import load_predictor, run_prediction
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.trained import TrainedEnsemble, TrainedModel
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
print(json.dumps({"seconds": seconds, "metadata": json.load(open(folder + "/metadata.json"))}))
"""
# the ONNX export's runner where neither TensorFlow nor medseg_dl can be imported
SEGMENT = r"""
import sys
sys.modules["tensorflow"] = sys.modules["medseg_dl"] = None
folder, names = sys.argv[1], sys.argv[2:]
sys.path.insert(0, folder)
import json
import numpy as np
import segment

segmenter = segment.OnnxSegmenter(folder)
for name in names:
    probabilities, labels = segmenter.segment(np.load(name + ".npy"), np.load(name + "_spacing_mm.npy"))
    np.savez(name + "_onnx.npz", probabilities=probabilities, labels=labels)
print(json.dumps(segmenter.metadata))
"""
SHAPES = [(9, 14, 11), (23, 17, 20), (12, 12, 12)]  # smaller than the 12^3 patch on x and z, not a multiple, one
SPACING_MM = (0.5, 1.0, 1.5)  # of the new images: islands of class 1 under 4 mm^3 are those under 5.33 voxels
DECISION = {"foreground_largest_component": True, "largest_component_classes": [2], "min_island_mm3": {"1": 4.0}}


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    """<root>/fold_0 and fold_1: the tiny experiment trained 5 steps with two seeds, mirroring TTA on, and the
    post-processing DECISION at the root."""
    tmp_path = tmp_path_factory.mktemp("folds")
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


def new_images(tmp_path, recipe):
    """(input paths, preprocessed images) of three new volumes of SHAPES with SPACING_MM; each image also saved
    as <tmp_path>/image_<x>.npy with its spacing_mm beside it."""
    rng = np.random.default_rng(0)
    inputs, images = [], []
    for shape in SHAPES:
        path = tmp_path / f"new_{shape[0]}.nii.gz"
        write_nifti(path, (rng.normal(0, 1, shape) + 2.0 * (rng.uniform(size=shape) > 0.7)).astype(np.float32),
                    np.diag(SPACING_MM + (1.0,)))
        case = subject_case(Subject(path.name[:-7], [str(path)]), recipe)
        np.save(tmp_path / f"image_{shape[0]}.npy", case.image)
        np.save(tmp_path / f"image_{shape[0]}_spacing_mm.npy", spacing_from_affine(case.affine).astype(np.float32))
        inputs.append(str(path))
        images.append(case.image)
    return inputs, images


def outside(script, folder, tmp_path):
    """Run `script` on the export `folder` and the saved images in a fresh process; returns its last line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script, str(folder)] + [str(tmp_path / f"image_{s[0]}")
                                                                        for s in SHAPES],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_metadata(metadata, export_format):
    assert metadata["format"] == export_format and metadata["postprocessing"] == {**DECISION, "dice_before": [0.5, 0.5]}
    assert metadata["channels"] == ["img"] and metadata["class_names"] == ["class_0", "class_1", "class_2"]
    assert metadata["recipe"]["preprocessing"]["normalization"] == "zscore"
    assert metadata["normalization_per_channel"] == [{"channel": "img", "method": "zscore", "ct_stats": None}]
    assert metadata["windows"]["tta_mirroring"] and len(metadata["members"]) == 2
    data_format = metadata["network_data_format"]
    assert data_format["inputs"]["image"]["num_channels"] == 1 and data_format["outputs"]["probabilities"][
        "channel_def"] == {"0": "class_0", "1": "class_1", "2": "class_2"}
    assert "after the post-processing" in data_format["outputs"]["labels"]["description"]


def test_exported_ensemble_segments_like_the_predictor_and_predict_without_medseg_dl(folds, tmp_path, capsys):
    root = folds
    output = tmp_path / "exported"
    (output / "stale").mkdir(parents=True)  # replaced whole
    assert export.run_export([str(root)], "latest", str(output), folds="all") == str(output)
    assert not (output / "stale").exists() and (output / "saved_model.pb").is_file()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]

    predictor, ensemble, decision = load_predictor([str(root)], ["latest"], "all")
    assert len(predictor.networks) == 2 and predictor.tta_mirroring and decision["min_island_mm3"] == {"1": 4.0}
    inputs, preprocessed = new_images(tmp_path, stored_recipe(ensemble.params))
    images, predictor_seconds = [], []
    for image in preprocessed:
        predictor.probabilities(image)
        begin = time.perf_counter()
        images.append((predictor.probabilities(image), predictor.labels(image)))
        predictor_seconds.append((time.perf_counter() - begin) / 2)

    report = outside(SERVE, output, tmp_path)
    check_metadata(report["metadata"], "savedmodel")

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
    """A 1x1x1 convolution of 2 channels to the logits of 3 regions, with weights large enough to paint each, plus
    a term of the window's position (x, y, z for the 3 regions): a mirrored flip needs its mirrored position."""

    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv3D(3, 1, kernel_initializer=keras.initializers.RandomNormal(0.0, 3.0, seed=5),
                                        bias_initializer=keras.initializers.Constant([2.0, 0.0, -2.0]))

    def call(self, inputs, training=None):
        return self.conv(inputs["image"]) + 4.0 * (inputs["position"][:, None, None, None, :] - 0.5)


def served_outputs(folder, export_format, image, spacing_mm):
    """(probabilities, labels) numpy of an export of `export_format` in `folder` for `image`."""
    if export_format == "onnx":
        return onnx_runner.OnnxSegmenter(str(folder)).segment(image, spacing_mm)
    served = tf.saved_model.load(str(folder))  # held: its functions read its variables
    out = served.serve(tf.constant(image), tf.constant(spacing_mm, tf.float32))
    return out["probabilities"].numpy(), out["labels"].numpy()


@pytest.mark.parametrize("export_format, tta_mirroring", [("savedmodel", True), ("onnx", True), ("onnx", False)])
def test_exported_regions_return_their_sigmoids_and_the_regions_painted_and_post_processed(tmp_path, export_format,
                                                                                          tta_mirroring):
    """With data.regions the SavedModel and the ONNX runner return the Predictor's sigmoid per region and its
    painted labels, post-processed per region (structure s = the s-th region) as postprocess.apply; the
    metadata carries the targets (regions, paint order, ignore label). The ONNX export of one network without
    mirroring has no combine.onnx: network.onnx gives its logits."""
    regions = [{"name": "whole", "labels": [1, 2, 3], "paint": 1}, {"name": "core", "labels": [2, 3], "paint": 2},
               {"name": "enhancing", "labels": [3], "paint": 3}]
    params = Params.from_dict({"data": {"num_classes": 4, "regions": regions, "ignore_label": 5,
                                        "channels": ["a", "b"]}, "sampling": {"patch_size": [8, 8, 8]},
                               "evaluation": {"tta_mirroring": tta_mirroring, "accumulation": "float32"}})
    network = RegionNetwork()
    network({"image": tf.zeros([1, 8, 8, 8, 2]), "position": tf.zeros([1, 3])})
    predictor = Predictor.from_params(network, params)
    assert predictor.targets.uses_regions
    decision = {"foreground_largest_component": False, "largest_component_classes": [3],
                "min_island_mm3": {"2": 3.0}}
    ensemble = TrainedEnsemble((TrainedModel(params, network, "ckpt-1", 1),))
    write = export_onnx if export_format == "onnx" else export.export_savedmodel
    metadata = export.export_metadata(ensemble, predictor, decision, export_format)
    write(predictor, 2, str(tmp_path / "exported"), metadata, decision)
    metadata = json.loads((tmp_path / "exported" / export.METADATA).read_text())
    assert (tmp_path / "exported" / "combine.onnx").exists() == (export_format == "onnx" and tta_mirroring)
    assert metadata["targets"] == Targets.from_params(params.data).to_dict()
    assert metadata["targets"]["ignore_label"] == 5
    assert "sigmoid per region" in metadata["network_data_format"]["outputs"]["probabilities"]["description"]
    assert metadata["network_data_format"]["outputs"]["probabilities"]["channel_def"] == {
        "0": "whole", "1": "core", "2": "enhancing"}
    image = np.random.default_rng(6).normal(size=(13, 9, 11, 2)).astype(np.float32)
    probabilities, served_labels = served_outputs(tmp_path / "exported", export_format, image, [1.0, 1.0, 1.0])
    labels = predictor.labels(image)
    np.testing.assert_allclose(probabilities, predictor.probabilities(image), atol=1e-5)
    expected = postprocess.apply(labels, decision, (1.0, 1.0, 1.0), predictor.targets)
    np.testing.assert_array_equal(served_labels, expected)
    assert set(np.unique(labels)) == {0, 1, 2, 3} and (expected != labels).any()


def test_onnx_export_segments_like_the_predictor_where_tensorflow_cannot_be_imported(folds, tmp_path, capsys):
    """`medseg export --format onnx` of the 2-fold ensemble with mirroring TTA and a decision: its runner, in a
    process where neither TensorFlow nor medseg_dl can be imported, gives the Predictor's labels (float32
    sums) post-processed by the decision, and its probabilities within 1e-4."""
    output = tmp_path / "onnx"
    (output / "stale").mkdir(parents=True)  # replaced whole
    assert export.run_export([str(folds)], "latest", str(output), folds="all", export_format="onnx") == str(output)
    assert sorted(os.listdir(output)) == ["combine.onnx", "finish.onnx", "metadata.json", "network.onnx", "segment.py"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    predictor, ensemble, _ = load_predictor([str(folds)], ["latest"], "all", ["evaluation.accumulation=float32"])
    _, images = new_images(tmp_path, stored_recipe(ensemble.params))
    check_metadata(outside(SEGMENT, output, tmp_path), "onnx")
    changed, largest = 0, 0.0
    for shape, image in zip(SHAPES, images):
        out = np.load(tmp_path / f"image_{shape[0]}_onnx.npz")
        assert out["probabilities"].shape == shape + (3,) and out["labels"].dtype == np.int32
        probabilities, labels = predictor.probabilities(image), predictor.labels(image)
        largest = max(largest, float(np.abs(out["probabilities"] - probabilities).max()))
        np.testing.assert_allclose(out["probabilities"], probabilities, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(out["labels"], postprocess.apply(labels, DECISION, SPACING_MM,
                                                                       predictor.targets))
        changed += int((labels != out["labels"]).sum())
    assert changed > 0  # the decision is applied by finish.onnx
    with capsys.disabled():
        print(f"\nONNX runner vs Predictor: largest probability difference {largest:.2e}, "
              f"{changed} voxels changed by the post-processing")


@pytest.mark.parametrize("missing, command", [("tf2onnx", "export"), ("highdicom", "predict")])
def test_a_missing_optional_package_is_one_line_naming_the_extra_before_any_work(tmp_path, monkeypatch, missing,
                                                                               command):
    """Without tf2onnx (the onnx extra) `export --format onnx`, and without highdicom (the dicom extra)
    `predict --dicom-seg`, stop before loading a model with the pip command to run."""
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` raises ImportError
    for module in ("medseg_dl.inference.onnx_export", "medseg_dl.inference.dicom_seg"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    nowhere = str(tmp_path / "no-model")  # loading it would be a different error
    with pytest.raises(MedsegError) as err:
        if command == "export":
            export.run_export(nowhere, "latest", str(tmp_path / "out"), export_format="onnx")
        else:
            run_prediction(nowhere, "latest", [nowhere], str(tmp_path / "out"), dicom_seg=True)
    extra = "onnx" if missing == "tf2onnx" else "dicom"
    assert str(err.value) == (f"medseg {command} {'--format onnx' if command == 'export' else '--dicom-seg'} needs "
                              f"{missing}, which is not installed; pip install 'medseg_dl[{extra}]'")
    assert not (tmp_path / "out").exists()
