"""Building blocks: configs, shapes (per-axis kernels and strides too), the ESP and dynamic-convolution
maths, mixed precision."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from medseg_dl.model.layers import (ConvNormAct, ConvPair, ESPBlock, InstanceNormalization, PositionalConv,
                                    ResidualBlock, UpBlock, crop_spatial, cumulative_strides, esp_split,
                                    fourier_encode, pad_to_multiple)

RNG = np.random.default_rng(0)


def _random(*shape):
    return tf.constant(RNG.normal(size=shape).astype(np.float32))


def _call(layer, inputs):
    return layer(inputs, training=False)


LAYERS = [
    (lambda: ConvNormAct(6, norm="instance", activation="leaky_relu"), (2, 6, 8, 4, 3)),
    (lambda: ConvNormAct(6, strides=2, norm="batch", activation="prelu"), (2, 6, 8, 4, 3)),
    (lambda: ConvNormAct(6, kernel_size=1, norm="group", activation="relu", norm_groups=4), (2, 6, 8, 4, 3)),
    (lambda: ConvNormAct(6, dilation_rate=2, norm="none"), (2, 6, 8, 4, 3)),
    (lambda: ConvPair(6, strides=2, norm="group", norm_groups=2), (2, 6, 8, 4, 3)),
    (lambda: ResidualBlock(6, strides=2, norm="instance", activation="prelu"), (2, 6, 8, 4, 3)),
    (lambda: ESPBlock(8, branches=3), (2, 6, 8, 4, 3)),
    (lambda: ESPBlock(8, branches=4, strides=2, norm="group"), (2, 6, 8, 4, 8)),
    (lambda: PositionalConv(5, kernel_size=1, num_experts=3, fourier_features=2), [(2, 6, 8, 4, 3), (2, 3)]),
    (lambda: PositionalConv(5, kernel_size=3, num_experts=2, fourier_features=0), [(2, 6, 8, 4, 3), (2, 3)]),
    (lambda: UpBlock(4), [(2, 3, 4, 2, 6), (2, 6, 8, 4, 2)]),
    (lambda: ConvNormAct(6, kernel_size=(3, 3, 1), strides=(2, 2, 1)), (2, 6, 8, 4, 3)),
    (lambda: ConvPair(6, strides=[2, 1, 2], kernel_size=[3, 1, 3], norm="batch"), (2, 6, 8, 4, 3)),
    (lambda: ResidualBlock(6, strides=(2, 2, 1), kernel_size=(3, 3, 1)), (2, 6, 8, 4, 3)),
    (lambda: UpBlock(4, strides=(2, 2, 1)), [(2, 3, 4, 4, 6), (2, 6, 8, 4, 2)]),
]


def _inputs(shapes):
    if isinstance(shapes, list):
        return [_random(*shape) if len(shape) > 2 else tf.random.uniform(shape, seed=1) for shape in shapes]
    return _random(*shapes)


@pytest.mark.parametrize("make, shapes", LAYERS)
def test_config_round_trip_rebuilds_an_equal_layer(make, shapes):
    layer = make()
    inputs = _inputs(shapes)
    expected = _call(layer, inputs)
    clone = layer.__class__.from_config(layer.get_config())
    _call(clone, inputs)
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == layer.get_config()
    np.testing.assert_allclose(_call(clone, inputs), expected, rtol=1e-5, atol=1e-5)


def test_output_shapes():
    x = _random(2, 6, 8, 4, 3)
    assert ConvNormAct(5, strides=2)(x).shape == (2, 3, 4, 2, 5)
    assert ResidualBlock(7)(x).shape == (2, 6, 8, 4, 7)
    assert ConvPair(7, strides=2)(x).shape == (2, 3, 4, 2, 7)
    assert ESPBlock(8, branches=4, strides=2)(x).shape == (2, 3, 4, 2, 8)
    assert UpBlock(4)([_random(2, 3, 4, 2, 6), x]).shape == (2, 6, 8, 4, 7)
    assert PositionalConv(5, kernel_size=3)([x, tf.zeros((2, 3))]).shape == (2, 6, 8, 4, 5)


def test_per_axis_kernels_and_strides():
    x = _random(2, 6, 8, 5, 3)
    conv = ConvNormAct(5, kernel_size=(3, 3, 1), strides=(2, 2, 1))
    assert conv(x).shape == (2, 3, 4, 5, 5) and conv.conv.kernel.shape == (3, 3, 1, 3, 5)
    pair = ConvPair(7, strides=(1, 2, 2), kernel_size=(1, 3, 3))
    assert pair(x).shape == (2, 6, 4, 3, 7)
    assert pair.conv1.conv.kernel.shape == (1, 3, 3, 3, 7) and pair.conv2.conv.kernel.shape == (1, 3, 3, 7, 7)
    residual = ResidualBlock(7, strides=(2, 2, 1), kernel_size=(3, 3, 1))
    assert residual(x).shape == (2, 3, 4, 5, 7)
    assert residual.conv2.conv.kernel.shape == (3, 3, 1, 7, 7)
    assert residual.shortcut.conv.kernel.shape == (1, 1, 1, 3, 7) and residual.shortcut.conv.strides == (2, 2, 1)
    up = UpBlock(4, strides=(2, 2, 1))
    assert up([_random(2, 3, 4, 5, 6), x]).shape == (2, 6, 8, 5, 7)
    assert up.transpose.kernel.shape == (2, 2, 1, 4, 6)


def test_a_residual_block_with_unit_strides_and_equal_channels_has_no_shortcut():
    x = _random(1, 4, 4, 4, 6)
    for strides in (1, (1, 1, 1)):
        block = ResidualBlock(6, strides=strides)
        block(x)
        assert block.shortcut is None
    block = ResidualBlock(6, strides=(1, 1, 2))
    assert block(x).shape == (1, 4, 4, 2, 6) and block.shortcut is not None


def test_int_kernel_and_strides_stay_ints_in_the_config():
    assert ConvPair(4).get_config()["kernel_size"] == 3 and UpBlock(4).get_config()["strides"] == 2
    assert ConvNormAct(4, kernel_size=[3, 3, 1]).get_config()["kernel_size"] == (3, 3, 1)


def test_cumulative_strides():
    assert cumulative_strides(None, 3) == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    assert cumulative_strides([[2, 2, 1], [2, 2, 2], [1, 2, 2]], 4) == [(1, 1, 1), (2, 2, 1), (4, 4, 2), (4, 8, 4)]
    assert cumulative_strides(None, 1) == [(1, 1, 1)]
    with pytest.raises(ValueError, match="one per down-sampling"):
        cumulative_strides([[2, 2, 1]], 3)


def test_instance_norm_standardises_each_sample_and_channel():
    x = _random(2, 6, 8, 4, 3) * 5.0 + 3.0
    layer = ConvNormAct(4, norm="instance", activation="relu")
    layer(x)
    normalised = layer.norm_layer(layer.conv(x))
    mean, var = tf.nn.moments(normalised, axes=[1, 2, 3])
    np.testing.assert_allclose(mean, 0.0, atol=1e-4)
    np.testing.assert_allclose(var, 1.0, atol=1e-2)


def test_group_norm_uses_the_gcd_of_groups_and_channels():
    layer = ConvNormAct(12, norm="group", norm_groups=8)
    layer(_random(1, 4, 4, 4, 2))
    assert layer.norm_layer.groups == 4


def test_esp_split_gives_the_remainder_to_the_first_branch():
    assert esp_split(16, 4) == [4, 4, 4, 4]
    assert esp_split(10, 4) == [4, 2, 2, 2]
    with pytest.raises(ValueError, match="branches"):
        esp_split(3, 4)


def test_esp_block_matches_reduce_dilate_fuse_concat_residual():
    x = _random(2, 9, 10, 8, 8)
    block = ESPBlock(8, branches=4, norm="none", activation="relu")
    y = block(x)
    reduced = tf.nn.convolution(x, block.reduce.kernel, padding="SAME")
    branches = [tf.nn.convolution(reduced, conv.kernel, padding="SAME", dilations=2 ** k)
                for k, conv in enumerate([block.dilated_1, block.dilated_2, block.dilated_4, block.dilated_8])]
    fused = [branches[0], branches[1], branches[1] + branches[2], branches[1] + branches[2] + branches[3]]
    expected = tf.nn.relu(tf.concat(fused, axis=-1) + x)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def _per_sample_reference(layer, features, position):
    """Convolve each sample with its own mixed kernel: W_n = sum_e gate_ne W_e, plus its bias."""
    gates, bias = layer.condition(position)
    k, filters = layer.kernel_size, layer.filters
    experts = tf.reshape(layer.experts, (k, k, k, features.shape[-1], layer.num_experts, filters))
    outputs = []
    for n in range(features.shape[0]):
        kernel = tf.einsum("abcieo,e->abcio", experts, gates[n])
        outputs.append(tf.nn.convolution(features[n:n + 1], kernel, padding="SAME") + bias[n])
    return tf.concat(outputs, axis=0)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_positional_conv_applies_a_per_sample_kernel_and_bias(kernel_size):
    features, position = _random(3, 5, 6, 4, 4), tf.constant(RNG.uniform(size=(3, 3)).astype(np.float32))
    layer = PositionalConv(6, kernel_size=kernel_size, num_experts=3, fourier_features=2)
    y = layer([features, position])
    np.testing.assert_allclose(y, _per_sample_reference(layer, features, position), rtol=1e-4, atol=1e-4)
    gates, _ = layer.condition(position)
    np.testing.assert_allclose(tf.reduce_sum(gates, axis=-1), 1.0, rtol=1e-6)
    other = layer([features, tf.reverse(position, axis=[0])])
    assert np.abs(np.asarray(other - y)).max() > 1e-3


def test_fourier_encode_values():
    position = tf.constant([[0.25, 0.5, 1.0]])
    encoded = fourier_encode(position, 2).numpy()[0]
    p = np.array([0.25, 0.5, 1.0])
    expected = np.concatenate([p, np.sin(np.pi * p), np.cos(np.pi * p), np.sin(2 * np.pi * p), np.cos(2 * np.pi * p)])
    np.testing.assert_allclose(encoded, expected, atol=1e-6)
    assert fourier_encode(position, 0).shape == (1, 3)


def test_pad_to_multiple_and_crop_back():
    x = _random(1, 5, 8, 3, 2)
    padded = pad_to_multiple(x, 4)
    assert padded.shape == (1, 8, 8, 4, 2)
    np.testing.assert_array_equal(crop_spatial(padded, (5, 8, 3)), x)
    assert float(tf.reduce_sum(tf.abs(padded[:, 5:]))) == 0.0
    assert pad_to_multiple(x, 1) is x


def test_pad_to_multiple_per_axis():
    x = _random(1, 5, 8, 3, 2)
    padded = pad_to_multiple(x, (4, 8, 2))
    assert padded.shape == (1, 8, 8, 4, 2)
    np.testing.assert_array_equal(crop_spatial(padded, (5, 8, 3)), x)
    assert pad_to_multiple(x, (2, 4, 1)).shape == (1, 6, 8, 3, 2)
    assert pad_to_multiple(x, (5, 4, 3)) is x


@pytest.mark.parametrize("multiple, expected", [(4, (1, 8, 8, 4, 2)), ((2, 4, 1), (1, 6, 8, 3, 2))])
def test_pad_to_multiple_with_unknown_sizes_inside_tf_function(multiple, expected):
    pad = tf.function(lambda v: pad_to_multiple(v, multiple),
                      input_signature=[tf.TensorSpec((None, None, None, None, 2), tf.float32)])
    assert pad(_random(1, 5, 8, 3, 2)).shape == expected


def test_layers_run_under_mixed_precision_with_float32_statistics():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x = _random(2, 6, 8, 4, 3) * 3000.0  # squared sums overflow float16 (max 65504)
        conv = ConvNormAct(4, norm="instance")
        esp = ESPBlock(4, branches=2, strides=2)
        dynamic = PositionalConv(4, kernel_size=1)
        y = dynamic([esp(conv(x)), tf.constant([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]])])
        assert y.dtype == tf.float16
        assert np.isfinite(y.numpy()).all()
        assert conv.norm_layer.gamma.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_instance_normalization_equals_group_normalization_with_one_group_per_channel():
    """Output and gradients (input, gamma, beta) against Keras' GroupNormalization(groups=C), the same
    variables; a shifted, scaled input checks the float32 statistics."""
    x = _random(2, 6, 8, 4, 5) * 7.0 + 40.0
    ours, reference = InstanceNormalization(), keras.layers.GroupNormalization(groups=5, epsilon=1e-5)
    ours.build(x.shape)
    reference.build(x.shape)
    for layer in (ours, reference):
        layer.gamma.assign(RNG.normal(size=5).astype(np.float32))
        layer.beta.assign(RNG.normal(size=5).astype(np.float32))
    reference.gamma.assign(ours.gamma)
    reference.beta.assign(ours.beta)
    weights = _random(2, 6, 8, 4, 5)
    results = []
    for layer in (ours, reference):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * weights)
        results.append([y] + tape.gradient(loss, [x, layer.gamma, layer.beta]))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert InstanceNormalization.from_config(ours.get_config()).epsilon == 1e-5


def test_instance_normalization_under_bfloat16_keeps_float32_variables_and_statistics():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = InstanceNormalization()
        x = tf.cast(_random(2, 6, 8, 4, 3) * 3.0 + 100.0, tf.bfloat16)
        y = layer(x)
        assert y.dtype == tf.bfloat16 and layer.gamma.dtype == "float32"
        per_channel = tf.cast(y, tf.float32)
        np.testing.assert_allclose(tf.reduce_mean(per_channel, axis=[1, 2, 3]), 0.0, atol=0.05)
        np.testing.assert_allclose(tf.math.reduce_std(per_channel, axis=[1, 2, 3]), 1.0, atol=0.05)
    finally:
        keras.mixed_precision.set_global_policy("float32")
