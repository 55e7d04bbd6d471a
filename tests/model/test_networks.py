"""UNet and MedPatchNet: shapes for any patch size, gradients, position conditioning, checkpoints."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.errors import DataError, ParamsError
from medseg_dl.model.architectures import build_network, registered
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


def test_registry_lists_both_networks_and_rejects_unknown_names():
    assert registered() == ["medpatchnet", "unet"]
    params = _params("unet")
    params.model.architecture = "vnet"
    with pytest.raises(ParamsError, match="model.architecture"):
        build_network(params)


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


def _gradients(net, batch, labels):
    loss_fn = make_loss(Params.from_dict({"data": {"num_classes": 3}}))
    net(batch)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, net(batch, training=True))
    return tape.gradient(loss, net.trainable_variables)


@pytest.mark.parametrize("architecture, options", [
    ("unet", {"deep_supervision": True}),
    ("unet", {"residual": True, "norm": "batch", "activation": "prelu"}),
    ("medpatchnet", {}),
    ("medpatchnet", {"bottleneck_kernel": 3, "norm": "group", "activation": "relu"}),
])
def test_every_trainable_variable_gets_a_nonzero_gradient(architecture, options):
    keras.utils.set_random_seed(1)
    net = build_network(_params(architecture, **options))
    batch = _batch(2, (12, 8, 8))
    labels = tf.constant(np.random.default_rng(2).integers(0, 3, (2, 12, 8, 8)), tf.int32)
    gradients = _gradients(net, batch, labels)
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
    params = _params("medpatchnet", depth=2, use_position=use_position)
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
    metric = StreamingDice(2)
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
