"""`medseg plan`: the documented choices for synthetic fingerprints (isotropic MRI, anisotropic 0.7 x 0.7 x 5
mm, CT in HU, two channels), and planned files that validate and train two steps."""
import json
import os
import re

import numpy as np
import nibabel as nib
import pytest
import yaml

from conftest import REPO, write_nifti
from medseg_dl.config.params import Params
from medseg_dl.errors import ParamsError
from medseg_dl.experiment.experiment import open_model_dir
from medseg_dl.planning import planner
from medseg_dl.planning.command import run_plan
from medseg_dl.training.loop import run_training


def fingerprint(spacing, shape, p10_spacing=None, num_classes=3):
    spacing_stats = {"median": spacing, "p10": p10_spacing or spacing, "min": p10_spacing or spacing, "max": spacing}
    return {"spacing_mm": spacing_stats, "shape_vox": {"median": shape}, "num_classes": num_classes, "cases": 10}


def test_isotropic_mri_gets_nnunets_hippocampus_configuration():
    values, why = planner.plan(fingerprint([1.0, 1.0, 1.0], [35, 50, 36]), {}, ["MRI"], None, "h")
    assert values["preprocessing.target_spacing_mm"] is None and "no resampling" in why["preprocessing.target_spacing_mm"]
    assert values["sampling.patch_size"] == [40, 56, 40]  # nnU-Net's 3d_fullres patch for Task04
    assert values["model.depth"] == 4 and values["model.strides"] is None and values["model.kernel_sizes"] is None
    assert values["preprocessing.normalization"] == "zscore"
    assert values["augmentation.rotate"]["max_deg"] == [30.0, 30.0, 30.0]
    assert values["sampling.batch_size"] == planner.CPU_BATCH and values["training.optimizer"] == "adam"


def accuracy_runs():
    """The raw lines of benchmarks/hippocampus_accuracy.py, and those of the planned unet (no settings)."""
    with open(os.path.join(REPO, "benchmarks", "results", "hippocampus_accuracy.jsonl")) as f:
        runs = [json.loads(line) for line in f]
    return runs, [run for run in runs if run["network"] == "unet" and not run["settings"]]


def test_the_cpu_recipes_time_is_its_steps_at_a_measured_step_time():
    """The time the planned training.steps states is the steps at the step time of a kept run of the planned
    hippocampus experiment."""
    values, why = planner.plan(fingerprint([1.0, 1.0, 1.0], [35, 50, 36]), {}, ["MRI"], None, "h")
    minutes, step_s = re.search(r"about (\d+) minutes at the ([\d.]+) s/step", why["training.steps"]).groups()
    assert int(minutes) == round(values["training.steps"] * float(step_s) / 60)
    assert float(step_s) in {run["step_time_s"] for run in accuracy_runs()[1]}


def test_the_cpu_recipes_optimizer_is_the_one_measured_ahead_of_sgd():
    """The planned Adam's reason is the kept comparison: the planned experiment and the same with nnU-Net's SGD,
    1000 steps each; Adam's test Dice is the higher at every checkpoint."""
    runs, planned = accuracy_runs()
    adam = next(run for run in planned if run["steps"] == 1000)
    sgd = next(run for run in runs if run["optimizer"] == "sgd" and run["steps"] == 1000)
    assert sgd["learning_rate"] == planner.GPU_RECIPE["training.learning_rate"][0]
    assert [step for step, _ in adam["curve_test_dice"]] == [step for step, _ in sgd["curve_test_dice"]]
    assert all(a > s for (_, a), (_, s) in zip(adam["curve_test_dice"], sgd["curve_test_dice"]))
    values, why = planner.plan(fingerprint([1.0, 1.0, 1.0], [35, 50, 36]), {}, ["MRI"], None, "h")
    assert values["training.optimizer"] == adam["optimizer"] == "adam"
    assert (f"test Dice {adam['mean_dice']:.3f} against {sgd['mean_dice']:.3f} for nnU-Net's SGD"
            in why["training.optimizer"]) and "ahead at every 200 steps" in why["training.optimizer"]


def test_anisotropic_data_pools_and_rotates_in_plane_only():
    values, why = planner.plan(fingerprint([0.7, 0.7, 5.0], [256, 256, 30], p10_spacing=[0.7, 0.7, 4.0]), {}, ["MRI"],
                               None, "a")
    assert values["preprocessing.target_spacing_mm"] == [0.7, 0.7, 4.0]  # the 10th percentile of the coarse axis
    assert "anisotropic" in why["preprocessing.target_spacing_mm"]
    strides, kernels = values["model.strides"], values["model.kernel_sizes"]
    assert strides[0] == [2, 2, 1] and kernels[0] == [3, 3, 1]  # z is not pooled nor convolved at first
    assert all(s[2] == 1 for s in strides[:2]) and kernels[-1] == [3, 3, 3]
    patch = values["sampling.patch_size"]
    stride = planner.total_stride(strides)
    assert all(p % s == 0 for p, s in zip(patch, stride)) and np.prod(patch) <= planner.CPU_PATCH_VOXELS
    assert values["augmentation.rotate"]["max_deg"] == [0.0, 0.0, 180.0]


def test_ct_and_two_channels_get_one_normalisation_per_channel():
    values, _ = planner.plan(fingerprint([1.0, 1.0, 1.0], [64, 64, 64]), {}, ["CT"], None, "c")
    assert values["preprocessing.normalization"] == "ct"
    values, _ = planner.plan(fingerprint([1.0, 1.0, 1.0], [64, 64, 64]), {"mask_pattern": "m*"}, ["MRI", "CT"], None,
                             "t")
    assert values["preprocessing.normalization"] == ["zscore_mask", "ct"]


def test_a_gpu_budget_sets_patch_and_batch_by_memory():
    values, _ = planner.plan(fingerprint([1.0, 1.0, 1.0], [240, 240, 155]), {}, ["MRI"], 8.0, "g")
    patch, batch = values["sampling.patch_size"], values["sampling.batch_size"]
    strides = values["model.strides"] or [[2, 2, 2]] * (values["model.depth"] - 1)
    assert batch >= 2 and planner.memory_gb(patch, strides, 32, batch) <= 8.0
    assert values["training.optimizer"] == "sgd" and values["model.base_filters"] == 32
    small, _ = planner.plan(fingerprint([1.0, 1.0, 1.0], [240, 240, 155]), {}, ["MRI"], 4.0, "s")
    assert np.prod(small["sampling.patch_size"]) < np.prod(patch)


def synthetic(root, spacing, shape, channels=1, hu=False, cases=4):
    """images/ + labels/: a bright ellipsoid (1) with a core (2); intensities in HU when `hu`."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    for i in range(cases):
        centre = np.array(shape) * np.array(spacing) / 2 + rng.uniform(-2, 2, 3)
        distance = np.linalg.norm((grid - centre) / [6.0, 6.0, 8.0], axis=-1)
        label = (distance < 1).astype(np.uint8) + (distance < 0.5)
        base = np.choose(label, [-900.0, 40.0, 80.0]) if hu else np.choose(label, [0.0, 1.0, 2.0])
        image = np.stack([base + rng.normal(0, 20 if hu else 0.2, shape) * (c + 1) for c in range(channels)], -1)
        affine = np.diag([*spacing, 1.0])
        write_nifti(root / "images" / f"c{i}.nii.gz", image[..., 0] if channels == 1 else image, affine)
        write_nifti(root / "labels" / f"c{i}.nii.gz", label, affine)
    return root


@pytest.mark.parametrize("case, spacing, shape, channels, modality", [
    ("isotropic_mri", [1.0, 1.0, 1.0], (24, 28, 20), 1, []),
    ("anisotropic", [0.7, 0.7, 5.0], (40, 40, 8), 1, []),
    ("ct_hu", [1.0, 1.0, 1.0], (24, 24, 24), 1, ["CT"]),
    ("two_channels", [1.0, 1.0, 1.5], (24, 24, 16), 2, ["MRI", "CT"]),
])
def test_planned_files_validate_and_train_two_steps(tmp_path, case, spacing, shape, channels, modality):
    root = synthetic(tmp_path / case, spacing, shape, channels, hu=modality[-1:] == ["CT"])
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


def test_plan_proposes_the_regions_and_ignore_label_a_dataset_json_declares(tmp_path):
    root = synthetic(tmp_path / "regions", [1.0, 1.0, 1.0], (20, 20, 16), 1, hu=False)
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    for i in range(4):  # nnU-Net v2's raw layout, with the top slab unannotated (label 3 = ignore)
        os.rename(root / "images" / f"c{i}.nii.gz", root / "imagesTr" / f"c{i}_0000.nii.gz")
        label_image = nib.load(root / "labels" / f"c{i}.nii.gz")
        label = np.asarray(label_image.dataobj).copy()
        label[:, :, 12:] = 3
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", label, label_image.affine)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz", "numTraining": 4,
        "labels": {"background": 0, "structure": [1, 2], "core": [2], "ignore": 3}, "regions_class_order": [1, 2]}))
    output = tmp_path / "planned" / "regions.yaml"
    run_plan(str(root), "msd", str(output), overrides=[f"experiment.model_dir={tmp_path / 'run'}"])
    data = Params.load(str(output)).data
    assert data.regions == [{"name": "structure", "labels": [1, 2], "paint": 1},
                            {"name": "core", "labels": [2], "paint": 2}]
    assert data.ignore_label == 3 and data.num_classes == 3 and data.class_names == ["background", "class_1",
                                                                                      "class_2"]
    text = output.read_text()
    assert "regions declared in dataset.json" in next(line for line in text.splitlines() if "regions:" in line)
    assert "(below the ignore label)" in text and "the 'ignore' label of dataset.json" in text


def test_plan_reads_set_with_the_grammar_of_every_command(tmp_path):
    """`medseg plan --set` is parsed as the other commands' (`parse_override`): spaces around the key, a
    value that is not YAML kept as a string, and a missing "=" a one-line error naming the fix."""
    root = synthetic(tmp_path / "data", [1.0, 1.0, 1.0], (24, 28, 20), 1)
    output = tmp_path / "planned.yaml"
    run_plan(str(root), "images_labels", str(output),
             overrides=[f"experiment.model_dir={tmp_path / 'run'}", " data.channels = [t1]", "experiment.name=[x"])
    params = Params.load(str(output))
    assert params.data.channels == ["t1"] and params.experiment.name == "[x"
    with pytest.raises(ParamsError, match=r"^--set 'data\.workers': expected section\.key=value"):
        run_plan(str(root), "images_labels", str(output), overrides=["data.workers"])
