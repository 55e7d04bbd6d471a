"""One subject to one preprocessed case (data/cases.py): the path of convert, evaluate --data and predict."""
import numpy as np
import pytest

from helpers import hippo_params, write_nifti
from medseg_dl.config.params import Params
from medseg_dl.data.cases import recipe_from_params, subject_case
from medseg_dl.errors import DataError
from medseg_dl.inference.predict import input_subjects


def test_2d_image_in_prediction(tmp_path):
    """predict's path: its input subject (no label) through `subject_case`, as `run_prediction` does."""
    write_nifti(tmp_path / "slice.nii.gz", np.random.rand(8, 47).astype(np.float32))
    params = Params.from_dict(hippo_params(tmp_path, tmp_path / "run"))
    [subject] = input_subjects([str(tmp_path / "slice.nii.gz")], params.data)
    with pytest.raises(DataError, match=r"slice.nii.gz: image of shape \(8, 47\); medseg_dl segments 3D volumes"):
        subject_case(subject, recipe_from_params(params))
