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
