"""Shared fixtures: copies of a few real cases (the shared data is read-only) and synthetic volumes."""
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
HIPPO = os.path.join(DATA, "msd_hippocampus")
BRATS = os.path.join(DATA, "brats2015_deepmedic")
HIPPO_CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]


@pytest.fixture(autouse=True)
def float32_policy():
    """Every test starts and ends with Keras' float32 policy: training sets the global policy (precision "auto"
    is mixed_bfloat16 on a CPU with AVX512-BF16 or AMX), which would leak into the tests that follow."""
    import keras
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def hippo_dir(tmp_path):
    """A writable images/ + labels/ folder with four real hippocampus cases (003 has a float label)."""
    root = tmp_path / "hippo"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
        for case in HIPPO_CASES:
            shutil.copy(os.path.join(HIPPO, sub, case + ".nii.gz"), root / sub)
    return root


@pytest.fixture
def brats_subject_dir(tmp_path):
    """A subject_folders layout with one real BraTS subject."""
    source = os.path.join(BRATS, "train", "brats_2013_pat0005_1")
    target = tmp_path / "brats" / "brats_2013_pat0005_1"
    shutil.copytree(source, target)
    return tmp_path / "brats"


def hippo_params(root, model_dir, **sections):
    """A params dict for the hippocampus layout in `root`, merged with `sections`."""
    params = {"experiment": {"name": "t", "model_dir": str(model_dir)},
              "data": {"source_dir": str(root), "layout": "images_labels", "channels": ["mri"],
                       "num_classes": 3, "workers": 1, "split": {"val": 0.25, "test": 0.0}}}
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    return params


def write_nifti(path, data, affine=None):
    """Save `data` as NIfTI with `affine` (identity by default)."""
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def synthetic_dataset(root, cases=4, shape=(20, 20, 20), seed=0):
    """images/ + labels/ of `cases` noisy volumes with a bright sphere (label 1) and a dark cube (label 2)."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    for i in range(cases):
        centre = rng.uniform(6, np.array(shape) - 6)
        label = np.zeros(shape, np.uint8)
        label[np.linalg.norm(grid - centre, axis=-1) < 4] = 1
        corner = rng.integers(1, np.array(shape) - 6)
        cube = tuple(slice(c, c + 4) for c in corner)
        label[cube] = np.where(label[cube] == 0, 2, label[cube])
        image = np.choose(label, [0.0, 2.0, -2.0]) + rng.normal(0, 0.3, shape)
        write_nifti(root / "images" / f"case_{i:02d}.nii.gz", image.astype(np.float32))
        write_nifti(root / "labels" / f"case_{i:02d}.nii.gz", label)
    return root


def tiny_params(root, model_dir, **sections):
    """A params dict for a tiny, fast experiment on `synthetic_dataset(root)`."""
    params = {"seed": 3, "experiment": {"name": "tiny", "model_dir": str(model_dir)},
              "data": {"source_dir": str(root), "layout": "images_labels", "channels": ["img"],
                       "num_classes": 3, "workers": 1, "split": {"val": 0.25}},
              "sampling": {"patch_size": [12, 12, 12], "batch_size": 2, "samples_per_volume": 2},
              "model": {"architecture": "unet", "base_filters": 4, "depth": 2},
              "training": {"steps": 20, "learning_rate": 0.01, "checkpoint_every": 5, "keep_last": 2,
                           "log_every": 5, "image_summary_every": 10}}
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    return params
