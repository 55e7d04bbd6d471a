"""The image summary of the training process: the predicted label is painted by the Targets."""
import numpy as np

from medseg_dl.config.params import Params
from medseg_dl.data.targets import Targets
from medseg_dl.training.reporting import mid_slice_images

REGIONS = [{"name": "outer", "labels": [1, 2], "paint": 1}, {"name": "inner", "labels": [2], "paint": 2}]


def test_mid_slice_images_paint_the_regions_and_scale_by_the_largest_label():
    targets = Targets.from_params(Params.from_dict({"data": {"num_classes": 3, "regions": REGIONS,
                                                             "ignore_label": 3}}).data)
    image = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2, 1)
    label = np.zeros((1, 3, 2, 2), np.uint8)
    label[0, 1] = [[0, 1], [2, 3]]  # the middle x-slice; 3 is ignored
    logits = np.zeros((1, 3, 2, 2, 2), np.float32)
    logits[0, 1, ..., 0] = [[-1, 1], [1, 1]]  # outer
    logits[0, 1, ..., 1] = [[1, -1], [1, -1]]  # inner, painted over outer
    images = mid_slice_images({"image": image, "label": label}, logits, targets)
    assert images.shape == (3, 2, 2, 1) and images.dtype == np.float32
    np.testing.assert_array_equal(images[1, ..., 0], [[0, 0.5], [1, 1]])
    np.testing.assert_array_equal(images[2, ..., 0], [[1, 0.5], [1, 0.5]])
