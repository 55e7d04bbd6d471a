"""UNet and MedPatchNet: shapes for any patch size, gradients, position conditioning, checkpoints;
the UNet's per-axis strides and kernels (anisotropic voxels) and their params checks."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg_dl.config.architectures import NETWORKS, register_network
from medseg_dl.config.params import Params
from medseg_dl.data.targets import Targets
from medseg_dl.errors import DataError, ParamsError
from medseg_dl.model.architectures import build_network
from medseg_dl.model.architectures.medpatchnet import MedPatchNet
from medseg_dl.model.architectures.unet import UNet, stage_filters
from medseg_dl.model.losses import make_loss
from medseg_dl.model.metrics import StreamingDice


def _params(architecture, num_classes=3, channels=("t1",), **model):
    model = {"architecture": architecture, "base_filters": 4, "depth": 3, "esp_branches": 2, **model}
    return Params.from_dict({"model": model, "data": {"num_classes": num_classes, "channels": list(channels)}})


def _batch(n, size, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": tf.constant(rng.normal(size=(n, *size, channels)).astype(np.float32)),
            "position": tf.constant(rng.uniform(size=(n, 3)).astype(np.float32))}


@pytest.fixture
def registry():
    """The architecture registry, restored after the test."""
    saved = dict(NETWORKS)
    yield NETWORKS
    NETWORKS.clear()
    NETWORKS.update(saved)


def test_the_registry_is_the_schemas_list_of_networks(registry):
    """A name is a valid model.architecture exactly when it is registered, and builds what it registers."""
    assert sorted(registry) == ["medpatchnet", "unet"]
    with pytest.raises(ParamsError, match=r"model.architecture = 'tiny': expected one of \['unet', 'medpatchnet'\]"):
        _params("tiny")
    register_network("tiny", lambda params: keras.Sequential(name="tiny"))
    register_network("unet_by_path", "medseg_dl.model.architectures.unet:build_unet")
    assert build_network(_params("tiny")).name == "tiny"
    assert isinstance(build_network(_params("unet_by_path")), UNet)
    with pytest.raises(ValueError, match="name = 'unet': a network of this name is registered already"):
        register_network("unet", lambda params: None)


def test_too_many_esp_branches_is_a_params_error():
    with pytest.raises(ParamsError, match="esp_branches"):
        build_network(_params("medpatchnet", base_filters=2, esp_branches=4))


@pytest.mark.parametrize("architecture", ["unet", "medpatchnet"])
def test_an_image_with_other_channels_than_params_is_a_data_error(architecture):
    net = build_network(_params(architecture, channels=("t1", "flair")))
    with pytest.raises(DataError, match="data.channels"):
        net(_batch(1, (8, 8, 8), channels=1))


def test_unet_filters_double_up_to_320():
    assert stage_filters(32, 6) == [32, 64, 128, 256, 320, 320]


@pytest.mark.parametrize("architecture", ["unet", "medpatchnet"])
def test_any_patch_size_gives_float32_logits_of_the_input_size(architecture):
    net = build_network(_params(architecture, num_classes=4, channels=("t1", "flair")))
    logits = net(_batch(2, (13, 10, 7), channels=2))
    assert logits.shape == (2, 13, 10, 7, 4) and logits.dtype == tf.float32


@pytest.mark.parametrize("architecture", ["unet", "medpatchnet"])
def test_a_region_network_has_one_output_per_region(architecture):
    regions = [{"name": "any", "labels": [1, 2, 3], "paint": 1}, {"name": "core", "labels": [3], "paint": 3}]
    model = {"architecture": architecture, "base_filters": 4, "depth": 2, "esp_branches": 2}
    params = Params.from_dict({"model": model, "data": {"num_classes": 4, "regions": regions}})
    assert build_network(params)(_batch(1, (8, 8, 8))).shape == (1, 8, 8, 8, 2)


@pytest.mark.parametrize("architecture", ["unet", "medpatchnet"])
def test_default_patch_with_depth_4(architecture):
    net = build_network(_params(architecture, base_filters=2, depth=4))
    assert net(_batch(1, (40, 56, 40))).shape == (1, 40, 56, 40, 3)


def test_unet_deep_supervision_returns_the_levels_in_training_only():
    net = build_network(_params("unet", deep_supervision=True, depth=3))
    batch = _batch(2, (13, 10, 7))
    assert net(batch, training=False).shape == (2, 13, 10, 7, 3)
    outputs = net(batch, training=True)
    assert [tuple(o.shape) for o in outputs] == [(2, 13, 10, 7, 3), (2, 7, 5, 4, 3)]
    assert all(o.dtype == tf.float32 for o in outputs)


def _gradients(net, batch, labels, params):
    loss_fn = make_loss(params)  # the deep-supervision level strides come from params.model
    net(batch)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, net(batch, training=True))
    return tape.gradient(loss, net.trainable_variables)


ANISOTROPIC = {"strides": [[2, 2, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 1], [3, 3, 1], [3, 3, 3]]}


@pytest.mark.parametrize("architecture, options", [
    ("unet", {"deep_supervision": True}),
    ("unet", {"residual": True, "norm": "batch", "activation": "prelu"}),
    ("unet", {"deep_supervision": True, **ANISOTROPIC}),
    ("unet", {"deep_supervision": True, "residual": True, **ANISOTROPIC}),
    ("medpatchnet", {}),
    ("medpatchnet", {"bottleneck_kernel": 3, "norm": "group", "activation": "relu"}),
])
def test_every_trainable_variable_gets_a_nonzero_gradient(architecture, options):
    keras.utils.set_random_seed(1)
    params = _params(architecture, **options)
    net = build_network(params)
    batch = _batch(2, (12, 8, 8))
    labels = tf.constant(np.random.default_rng(2).integers(0, 3, (2, 12, 8, 8)), tf.int32)
    gradients = _gradients(net, batch, labels, params)
    silent = [v.path for v, g in zip(net.trainable_variables, gradients)
              if g is None or float(tf.reduce_max(tf.abs(g))) == 0.0]
    assert not silent


def test_medpatchnet_output_depends_on_position_unless_disabled():
    batch = _batch(2, (8, 8, 8))
    moved = {"image": batch["image"], "position": 1.0 - batch["position"]}
    keras.utils.set_random_seed(3)
    net = build_network(_params("medpatchnet"))
    assert float(tf.reduce_max(tf.abs(net(batch) - net(moved)))) > 1e-3
    keras.utils.set_random_seed(3)
    blind = build_network(_params("medpatchnet", use_position=False))
    np.testing.assert_allclose(blind(batch), blind(moved), atol=1e-6)


def _position_task(rng, n=8, size=(8, 8, 8)):
    """Noise images; label 1 on the whole patch where position x > 0.5 (x kept away from 0.5)."""
    x = rng.uniform(0.0, 0.4, n) + 0.6 * rng.integers(0, 2, n)
    position = np.stack([x, rng.uniform(size=n), rng.uniform(size=n)], axis=1).astype(np.float32)
    labels = np.broadcast_to((x > 0.5)[:, None, None, None], (n, *size)).astype(np.int32)
    image = rng.normal(size=(n, *size, 1)).astype(np.float32)
    return {"image": tf.constant(image), "position": tf.constant(position)}, tf.constant(labels)


def _train_and_score(use_position, steps=30, learning_rate=0.1):
    """Plain gradient descent (cheap to trace) on fresh batches, then Dice on 4 new batches."""
    keras.utils.set_random_seed(4)
    params = _params("medpatchnet", num_classes=2, depth=2, use_position=use_position)
    net, loss_fn = build_network(params), make_loss(params)

    @tf.function
    def step(batch, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, net(batch, training=True))
        for variable, gradient in zip(net.trainable_variables, tape.gradient(loss, net.trainable_variables)):
            variable.assign_sub(learning_rate * gradient)

    rng = np.random.default_rng(5)
    net(_position_task(rng)[0])  # variables exist before tracing: one trace, not two
    for _ in range(steps):
        step(*_position_task(rng))
    metric = StreamingDice(Targets.from_params(params.data))
    for _ in range(4):
        batch, labels = _position_task(rng)
        metric.update_state(labels, net(batch))
    return float(tf.reduce_mean(metric.result()))  # both classes: a constant guess scores <= 1/3


def test_medpatchnet_learns_a_position_only_task_that_it_cannot_learn_blind():
    assert _train_and_score(use_position=True) > 0.9
    assert _train_and_score(use_position=False) < 0.7


@pytest.mark.parametrize("architecture", ["unet", "medpatchnet"])
def test_checkpoint_restore_gives_equal_outputs(architecture, tmp_path):
    params = _params(architecture, norm="batch")
    batch = _batch(2, (8, 12, 8))
    keras.utils.set_random_seed(6)
    net = build_network(params)
    net(batch, training=True)  # moves the batch-norm statistics away from their initial values
    path = tf.train.Checkpoint(model=net).save(str(tmp_path / "ckpt"))
    keras.utils.set_random_seed(7)
    restored = build_network(params)
    restored(batch)
    tf.train.Checkpoint(model=restored).restore(path).assert_consumed()
    np.testing.assert_allclose(restored(batch), net(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls, params", [(UNet, _params("unet")), (MedPatchNet, _params("medpatchnet"))])
def test_network_config_round_trip(cls, params):
    config = build_network(params).get_config()
    assert cls.from_config(config).get_config() == config


# The UNet of _params("unet", deep_supervision=True) (depth 3, base_filters 4, 1 channel, 3 classes) as it
# was before per-axis strides and kernels existed: null strides / kernel_sizes must keep exactly it.
TODAYS_UNET_KERNELS = {
    "encoder_0/conv1/conv/kernel": (3, 3, 3, 1, 4), "encoder_0/conv2/conv/kernel": (3, 3, 3, 4, 4),
    "encoder_1/conv1/conv/kernel": (3, 3, 3, 4, 8), "encoder_1/conv2/conv/kernel": (3, 3, 3, 8, 8),
    "encoder_2/conv1/conv/kernel": (3, 3, 3, 8, 16), "encoder_2/conv2/conv/kernel": (3, 3, 3, 16, 16),
    "up_0/transpose/kernel": (2, 2, 2, 4, 8), "up_0/transpose/bias": (4,),
    "decoder_0/conv1/conv/kernel": (3, 3, 3, 8, 4), "decoder_0/conv2/conv/kernel": (3, 3, 3, 4, 4),
    "up_1/transpose/kernel": (2, 2, 2, 8, 16), "up_1/transpose/bias": (8,),
    "decoder_1/conv1/conv/kernel": (3, 3, 3, 16, 8), "decoder_1/conv2/conv/kernel": (3, 3, 3, 8, 8),
    "head_0/kernel": (1, 1, 1, 4, 3), "head_0/bias": (3,), "head_1/kernel": (1, 1, 1, 8, 3), "head_1/bias": (3,),
}
TODAYS_RESIDUAL_SHORTCUTS = {"encoder_0/shortcut/conv/kernel": (1, 1, 1, 1, 4),
                             "encoder_1/shortcut/conv/kernel": (1, 1, 1, 4, 8),
                             "encoder_2/shortcut/conv/kernel": (1, 1, 1, 8, 16)}


def _variable_shapes(net):
    return {v.path.removeprefix(f"{net.name}/"): tuple(v.shape) for v in net.weights}


@pytest.mark.parametrize("residual, count, total", [(False, 38, 21474), (True, 47, 21694)])
def test_null_strides_and_kernels_keep_todays_variables(residual, count, total):
    net = build_network(_params("unet", deep_supervision=True, residual=residual))
    net(_batch(1, (13, 10, 7)))
    shapes = _variable_shapes(net)
    assert len(net.weights) == count and sum(int(np.prod(s)) for s in shapes.values()) == total
    expected = {**TODAYS_UNET_KERNELS, **(TODAYS_RESIDUAL_SHORTCUTS if residual else {})}
    assert {path: shape for path, shape in shapes.items() if "norm" not in path} == expected
    norms = {path: shape for path, shape in shapes.items() if "norm" in path}
    assert all(shape == (shapes[path.replace("norm/gamma", "conv/kernel").replace("norm/beta", "conv/kernel")][-1],)
               for path, shape in norms.items())


@pytest.mark.parametrize("residual", [False, True])
def test_null_strides_and_kernels_equal_explicit_twos_and_threes(residual):
    batch = _batch(2, (13, 10, 7))
    null = build_network(_params("unet", deep_supervision=True, residual=residual))
    explicit = build_network(_params("unet", deep_supervision=True, residual=residual,
                                     strides=[[2, 2, 2]] * 2, kernel_sizes=[[3, 3, 3]] * 3))
    null(batch)
    explicit(batch)
    assert _variable_shapes(explicit) == _variable_shapes(null)
    explicit.set_weights(null.get_weights())
    assert explicit.level_strides == null.level_strides == ((1, 1, 1), (2, 2, 2), (4, 4, 4))
    for ours, theirs in zip(explicit(batch, training=True), null(batch, training=True)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_anisotropic_strides_and_kernels_shape_the_levels_and_the_kernels():
    # z = 5 is not even a multiple of 2: padded to 6 (z is halved once), where 2 on every axis would pad to 8
    net = build_network(_params("unet", **ANISOTROPIC))
    batch = _batch(2, (13, 10, 5))
    logits = net(batch)
    assert logits.shape == (2, 13, 10, 5, 3) and logits.dtype == tf.float32
    assert net.level_strides == ((1, 1, 1), (2, 2, 1), (4, 4, 2))
    assert [tuple(x.shape) for x in net.encode(batch["image"])] == [
        (2, 16, 12, 6, 4), (2, 8, 6, 6, 8), (2, 4, 3, 3, 16)]
    shapes = _variable_shapes(net)
    assert shapes["encoder_0/conv1/conv/kernel"] == (3, 3, 1, 1, 4)
    assert shapes["encoder_0/conv2/conv/kernel"] == (3, 3, 1, 4, 4)
    assert shapes["encoder_1/conv1/conv/kernel"] == (3, 3, 1, 4, 8)
    assert shapes["encoder_2/conv1/conv/kernel"] == (3, 3, 3, 8, 16)
    assert shapes["decoder_0/conv1/conv/kernel"] == (3, 3, 1, 8, 4)
    assert shapes["decoder_1/conv2/conv/kernel"] == (3, 3, 1, 8, 8)
    assert shapes["up_0/transpose/kernel"] == (2, 2, 1, 4, 8)  # undoes strides [2, 2, 1]
    assert shapes["up_1/transpose/kernel"] == (2, 2, 2, 8, 16)
    assert net.encoder_1.conv1.conv.strides == (2, 2, 1)


def test_anisotropic_unet_under_tf_function_with_unknown_sizes():
    net = build_network(_params("unet", **ANISOTROPIC))
    predict = tf.function(lambda image: net({"image": image}),
                          input_signature=[tf.TensorSpec((None, None, None, None, 1), tf.float32)])
    assert predict(_batch(1, (9, 6, 3))["image"]).shape == (1, 9, 6, 3, 3)


def _numpy_ce(labels, logits):
    logits = logits.astype(np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    return -np.take_along_axis(log_p, labels[..., None], axis=-1).mean()


def test_anisotropic_deep_supervision_shapes_and_loss():
    strides = [[2, 2, 1], [2, 2, 1], [2, 2, 2]]  # cumulative (1, 1, 1), (2, 2, 1), (4, 4, 1), (8, 8, 2)
    params = _params("unet", base_filters=2, depth=4, deep_supervision=True, strides=strides)
    params.loss.name = "ce"
    net = build_network(params)
    batch = _batch(2, (13, 10, 5))
    outputs = net(batch, training=True)
    assert [tuple(o.shape) for o in outputs] == [(2, 13, 10, 5, 3), (2, 7, 5, 5, 3), (2, 4, 3, 5, 3)]
    assert net.level_strides[:3] == ((1, 1, 1), (2, 2, 1), (4, 4, 1))
    labels = np.random.default_rng(8).integers(0, 3, (2, 13, 10, 5)).astype(np.int32)
    expected = sum(weight * _numpy_ce(labels[:, ::sx, ::sy, ::sz], np.asarray(o))
                   for weight, (sx, sy, sz), o in zip([1.0, 0.5, 0.25], [(1, 1, 1), (2, 2, 1), (4, 4, 1)], outputs))
    np.testing.assert_allclose(float(make_loss(params)(labels, outputs)), expected / 1.75, rtol=1e-5)


def test_anisotropic_unet_config_round_trip_through_json():
    params = _params("unet", deep_supervision=True, residual=True, **ANISOTROPIC)
    net = build_network(params)
    config = net.get_config()
    assert config["strides"] == ANISOTROPIC["strides"] and config["kernel_sizes"] == ANISOTROPIC["kernel_sizes"]
    clone = UNet.from_config(json.loads(json.dumps(config)))
    assert clone.get_config() == config
    as_tuples = UNet.from_config({**config, "strides": ((2, 2, 1), (2, 2, 2)),
                                  "kernel_sizes": tuple(tuple(k) for k in config["kernel_sizes"])})
    assert as_tuples.get_config() == config
    batch = _batch(1, (13, 10, 5))
    net(batch)
    clone(batch)
    clone.set_weights(net.get_weights())
    np.testing.assert_allclose(clone(batch), net(batch), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model, message", [
    ({"strides": [[2, 2, 1], [2, 2, 2]]},
     r"^model\.strides has 2 entries but model\.depth = 4 needs 3 \(one per down-sampling\)"),
    ({"depth": 2, "strides": [[2, 2, 1], [2, 2, 2]]}, r"^model\.strides has 2 entries but model\.depth = 2 needs 1"),
    ({"strides": [[2, 2, 1], [2, 2], [2, 2, 2]]}, r"^model\.strides\[1\] = \[2, 2\]: expected 3 positive ints"),
    ({"strides": [[2, 2, 1], [2, 0, 2], [2, 2, 2]]}, r"^model\.strides\[1\] = \[2, 0, 2\]: expected 3 positive"),
    ({"strides": [[2, 2, 1], [2, 2, 2], [2, 2.0, 2]]}, r"^model\.strides\[2\] = .*expected 3 positive ints"),
    ({"strides": [[2, 3, 1], [2, 2, 2], [2, 2, 2]]}, r"^model\.strides\[0\] = \[2, 3, 1\]: expected strides of 1 or 2"),
    ({"kernel_sizes": [[3, 3, 1]] * 3}, r"^model\.kernel_sizes has 3 entries but model\.depth = 4 needs 4"),
    ({"kernel_sizes": [[3, 3, 1], [3, 3], [3, 3, 3], [3, 3, 3]]}, r"^model\.kernel_sizes\[1\] = \[3, 3\]: expected 3"),
    ({"kernel_sizes": [[3, 3, 1], [3, 3, -1], [3, 3, 3], [3, 3, 3]]}, r"^model\.kernel_sizes\[1\] = .*positive"),
    ({"kernel_sizes": [[3, 3, 1], [3, 3, 3], [3, 2, 3], [3, 3, 3]]},
     r"^model\.kernel_sizes\[2\] = \[3, 2, 3\]: expected odd kernel sizes"),
])
def test_strides_and_kernel_sizes_are_checked_against_depth(model, message):
    with pytest.raises(ParamsError, match=message) as err:
        Params.from_dict({"model": model})
    assert "\n" not in str(err.value)


def test_valid_or_null_strides_and_kernel_sizes_are_accepted():
    params = Params.from_dict({"model": {"strides": [[2, 2, 1], [2, 2, 2], [1, 1, 2]],
                                         "kernel_sizes": [[3, 3, 1], [3, 3, 1], [3, 3, 3], [5, 5, 3]]}})
    assert params.model.strides[2] == [1, 1, 2]
    assert Params.from_dict({"model": {"depth": 1, "strides": [], "kernel_sizes": [[1, 1, 1]]}}).model.depth == 1
    assert Params.from_dict({}).model.strides is None and Params.from_dict({}).model.kernel_sizes is None
