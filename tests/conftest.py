"""Shared fixtures: the float32 policy around every test, and writable copies of a few real cases (the shared
data is read-only). Shared functions and paths are in helpers.py."""
import os
import shutil

import pytest

from helpers import BRATS, HIPPO, HIPPO_CASES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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


