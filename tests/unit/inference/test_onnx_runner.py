"""The numpy runner of the ONNX export (inference/onnx_runner.py, copied as segment.py): it cannot import
windows.py or the predictor, so its window grid and flips are checked equal to theirs."""
import numpy as np

from medseg_dl.inference import onnx_runner
from medseg_dl.inference.predictor import MIRROR_AXES
from medseg_dl.inference.windows import window_grid


def test_the_onnx_runners_window_grid_is_that_of_windows_py():
    """segment.py cannot import windows.py: its grid (padding, starts, positions, coverages) must equal it."""
    for shape in [(9, 14, 11), (40, 33, 17), (12, 12, 12), (97, 5, 64)]:
        for patch in [(12, 12, 12), (16, 8, 24), (5, 5, 5)]:
            for overlap, blending in [(0.5, "gaussian"), (0.0, "constant"), (0.33, "gaussian"), (0.25, "constant")]:
                expected = window_grid(shape, patch, overlap, blending)
                padding, starts, positions, coverages = onnx_runner.grid(shape, patch, overlap, blending)
                np.testing.assert_array_equal(padding, expected.padding_vox)
                np.testing.assert_array_equal(starts, expected.starts_vox)
                np.testing.assert_array_equal(positions, expected.positions)
                for got, want in zip(coverages, expected.coverage):
                    np.testing.assert_array_equal(got, want)


def test_the_onnx_runners_flips_are_the_predictors_in_its_order():
    """segment.py sums network.onnx's outputs over the flips in the order the Predictor sums them."""
    assert [list(axes) for axes in onnx_runner.MIRROR_AXES] == MIRROR_AXES and len(MIRROR_AXES) == 8
