"""The tiny experiment end to end on real hippocampus cases: convert (in a process pool), train, evaluate, predict,
show, run as a user runs them (helpers.USER_ENV), none printing TensorFlow C++ chatter or a leaked semaphore."""
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np

from helpers import REPO, USER_ENV, synthetic_dataset, tensorflow_noise, tiny_params, write_nifti

ENV = {**USER_ENV, "PYTHONPATH": REPO}


def medseg(*args, timeout=300):
    result = subprocess.run([sys.executable, "-m", "medseg_dl.cli", *args], capture_output=True, text=True,
                            env=ENV, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    noise = tensorflow_noise(result.stderr)
    assert not noise, f"medseg {args[0]} printed:\n" + "\n".join(noise)
    return result.stdout


def test_tiny_experiment_end_to_end(hippo_dir, tmp_path):
    run = tmp_path / "run"
    settings = ["--set", f"experiment.model_dir={run}", "--set", f"data.source_dir={hippo_dir}"]
    medseg("convert", "--params", os.path.join(REPO, "params", "tiny.yaml"), "--set", "data.workers=2", *settings)
    own = str(run / "params.yaml")
    medseg("train", "--params", own)
    summary = json.loads(medseg("evaluate", "--params", own, "--once", "--checkpoint", "latest").splitlines()[-1])
    assert summary["step"] == 10 and set(summary["dice"]) == {"anterior", "posterior"}
    image = hippo_dir / "images" / "hippocampus_006.nii.gz"
    medseg("predict", "--model-dir", str(run), "--checkpoint", "latest", "--input", str(image),
           "--output", str(tmp_path / "pred"))
    source, predicted = nib.load(str(image)), nib.load(str(tmp_path / "pred" / "hippocampus_006.nii.gz"))
    assert predicted.shape == source.shape
    np.testing.assert_array_equal(predicted.affine, source.affine)
    assert set(np.unique(np.asanyarray(predicted.dataobj))) <= {0, 1, 2}
    medseg("show", "--curves", str(run), "--out", str(tmp_path / "curves.png"))
    medseg("show", str(image), "--label", str(hippo_dir / "labels" / "hippocampus_006.nii.gz"),
           "--prediction", str(tmp_path / "pred" / "hippocampus_006.nii.gz"), "--out", str(tmp_path / "o.png"))
    medseg("show", "--batch", "--params", own, "--out", str(tmp_path / "batch.png"))
    for png in ("curves.png", "o.png", "batch.png"):
        assert (tmp_path / png).stat().st_size > 10000


def test_predict_maps_back_to_an_oblique_resampled_input(tmp_path):
    root = synthetic_dataset(tmp_path / "data", shape=(20, 22, 18))
    params_path = tmp_path / "exp.yaml"
    import yaml
    params_path.write_text(yaml.safe_dump(tiny_params(root, tmp_path / "run", training={"steps": 2},
                                                      preprocessing={"target_spacing_mm": [1.5, 1.5, 1.5],
                                                                     "reorient_ras": True})))
    medseg("train", "--params", str(params_path))
    affine = np.array([[-0.9, 0, 0, 40], [0, 0, 1.2, -10], [0, 1.1, 0, 5], [0, 0, 0, 1]])
    data = np.asanyarray(nib.load(str(root / "images" / "case_00.nii.gz")).dataobj)
    write_nifti(tmp_path / "new.nii.gz", data, affine)
    medseg("predict", "--model-dir", str(tmp_path / "run"), "--checkpoint", "latest",
           "--input", str(tmp_path / "new.nii.gz"), "--output", str(tmp_path / "out"))
    predicted = nib.load(str(tmp_path / "out" / "new.nii.gz"))
    assert predicted.shape == data.shape
    np.testing.assert_allclose(predicted.affine, affine)


def test_accuracy_benchmark_fills_a_time_budget_and_scores_the_test_split(hippo_dir, tmp_path):
    """benchmarks/hippocampus_accuracy.py --minutes: calibration run, steps set to fill the budget,
    the held-out case scored, one JSON line."""
    tiny = ["model.base_filters=4", "model.depth=2", "sampling.batch_size=2", "sampling.patch_size=[16,16,16]",
            "evaluation.tta_mirroring=false", "data.workers=1"]
    command = [sys.executable, os.path.join(REPO, "benchmarks", "hippocampus_accuracy.py"), "--minutes", "0.1",
               "--data", str(hippo_dir), "--model-dir", str(tmp_path / "accuracy"),
               *[a for s in tiny for a in ("--set", s)]]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["network"] == "unet" and result["test_cases"] == 1 and result["steps"] >= 10
    assert 0.0 <= result["mean_dice"] <= 1.0 and {"dice_anterior", "hd95_mm_posterior"} <= set(result)
    assert result["curve_test_dice"][-1][0] == result["steps"] and result["optimizer"] == "adam"
    assert sorted(os.listdir(tmp_path / "accuracy")) == ["converted", "planned.plan.json", "planned.yaml", "unet"]
