"""Whole-volume sliding-window inference (medseg_dl.inference) against independent whole-volume passes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.data.targets import Region, Targets
from medseg_dl.errors import DataError, ParamsError
from medseg_dl.inference import windows
from medseg_dl.inference.predictor import Predictor

EXACT = {"accumulation": "float32"}  # the tests of the recombination's arithmetic: float32 sums
# BraTS's nested regions over labels 1 (edema), 2 (necrosis), 3 (enhancing), painted in this order
REGIONS = Targets(4, ("background", "edema", "necrosis", "enhancing"),
                  (Region("whole", (1, 2, 3), 1), Region("core", (2, 3), 2), Region("enhancing", (3,), 3)))


def conv_network(kernel):
    """A translation-equivariant network: one fixed 3D convolution with 'same' zero padding."""
    kernel = tf.constant(kernel)
    return lambda inputs: tf.nn.conv3d(inputs["image"], kernel, [1] * 5, "SAME")


def random_kernel(seed, channels=2, outputs=3):
    return np.random.default_rng(seed).normal(size=(3, 3, 3, channels, outputs)).astype(np.float32)


def classes(k):
    """The targets of k exclusive classes (one softmax)."""
    return Targets(k, tuple(f"class_{c}" for c in range(k)))


def whole_volume_probabilities(network, image):
    logits = network({"image": image[None], "position": np.full((1, 3), 0.5, np.float32)})
    return tf.nn.softmax(logits, axis=-1).numpy()[0]


def exact_voxels(grid):
    """Per axis, the original coordinates that no window has on a border inside the padded volume.

    A 3x3x3 'same' convolution of a window equals the whole-volume one except on the window's faces
    that lie inside the volume (there the window pads zeros where the volume has data); a voxel off
    every such face gets the whole-volume value from each window that covers it.
    """
    good = []
    for axis in range(3):
        padded = grid.padded_shape_vox[axis]
        faces = {s for s in grid.starts_vox[:, axis] if s > 0}
        faces |= {s + grid.patch_size_vox[axis] - 1 for s in grid.starts_vox[:, axis]
                  if s + grid.patch_size_vox[axis] < padded}
        before = grid.padding_vox[axis, 0]
        good.append(np.array([v for v in range(grid.shape_vox[axis]) if v + before not in faces]))
    return np.ix_(*good)


@pytest.mark.parametrize("shape", [(37, 30, 21), (20, 11, 16)])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("blending", ["gaussian", "constant"])
def test_equivariant_network_matches_a_whole_volume_pass_off_the_window_faces(shape, overlap, blending):
    image = np.random.default_rng(2).normal(size=shape + (2,)).astype(np.float32)
    network = conv_network(random_kernel(3))
    predictor = Predictor(network, (16, 12, 16), classes(3), overlap=overlap, blending=blending, batch_size=3,
                          **EXACT)
    result = predictor.probabilities(image)
    reference = whole_volume_probabilities(network, image)
    region = exact_voxels(windows.window_grid(shape, (16, 12, 16), overlap, blending))
    assert result.shape == shape + (3,) and result.dtype == np.float32
    assert result[region].size > 0.4 * result.size
    np.testing.assert_allclose(result[region], reference[region], atol=2e-6)
    np.testing.assert_allclose(result.sum(axis=-1), 1.0, atol=1e-5)
    if overlap == 0.0 and blending == "constant":  # on a face the window's zero padding shows
        assert np.abs(result - reference).max() > 1e-3


def test_labels_are_the_argmax_of_the_probabilities():
    image = np.random.default_rng(4).normal(size=(26, 19, 17, 2)).astype(np.float32)
    predictor = Predictor(conv_network(random_kernel(5)), (16, 16, 16), classes(3))
    labels = predictor.labels(image)
    assert labels.dtype == np.uint8 and labels.shape == image.shape[:3]
    np.testing.assert_array_equal(labels, np.argmax(predictor.probabilities(image), axis=-1))


def test_a_fortran_ordered_image_is_windowed_from_a_c_ordered_copy_with_the_same_result(monkeypatch):
    """nibabel reads volumes in Fortran order; windows cut from one would be transposing copies (7x slower on
    a BraTS volume), so the Predictor hands the windowing a C-ordered copy, and only then."""
    image = np.random.default_rng(4).normal(size=(26, 19, 17, 2)).astype(np.float32)
    predictor = Predictor(conv_network(random_kernel(5)), (16, 16, 16), classes(3))
    expected = predictor.probabilities(image)
    seen = []
    recombined_slabs = windows.recombined_slabs
    monkeypatch.setattr(windows, "recombined_slabs", lambda fn, volume, *rest: seen.append(volume) or
                        recombined_slabs(fn, volume, *rest))
    for given in (np.asfortranarray(image), image):
        np.testing.assert_array_equal(predictor.probabilities(given), expected)
    assert all(volume.flags["C_CONTIGUOUS"] for volume in seen) and seen[1] is image


def symmetric_kernel(seed):
    kernel = random_kernel(seed)
    flips = [np.flip(kernel, axes) if axes else kernel for axes in
             [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]]
    return np.mean(flips, axis=0).astype(np.float32)


@pytest.mark.parametrize("blending", ["gaussian", "constant"])
def test_mirroring_changes_nothing_for_a_mirror_symmetric_network(blending):
    image = np.random.default_rng(6).normal(size=(30, 22, 18, 2)).astype(np.float32)
    network = conv_network(symmetric_kernel(7))
    plain = Predictor(network, (16, 16, 16), classes(3), blending=blending, **EXACT).probabilities(image)
    mirrored = Predictor(network, (16, 16, 16), classes(3), blending=blending, tta_mirroring=True,
                         **EXACT).probabilities(image)
    np.testing.assert_allclose(mirrored, plain, atol=2e-6)


def test_mirroring_averages_the_probabilities_of_the_8_flips():
    """One window covering the volume: the result is the mean of the 8 flipped-back softmax outputs."""
    image = np.random.default_rng(8).normal(size=(16, 16, 16, 2)).astype(np.float32)
    network = conv_network(random_kernel(9))
    reference = np.mean([np.flip(whole_volume_probabilities(network, np.flip(image, axes).copy()), axes)
                         for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]], axis=0)
    mirrored = Predictor(network, (16, 16, 16), classes(3), tta_mirroring=True, **EXACT).probabilities(image)
    plain = Predictor(network, (16, 16, 16), classes(3), **EXACT).probabilities(image)
    np.testing.assert_allclose(mirrored, reference, atol=2e-6)
    assert np.abs(plain - reference).max() > 1e-2  # the kernel is not symmetric: mirroring matters


def test_network_receives_the_window_positions():
    """Logits 10 * position: without overlap each voxel gets softmax(10 * its window's centre)."""
    network = lambda inputs: 10.0 * tf.broadcast_to(inputs["position"][:, None, None, None, :],
                                                    tf.concat([tf.shape(inputs["image"])[:4], [3]], 0))
    image = np.zeros((32, 16, 10, 1), np.float32)
    result = Predictor(network, (16, 16, 16), classes(3), overlap=0.0, **EXACT).probabilities(image)
    x = np.arange(32)
    centres = np.stack([(16 * (x // 16) + 7.5) / 31, np.full(32, 7.5 / 15), np.full(32, 0.5)], axis=-1)
    expected = tf.nn.softmax(10.0 * centres, axis=-1).numpy()
    np.testing.assert_allclose(result[:, 3, 4], expected, atol=1e-6)


def test_mirroring_gives_each_flipped_window_its_mirrored_position():
    """The network reads from the window position it is given each voxel's normalised coordinate c
    (position + offset from the window middle / (shape - 1)) and returns logits 10 |c - 0.5|: symmetric
    under c -> 1 - c. A flipped window, given its position mirrored on the flipped axes, predicts (flipped
    back) exactly what the unflipped window does, so the 8-flip average equals the plain prediction;
    given the unmirrored position (or one mirrored on another axis) it predicts 10 |p - offset - 0.5|."""
    shape, size = (30, 22, 18), (16, 16, 16)
    extent = np.array(shape, np.float32) - 1
    offsets = np.stack(np.meshgrid(*[np.arange(p) - (p - 1) / 2 for p in size], indexing="ij"), -1) / extent
    network = lambda inputs: 10.0 * tf.abs(inputs["position"][:, None, None, None, :] + offsets - 0.5)
    coordinates = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) / extent
    expected = tf.nn.softmax(10.0 * np.abs(coordinates - 0.5), axis=-1).numpy()
    image = np.zeros(shape + (1,), np.float32)
    np.testing.assert_allclose(Predictor(network, size, classes(3), **EXACT).probabilities(image), expected, atol=1e-5)
    mirrored = Predictor(network, size, classes(3), tta_mirroring=True, **EXACT).probabilities(image)
    np.testing.assert_allclose(mirrored, expected, atol=1e-5)


class DropoutNetwork(keras.Model):
    """1x1x1 convolution then dropout: deterministic only when called with training=False."""

    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv3D(3, 1)
        self.dropout = keras.layers.Dropout(0.5)

    def call(self, inputs, training=None):
        return self.dropout(self.conv(inputs["image"]), training=training)


def test_keras_models_are_called_with_training_false():
    network = DropoutNetwork()
    image = np.random.default_rng(10).normal(size=(20, 16, 16, 2)).astype(np.float32)
    result = Predictor(network, (16, 16, 16), classes(3), overlap=0.25, **EXACT).probabilities(image)
    logits = network.conv(image[None]).numpy()[0]
    np.testing.assert_allclose(result, tf.nn.softmax(logits, axis=-1).numpy(), atol=2e-6)


def test_predictor_from_params_takes_window_classes_and_evaluation_settings():
    params = Params.from_dict({"data": {"num_classes": 4}, "sampling": {"patch_size": [8, 12, 16]},
                               "evaluation": {"overlap": 0.25, "blending": "constant", "batch_size": 2,
                                              "tta_mirroring": True}})
    predictor = Predictor.from_params(conv_network(random_kernel(11, outputs=4)), params)
    assert (predictor.patch_size_vox, predictor.targets, predictor.overlap, predictor.blending,
            predictor.batch_size, predictor.tta_mirroring) == ((8, 12, 16), classes(4), 0.25, "constant", 2, True)
    assert predictor.probabilities(np.zeros((9, 12, 20, 2), np.float32)).shape == (9, 12, 20, 4)
    regions = [{"name": r.name, "labels": list(r.labels), "paint": r.paint} for r in REGIONS.regions]
    params = Params.from_dict({"data": {"num_classes": 4, "class_names": list(REGIONS.class_names),
                                        "regions": regions}, "sampling": {"patch_size": [8, 12, 16]}})
    predictor = Predictor.from_params(conv_network(random_kernel(11)), params)
    assert predictor.targets == REGIONS
    assert predictor.probabilities(np.zeros((9, 12, 20, 2), np.float32)).shape == (9, 12, 20, 3)


def test_user_errors_name_the_fix():
    network = conv_network(random_kernel(12))
    with pytest.raises(ParamsError, match="data.num_classes"):
        Predictor(network, (8, 8, 8), classes(5)).probabilities(np.zeros((8, 8, 8, 2), np.float32))
    with pytest.raises(ParamsError, match="data.regions"):
        Predictor(conv_network(random_kernel(12, outputs=4)), (8, 8, 8), REGIONS).labels(np.zeros((8, 8, 8, 2),
                                                                                                 np.float32))
    with pytest.raises(ValueError, match="targets = 3; expected a Targets"):
        Predictor(network, (8, 8, 8), 3)
    with pytest.raises(DataError, match=r"\(X, Y, Z, C\)"):
        Predictor(network, (8, 8, 8), classes(3)).probabilities(np.zeros((8, 8, 8), np.float32))
    with pytest.raises(ValueError, match="^blending = 'hann': expected one of"):
        Predictor(network, (8, 8, 8), classes(3), blending="hann")


FLIPS = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


def test_an_ensemble_of_two_networks_gives_the_mean_of_their_softmaxes():
    """One window covering the volume: exactly the mean of the two whole-volume softmaxes; several
    overlapping windows: the same off the window faces (each window's log-mean-softmax is the whole-volume
    one there, and the softmax of their weighted average gives it back)."""
    first, second = conv_network(random_kernel(13)), conv_network(random_kernel(14))
    for shape, overlap in [((16, 16, 16), 0.5), ((37, 30, 21), 0.5), ((20, 11, 16), 0.0)]:
        image = np.random.default_rng(15).normal(size=shape + (2,)).astype(np.float32)
        reference = (whole_volume_probabilities(first, image) + whole_volume_probabilities(second, image)) / 2
        predictor = Predictor([first, second], (16, 12, 16), classes(3), overlap=overlap, batch_size=3, **EXACT)
        result = predictor.probabilities(image)
        region = exact_voxels(windows.window_grid(shape, (16, 12, 16), overlap, "gaussian"))
        assert result.shape == shape + (3,) and result.dtype == np.float32
        np.testing.assert_allclose(result[region], reference[region], atol=2e-6)
        alone = whole_volume_probabilities(first, image)
        assert np.abs(alone - reference)[region].max() > 1e-2  # the members differ: averaging matters


def test_an_ensemble_with_mirroring_averages_members_and_flips_alike():
    image = np.random.default_rng(16).normal(size=(16, 16, 16, 2)).astype(np.float32)
    members = [conv_network(random_kernel(17)), conv_network(random_kernel(18))]
    reference = np.mean([np.flip(whole_volume_probabilities(n, np.flip(image, axes).copy()), axes)
                         for n in members for axes in FLIPS], axis=0)
    result = Predictor(members, (16, 16, 16), classes(3), tta_mirroring=True, **EXACT).probabilities(image)
    np.testing.assert_allclose(result, reference, atol=2e-6)


@pytest.mark.parametrize("tta_mirroring", [False, True])
def test_one_member_is_the_single_network_predictor_exactly(tta_mirroring):
    """A one-member sequence is the single network; without mirroring the window function returns the
    network's own logits (not a log-softmax), with it the log of the flip-averaged softmax."""
    network = conv_network(random_kernel(19))
    image = np.random.default_rng(20).normal(size=(26, 19, 17, 2)).astype(np.float32)
    single = Predictor(network, (16, 12, 16), classes(3), tta_mirroring=tta_mirroring)
    np.testing.assert_array_equal(Predictor([network], (16, 12, 16), classes(3), tta_mirroring=tta_mirroring)
                                  .probabilities(image), single.probabilities(image))
    windows_batch = tf.constant(image[None, :16, :12, :16])
    positions = tf.constant([[0.2, 0.6, 0.9]], tf.float32)
    logits = single.window_function(2)(windows_batch, positions).numpy()
    if tta_mirroring:
        window = image[:16, :12, :16]
        mean = np.mean([np.flip(whole_volume_probabilities(network, np.flip(window, axes).copy()), axes)
                        for axes in FLIPS], axis=0)
        np.testing.assert_allclose(logits[0], np.log(mean), atol=2e-6)
    else:
        np.testing.assert_array_equal(logits, network({"image": windows_batch}).numpy())


def test_an_ensemble_needs_callables():
    with pytest.raises(ParamsError, match="sequence of networks"):
        Predictor([], (8, 8, 8), classes(3))
    with pytest.raises(ParamsError, match="sequence of networks"):
        Predictor([conv_network(random_kernel(21)), "not a network"], (8, 8, 8), classes(3))


@pytest.mark.parametrize("shape, tta_mirroring", [((37, 21, 30), False), ((12, 40, 9), True)])
def test_recombination_on_the_device_equals_the_host_path(shape, tta_mirroring):
    """The in-graph recombination (what runs on a GPU) against the numpy one, on this CPU: probabilities,
    labels and blended logits; a volume smaller than the window along two axes is padded alike."""
    image = np.random.default_rng(8).normal(size=shape + (2,)).astype(np.float32)
    network = conv_network(random_kernel(9))
    host, device = (Predictor(network, (16, 12, 16), classes(3), overlap=0.4, batch_size=3,
                              tta_mirroring=tta_mirroring, recombination=where, **EXACT)
                    for where in ("host", "device"))
    assert device.on_device and not host.on_device
    np.testing.assert_allclose(device.probabilities(image), host.probabilities(image), atol=1e-5)
    np.testing.assert_allclose(device.logits(image), host.logits(image), atol=1e-5)
    np.testing.assert_array_equal(device.labels(image), host.labels(image))
    np.testing.assert_allclose(tf.nn.softmax(host.logits(image), axis=-1), host.probabilities(image), atol=1e-6)
    with pytest.raises(ValueError, match="^recombination = 'gpu'; expected one of auto, host, device"):
        Predictor(network, (16, 12, 16), classes(3), recombination="gpu")


def whole_volume_logits(network, image):
    return network({"image": image[None], "position": np.full((1, 3), 0.5, np.float32)}).numpy()[0]


def sigmoid(logits):
    return 1 / (1 + np.exp(-logits.astype(np.float64)))


def test_region_probabilities_are_the_sigmoid_of_the_blended_logits_and_the_labels_the_regions_painted():
    """With regions each output is a sigmoid of its own: the probabilities are the sigmoid of the blended
    logits (the whole-volume sigmoid off the window faces, not a softmax), the labels the regions painted in
    order where their logit is > 0 (every paint value shows up)."""
    shape = (37, 30, 21)
    image = np.random.default_rng(22).normal(size=shape + (2,)).astype(np.float32)
    network = conv_network(random_kernel(23))
    predictor = Predictor(network, (16, 12, 16), REGIONS, batch_size=3, recombination="host", **EXACT)
    probabilities, logits, labels = (predictor.probabilities(image), predictor.logits(image), predictor.labels(image))
    assert probabilities.shape == shape + (3,) and labels.dtype == np.uint8 and labels.shape == shape
    np.testing.assert_allclose(probabilities, sigmoid(logits), atol=1e-6)
    region = exact_voxels(windows.window_grid(shape, (16, 12, 16), 0.5, "gaussian"))
    np.testing.assert_allclose(probabilities[region], sigmoid(whole_volume_logits(network, image))[region], atol=2e-6)
    np.testing.assert_array_equal(labels, REGIONS.labels_of(logits))
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_regions_on_the_device_equal_the_host_path():
    """The in-graph recombination with regions (sigmoid, painting; two members and 8 flips averaging their
    sigmoids) against the numpy one, on this CPU; float16 sums (unshifted for a sigmoid) within 1e-3 of the
    float32 ones on both paths, with the same painted labels wherever every region's blended logit is 1e-2 or
    more from 0 (confident members that disagree average to p = 0.5, a logit of 0: a tie that float16 may
    break; the members here mostly agree, their flips less)."""
    shape = (37, 21, 30)
    image = 2 * np.random.default_rng(24).normal(size=shape + (2,)).astype(np.float32)
    members = [conv_network(random_kernel(25)), conv_network(random_kernel(25) + 0.3 * random_kernel(26))]
    results = {}
    for where in ("host", "device"):
        for accumulation in ("float32", "float16"):
            predictor = Predictor(members, (16, 12, 16), REGIONS, overlap=0.4, batch_size=3, recombination=where,
                                  tta_mirroring=True, accumulation=accumulation)
            results[where, accumulation] = predictor.probabilities(image), predictor.labels(image)
    exact, exact_labels = results["host", "float32"]
    logits = predictor.logits(image)
    assert np.abs(logits).max() > 20  # confident outputs: float16's coarse values are used
    np.testing.assert_allclose(results["device", "float32"][0], exact, atol=1e-5)
    np.testing.assert_array_equal(results["device", "float32"][1], exact_labels)
    decided = np.abs(logits).min(axis=-1) >= 1e-2
    assert decided.mean() > 0.9
    for where in ("host", "device"):
        probabilities, labels = results[where, "float16"]
        np.testing.assert_allclose(probabilities, exact, atol=1e-3)
        np.testing.assert_array_equal(labels[decided], exact_labels[decided])
    assert set(np.unique(exact_labels)) == {0, 1, 2, 3}


def test_an_ensemble_with_mirroring_averages_the_region_sigmoids():
    """One window covering the volume: the region probabilities are exactly the mean of the sigmoids over the
    members and the 8 flips (not the sigmoid of the mean logit), and the window logits their log-odds, finite
    and exact for confident outputs: two copies of a network give back its logits up to +-40."""
    image = np.random.default_rng(27).normal(size=(16, 16, 16, 2)).astype(np.float32)
    members = [conv_network(random_kernel(28)), conv_network(random_kernel(29))]
    logits = [np.flip(whole_volume_logits(n, np.flip(image, axes).copy()), axes) for n in members for axes in FLIPS]
    reference = np.mean([sigmoid(x) for x in logits], axis=0)
    predictor = Predictor(members, (16, 16, 16), REGIONS, tta_mirroring=True, **EXACT)
    np.testing.assert_allclose(predictor.probabilities(image), reference, atol=2e-6)
    assert np.abs(sigmoid(np.mean(logits, axis=0)) - reference).max() > 1e-2  # averaging probabilities matters
    np.testing.assert_array_equal(predictor.labels(image), REGIONS.labels_of(reference - 0.5))
    network = conv_network(random_kernel(30))
    window = tf.constant(image[None])
    logits = network({"image": window}).numpy()
    assert 30 < np.abs(logits).max() < 40
    twice = Predictor([network, network], (16, 16, 16), REGIONS).window_function(2)(window, tf.constant([[0.5] * 3]))
    np.testing.assert_allclose(twice.numpy(), logits, rtol=1e-5, atol=1e-5)

