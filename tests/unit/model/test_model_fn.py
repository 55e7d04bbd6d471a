"""model_fn: schedules, optimizers, clipping, mixed precision, and a step (with the streaming Dice)
under a 2-replica strategy."""
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import REPO
from medseg_dl.config.params import Params
from medseg_dl.errors import ParamsError
from medseg_dl.model.metrics import StreamingDice
from medseg_dl.model.model_fn import WarmupDecay, make_optimizer, make_schedule, model_fn

TINY_MODEL = {"base_filters": 4, "depth": 2, "esp_branches": 2}


def _params(model=None, **training):
    return Params.from_dict({"model": {**TINY_MODEL, **(model or {})}, "training": training,
                             "data": {"num_classes": 3}})


def _batch(seed=0, n=2, size=(8, 8, 8)):
    rng = np.random.default_rng(seed)
    batch = {"image": tf.constant(rng.normal(size=(n, *size, 1)).astype(np.float32)),
             "position": tf.constant(rng.uniform(size=(n, 3)).astype(np.float32))}
    return batch, tf.constant(rng.integers(0, 3, (n, *size)).astype(np.int32))


def _train_step(spec, batch, labels):
    """The step of the model_fn module docstring."""
    with tf.GradientTape() as tape:
        logits = spec.network(batch, training=True)
        loss = spec.loss_fn(labels, logits)
        scaled = spec.optimizer.scale_loss(loss)
    grads = tape.gradient(scaled, spec.network.trainable_variables)
    spec.optimizer.apply(grads, spec.network.trainable_variables)
    return loss


@pytest.mark.parametrize("decay, expected", [
    ("constant", lambda t: 1.0),
    ("poly", lambda t: (1 - t) ** 0.9),
    ("cosine", lambda t: 0.5 * (1 + math.cos(math.pi * t))),
])
def test_schedules_warm_up_linearly_then_decay(decay, expected):
    schedule = make_schedule(_params(learning_rate=0.01, steps=110, warmup_steps=10, schedule=decay).training)
    for step in (0, 4, 9):
        np.testing.assert_allclose(float(schedule(step)), 0.01 * (step + 1) / 10, rtol=1e-6)
    for step in (10, 35, 60, 109, 110, 500):
        t = min((step - 10) / 100, 1.0)
        np.testing.assert_allclose(float(schedule(step)), 0.01 * expected(t), rtol=1e-5, atol=1e-9)
    assert WarmupDecay.from_config(schedule.get_config()).get_config() == schedule.get_config()


def test_optimizers_follow_the_params():
    adam = make_optimizer(_params(optimizer="adam", clip_norm=None).training, 0.1)
    assert type(adam) is keras.optimizers.Adam and adam.global_clipnorm is None
    adamw = make_optimizer(_params(optimizer="adamw", weight_decay=1e-4, clip_norm=5.0).training, 0.1)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 1e-4 and adamw.global_clipnorm == 5.0
    sgd = make_optimizer(_params(optimizer="sgd", momentum=0.95, weight_decay=3e-5).training, 0.1)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov and sgd.momentum == 0.95
    assert sgd.weight_decay == 3e-5
    with pytest.raises(ParamsError, match="weight_decay"):
        make_optimizer(_params(optimizer="adam", weight_decay=1e-4).training, 0.1)


def test_gradients_are_clipped_by_global_norm():
    optimizer = make_optimizer(_params(optimizer="sgd", momentum=0.0, clip_norm=1.0).training, 1.0)
    variables = [tf.Variable([0.0, 0.0]), tf.Variable([0.0])]
    optimizer.apply([tf.constant([30.0, 40.0]), tf.constant([0.0])], variables)  # global norm 50
    np.testing.assert_allclose(variables[0].numpy(), [-0.6, -0.8], rtol=1e-6)


def test_model_fn_assembles_a_spec_that_trains():
    spec = model_fn(_params({"architecture": "unet", "deep_supervision": True}, learning_rate=0.01,
                            schedule="constant"))
    assert not spec.network.built  # no variables until built or called
    spec.build((8, 8, 8))
    assert spec.network.built and spec.optimizer.built
    assert isinstance(spec.metrics["dice"], StreamingDice)
    built_variables = len(spec.network.variables)
    batch, labels = _batch()
    losses = [float(_train_step(spec, batch, labels)) for _ in range(6)]
    assert len(spec.network.variables) == built_variables  # build made the deep-supervision heads too
    assert losses[-1] < losses[0]
    assert int(spec.optimizer.iterations) == 6 and float(spec.learning_rate(3)) == pytest.approx(0.01)


def test_bfloat16_computes_in_bfloat16_with_float32_loss_and_no_loss_scaling():
    try:
        spec = model_fn(_params(precision="mixed_bfloat16"))
        assert not isinstance(spec.optimizer, keras.optimizers.LossScaleOptimizer)
        spec.build((8, 8, 8))
        assert spec.network.encoder_0.conv1.conv.compute_dtype == "bfloat16"
        assert all(v.dtype == tf.float32 for v in spec.network.trainable_variables)
        batch, labels = _batch(1)
        loss = _train_step(spec, batch, labels)
        assert loss.dtype == tf.float32 and np.isfinite(float(loss))
        assert spec.network(batch).dtype == tf.float32
    finally:
        model_fn(_params(precision="float32"))  # float32 again


def test_mixed_precision_computes_in_float16_with_float32_loss_and_loss_scaling():
    try:
        spec = model_fn(_params({"architecture": "medpatchnet"}, precision="mixed_float16"))
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
        assert isinstance(spec.optimizer, keras.optimizers.LossScaleOptimizer)
        spec.build((8, 8, 8))
        assert spec.network.stem.conv.compute_dtype == "float16"
        batch, labels = _batch(1)
        before = [v.numpy().copy() for v in spec.network.trainable_variables]
        loss = _train_step(spec, batch, labels)
        assert loss.dtype == tf.float32 and np.isfinite(float(loss))
        assert spec.network(batch).dtype == tf.float32
        assert any(np.abs(v.numpy() - b).max() > 0 for v, b in zip(spec.network.trainable_variables, before))
    finally:
        model_fn(_params(precision="float32"))  # float32 again
    assert keras.mixed_precision.global_policy().name == "float32"


MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from medseg_dl.config.params import Params
    from medseg_dl.model.model_fn import model_fn
    params = Params.from_dict({"model": {"architecture": "medpatchnet", "base_filters": 4, "depth": 1,
                                         "esp_branches": 2}, "data": {"num_classes": 3}})
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        spec = model_fn(params)
        spec.build((8, 8, 8))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 8, 8, 8, 1)).astype(np.float32)
    positions = rng.uniform(size=(4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (4, 8, 8, 8)).astype(np.int32)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(({"image": images, "position": positions}, labels)).batch(4))

    @tf.function
    def step(batch, labels):
        def replica_step(batch, labels):
            with tf.GradientTape() as tape:
                logits = spec.network(batch, training=True)
                loss = spec.loss_fn(labels, logits) / strategy.num_replicas_in_sync
            grads = tape.gradient(loss, spec.network.trainable_variables)
            spec.optimizer.apply(grads, spec.network.trainable_variables)
            spec.metrics["dice"].update_state(labels, logits)
            return loss, tf.argmax(logits, axis=-1, output_type=tf.int32)
        losses, predictions = strategy.run(replica_step, args=(batch, labels))
        return strategy.reduce("SUM", losses, axis=None), predictions

    batch, batch_labels = next(iter(dataset))
    loss, predictions = step(batch, batch_labels)
    assert np.isfinite(float(loss)) and spec.optimizer.iterations.numpy() == 1
    predictions = np.concatenate([p.numpy() for p in strategy.experimental_local_results(predictions)])
    assert predictions.shape == labels.shape
    tp = np.array([np.sum((labels == k) & (predictions == k)) for k in range(3)])
    expected = 2 * tp / np.array([np.sum(labels == k) + np.sum(predictions == k) for k in range(3)])
    np.testing.assert_allclose(spec.metrics["dice"].result(), expected, rtol=1e-6)  # replicas' counts summed
    print("OK")
""")


GLOBAL_DICE_SCRIPT = textwrap.dedent("""
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from medseg_dl.config.params import Params
    from medseg_dl.model.losses import make_loss
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    regions = [{"name": "outer", "labels": [1, 2], "paint": 1}, {"name": "inner", "labels": [2], "paint": 2}]
    for data, outputs in [({"num_classes": 3}, 3), ({"num_classes": 3, "regions": regions, "ignore_label": 3}, 2)]:
        loss_fn = make_loss(Params.from_dict({"data": data, "loss": {"name": "dice_ce"}}))
        rng = np.random.default_rng(0)
        images = rng.normal(size=(4, 6, 6, 6, 2)).astype(np.float32)
        labels = rng.integers(0, 3, (4, 6, 6, 6)).astype(np.int32)
        labels[:2] = np.where(labels[:2] == 2, 0, labels[:2])  # class 2 in the second half only: Dice differs
        if "ignore_label" in data:
            labels[:2, :4] = 3  # the replicas hold different numbers of valid voxels
        kernel = rng.normal(size=(1, 1, 1, 2, outputs)).astype(np.float32)

        def loss_and_gradient(variable, images, labels, scale):
            with tf.GradientTape() as tape:
                loss = loss_fn(labels, tf.nn.conv3d(images, variable, [1] * 5, "SAME")) * scale
            return loss, tape.gradient(loss, variable)

        single_loss, single_gradient = loss_and_gradient(tf.Variable(kernel), images, labels, 1.0)
        with strategy.scope():
            variable = tf.Variable(kernel)
        dataset = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((images, labels)).batch(4))
        batch_images, batch_labels = next(iter(dataset))
        losses, gradients = strategy.run(lambda i, l: loss_and_gradient(variable, i, l, 0.5),
                                         args=(batch_images, batch_labels))
        total_loss = strategy.reduce("SUM", losses, axis=None)
        total_gradient = strategy.reduce("SUM", gradients, axis=None)
        np.testing.assert_allclose(float(total_loss), float(single_loss), rtol=1e-5)
        np.testing.assert_allclose(total_gradient.numpy(), single_gradient.numpy(), rtol=1e-4, atol=1e-6)
    print("OK")
""")


def test_batch_dice_is_the_global_batch_dice_under_two_replicas():
    """Loss and gradient of a 2-replica step equal those of the whole batch on one device, for labels and for
    regions with replicas holding different numbers of ignored voxels."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", GLOBAL_DICE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


def test_a_training_step_under_a_two_replica_mirrored_strategy():
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


NESTED_REGIONS = [{"name": "outer", "labels": [1, 2], "paint": 1}, {"name": "inner", "labels": [2], "paint": 2}]


def _nested_spheres(rng, n=2, size_vox=16, outer_radius_vox=7.0, inner_radius_vox=4.0):
    """(batch, labels (n, size_vox^3) int32): a sphere of label 1 around a concentric one of label 2, at a
    random centre; the image is noisy and bright in proportion to the label."""
    grid = np.stack(np.meshgrid(*[np.arange(size_vox)] * 3, indexing="ij"), axis=-1)
    labels = np.zeros((n,) + (size_vox,) * 3, np.int32)
    for sample in labels:
        distance_vox = np.linalg.norm(grid - rng.uniform(outer_radius_vox, size_vox - outer_radius_vox, 3), axis=-1)
        sample[distance_vox < outer_radius_vox] = 1
        sample[distance_vox < inner_radius_vox] = 2
    image = labels + rng.normal(0.0, 0.3, labels.shape)
    return {"image": tf.constant(image[..., None], tf.float32), "position": tf.zeros((n, 3))}, labels


def test_a_region_network_learns_to_paint_nested_spheres_from_partly_ignored_labels():
    """Regions outer = {1, 2} and inner = {2} (Dice + BCE), the first 4 x-planes of every training patch
    ignored (label 3); the labels painted on new patches match those of both regions, ignored planes included."""
    params = Params.from_dict({"model": {"architecture": "unet", "base_filters": 4, "depth": 2},
                               "data": {"num_classes": 3, "regions": NESTED_REGIONS, "ignore_label": 3},
                               "training": {"learning_rate": 0.03, "schedule": "constant"}})
    spec = model_fn(params)
    assert spec.targets.uses_regions and spec.metrics["dice"].output_names == ["outer", "inner"]
    spec.build((16, 16, 16))
    step = tf.function(lambda batch, labels: _train_step(spec, batch, labels))
    rng = np.random.default_rng(0)
    for _ in range(50):
        batch, labels = _nested_spheres(rng)
        labels[:, :4] = 3
        step(batch, labels)
    batch, labels = _nested_spheres(rng, n=4)
    painted = spec.targets.labels_of(spec.network(batch).numpy())
    for inside, painted_inside in [(labels > 0, painted > 0), (labels == 2, painted == 2)]:
        dice = 2 * np.sum(inside & painted_inside) / (np.sum(inside) + np.sum(painted_inside))
        assert dice > 0.9, dice
