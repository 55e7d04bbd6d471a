"""Keras 3 building blocks of the 3D networks; every tensor is channels-last (N, X, Y, Z, C).

All layers follow the global dtype policy (mixed_float16 included): normalisation statistics
and the softmax of the expert gates are computed in float32 and cast back to the compute dtype.
Sub-layers are created in `__init__` and build on first call, so variables only exist once a
layer has been called (inside a distribution strategy's scope, when there is one). Sub-layers
are attributes, never Python lists: Keras 3 lists are invisible to tf.train.Checkpoint.
"""
import math
import numbers

import keras
from keras import ops

from medseg_dl.config import schema
from medseg_dl.errors import DataError

LEAKY_SLOPE = 0.01  # nnU-Net's negative slope


def per_axis(value):
    """An int kept as it is, or a sequence of 3 ints (x, y, z) as a tuple (for kernel sizes and strides).

    Ints stay ints so that a layer built with the defaults has exactly the config it always had; Keras
    layers take either form.
    """
    if isinstance(value, numbers.Integral):
        return int(value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"expected an int or 3 ints (x, y, z), got {value}")
    return value


def triple(value):
    """(x, y, z) ints from an int or a sequence of 3 ints."""
    value = per_axis(value)
    return (value,) * 3 if isinstance(value, int) else value


def cumulative_strides(strides, depth):
    """The down-sampling of each of `depth` resolution levels relative to the input, per axis.

    strides: None (2 on every axis at each down-sampling) or depth - 1 per-axis strides (3 ints each),
    the stride of the step from level l to level l + 1. Returns depth tuples (sx, sy, sz): level 0 is
    (1, 1, 1), level l the product of the first l strides, e.g. [[2, 2, 1], [2, 2, 2]] ->
    [(1, 1, 1), (2, 2, 1), (4, 4, 2)]. Level l of a U-Net has ceil(size / s) voxels along each axis.
    """
    steps = [(2, 2, 2)] * (depth - 1) if strides is None else [triple(s) for s in strides]
    if len(steps) != depth - 1:
        raise ValueError(f"{len(steps)} strides given for depth {depth}; expected {depth - 1} (one per "
                         f"down-sampling)")
    levels = [(1, 1, 1)]
    for step in steps:
        levels.append(tuple(a * b for a, b in zip(levels[-1], step)))
    return levels


def make_norm(kind, channels, groups=8, name=None):
    """A normalisation layer for `channels` features, or None for kind 'none'.

    batch: BatchNormalization; instance: `InstanceNormalization` (statistics per sample and channel
    over X, Y, Z); group: gcd(groups, channels) groups per sample. Statistics are float32 under mixed
    precision.
    """
    schema.check_argument("kind", kind, "model.norm")
    if kind == "batch":
        return keras.layers.BatchNormalization(name=name)
    if kind == "instance":
        return InstanceNormalization(name=name)
    if kind == "group":
        return keras.layers.GroupNormalization(groups=math.gcd(groups, channels), epsilon=1e-5, name=name)
    return None  # none


@keras.saving.register_keras_serializable(package="medseg_dl")
class InstanceNormalization(keras.layers.Layer):
    """(x - mean) / sqrt(var + epsilon) * gamma + beta, statistics per sample and channel over X, Y, Z.

    Input and output (N, X, Y, Z, C) in the compute dtype; gamma and beta (C,) float32. The mean and
    variance are float32 (under mixed precision too); they fold into one centre, scale and offset per
    (sample, channel), so the normalisation itself is a subtract, multiply and add in the compute dtype
    (the centre, the mean rounded to that dtype, is subtracted first: no cancellation when the mean is
    large against the spread). It
    equals GroupNormalization(groups=C) (the same variables, gamma and beta) at a fraction of its
    cost: that layer reshapes into groups and broadcasts with tiles, which dominated a bfloat16 step.
    """

    def __init__(self, epsilon=1e-5, **kwargs):
        super().__init__(autocast=False, **kwargs)  # gamma and beta stay float32 inside call
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")

    def call(self, x):
        mean, variance = ops.moments(ops.cast(x, "float32"), axes=[1, 2, 3], keepdims=True)
        scale = ops.rsqrt(variance + self.epsilon) * self.gamma
        centre = ops.cast(mean, x.dtype)  # subtracted first: x * scale - mean * scale would cancel in bfloat16
        offset = self.beta + (ops.cast(centre, "float32") - mean) * scale
        return (x - centre) * ops.cast(scale, x.dtype) + ops.cast(offset, x.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def make_activation(kind, name=None):
    """relu, leaky_relu (slope 0.01) or prelu (one learned slope per channel)."""
    schema.check_argument("kind", kind, "model.activation")
    if kind == "relu":
        return keras.layers.ReLU(name=name)
    if kind == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=name)
    return keras.layers.PReLU(shared_axes=[1, 2, 3], name=name)  # prelu


class BuildOnCall:
    """Mixin: `build` creates nothing; sub-layers build themselves when first called.

    This skips the symbolic trace of `call` that Keras otherwise runs to build a layer
    (seconds for a whole network).
    """

    def build(self, input_shape):
        del input_shape


def _apply(layer, x, training):
    """Call an optional sub-layer (None is the identity)."""
    if layer is None:
        return x
    return layer(x, training=training)


@keras.saving.register_keras_serializable(package="medseg_dl")
class ConvNormAct(BuildOnCall, keras.layers.Layer):
    """Conv3D ('same' padding) -> normalisation -> activation.

    Input (N, X, Y, Z, C); output (N, ceil(X/sx), ceil(Y/sy), ceil(Z/sz), filters) for strides
    s = (sx, sy, sz). kernel_size and strides are an int (every axis) or 3 ints (x, y, z), e.g.
    kernel (3, 3, 1) and strides (2, 2, 1) for a coarse z axis. The convolution has a bias only
    when there is no normalisation. `activation=None` ends the block after the normalisation
    (used before a residual sum).
    """

    def __init__(self, filters, kernel_size=3, strides=1, dilation_rate=1, norm="instance",
                 activation="leaky_relu", norm_groups=8, **kwargs):
        super().__init__(**kwargs)
        kernel_size, strides = per_axis(kernel_size), per_axis(strides)
        self.filters, self.kernel_size, self.strides = filters, kernel_size, strides
        self.dilation_rate, self.norm, self.activation = dilation_rate, norm, activation
        self.norm_groups = norm_groups
        self.conv = keras.layers.Conv3D(filters, kernel_size, strides=strides, dilation_rate=dilation_rate,
                                        padding="same", use_bias=norm == "none", name="conv")
        self.norm_layer = make_norm(norm, filters, norm_groups, name="norm")
        self.act = None if activation is None else make_activation(activation, name="act")

    def call(self, x, training=None):
        x = self.conv(x)
        x = _apply(self.norm_layer, x, training)
        return _apply(self.act, x, training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "dilation_rate": self.dilation_rate, "norm": self.norm,
                "activation": self.activation, "norm_groups": self.norm_groups}


@keras.saving.register_keras_serializable(package="medseg_dl")
class ConvPair(BuildOnCall, keras.layers.Layer):
    """Two ConvNormAct with `kernel_size` (3x3x3 by default), the first with `strides` (a U-Net stage).

    kernel_size and strides: an int or 3 ints (x, y, z). Input (N, X, Y, Z, C); output
    (N, ceil(X/sx), ceil(Y/sy), ceil(Z/sz), filters).
    """

    def __init__(self, filters, strides=1, norm="instance", activation="leaky_relu", norm_groups=8, kernel_size=3,
                 **kwargs):
        super().__init__(**kwargs)
        kernel_size, strides = per_axis(kernel_size), per_axis(strides)
        self.filters, self.strides, self.norm = filters, strides, norm
        self.activation, self.norm_groups, self.kernel_size = activation, norm_groups, kernel_size
        common = dict(norm=norm, activation=activation, norm_groups=norm_groups)
        self.conv1 = ConvNormAct(filters, kernel_size, strides, name="conv1", **common)
        self.conv2 = ConvNormAct(filters, kernel_size, name="conv2", **common)

    def call(self, x, training=None):
        return self.conv2(self.conv1(x, training=training), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides, "norm": self.norm,
                "activation": self.activation, "norm_groups": self.norm_groups, "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package="medseg_dl")
class ResidualBlock(keras.layers.Layer):
    """Two ConvNormAct with `kernel_size` (the first with `strides`) plus a shortcut, then the activation.

    kernel_size and strides: an int or 3 ints (x, y, z). The shortcut is the identity when shapes
    agree, else a 1x1x1 conv with `strides` + norm.
    Input (N, X, Y, Z, C); output (N, ceil(X/sx), ceil(Y/sy), ceil(Z/sz), filters).
    """

    def __init__(self, filters, strides=1, norm="instance", activation="leaky_relu", norm_groups=8, kernel_size=3,
                 **kwargs):
        super().__init__(**kwargs)
        kernel_size, strides = per_axis(kernel_size), per_axis(strides)
        self.filters, self.strides, self.norm = filters, strides, norm
        self.activation, self.norm_groups, self.kernel_size = activation, norm_groups, kernel_size
        common = dict(norm=norm, norm_groups=norm_groups)
        self.conv1 = ConvNormAct(filters, kernel_size, strides, activation=activation, name="conv1", **common)
        self.conv2 = ConvNormAct(filters, kernel_size, activation=None, name="conv2", **common)
        self.shortcut = None
        self.act = make_activation(activation, name="act")

    def build(self, input_shape):
        if triple(self.strides) != (1, 1, 1) or input_shape[-1] != self.filters:
            self.shortcut = ConvNormAct(self.filters, 1, self.strides, activation=None, norm=self.norm,
                                        norm_groups=self.norm_groups, name="shortcut")

    def call(self, x, training=None):
        y = self.conv2(self.conv1(x, training=training), training=training)
        return self.act(y + _apply(self.shortcut, x, training))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides, "norm": self.norm,
                "activation": self.activation, "norm_groups": self.norm_groups, "kernel_size": self.kernel_size}


def esp_split(filters, branches):
    """Output channels of each ESP branch: (filters - (K-1)*d, d, ..., d) with d = filters // K."""
    if branches < 1 or filters < branches:
        raise ValueError(f"an ESP block needs 1 <= branches <= filters, got {branches} branches for "
                         f"{filters} filters")
    d = filters // branches
    return [filters - (branches - 1) * d] + [d] * (branches - 1)


@keras.saving.register_keras_serializable(package="medseg_dl")
class ESPBlock(keras.layers.Layer):
    """Efficient spatial pyramid block (ESPNet, Mehta et al. 2018) in 3D.

    reduce (1x1x1 conv to d = filters // K channels; strided variant: 3x3x3 conv with stride 2)
    -> K parallel 3x3x3 convolutions with dilation rates 1, 2, 4, ..., 2^(K-1)
    -> hierarchical feature fusion: the outputs of branches 2..K are summed cumulatively
       (rate 2, 2+4, 2+4+8, ...) to suppress gridding artefacts
    -> concatenation (filters channels) -> + residual (stride 1 only: the input, projected by a
       1x1x1 conv when its channel count differs) -> normalisation -> activation.
    Input (N, X, Y, Z, C); output (N, X/s, Y/s, Z/s, filters), s = strides (1 or 2).
    """

    def __init__(self, filters, branches=4, strides=1, norm="instance", activation="leaky_relu", norm_groups=8,
                 **kwargs):
        super().__init__(**kwargs)
        self.filters, self.branches, self.strides = filters, branches, strides
        self.norm, self.activation, self.norm_groups = norm, activation, norm_groups
        split = esp_split(filters, branches)
        self.reduce = keras.layers.Conv3D(split[-1], 3 if strides > 1 else 1, strides=strides, padding="same",
                                          use_bias=False, name="reduce")
        self.rates = [2 ** k for k in range(branches)]
        for rate, channels in zip(self.rates, split):  # attributes, not a list: tf.train.Checkpoint tracks them
            setattr(self, f"dilated_{rate}", keras.layers.Conv3D(channels, 3, dilation_rate=rate, padding="same",
                                                                 use_bias=False, name=f"dilated_{rate}"))
        self.projection = None
        self.norm_layer = make_norm(norm, filters, norm_groups, name="norm")
        self.act = make_activation(activation, name="act")

    def build(self, input_shape):
        if self.strides == 1 and input_shape[-1] != self.filters:
            self.projection = keras.layers.Conv3D(self.filters, 1, use_bias=False, name="projection")

    def call(self, x, training=None):
        reduced = self.reduce(x)
        outputs = [getattr(self, f"dilated_{rate}")(reduced) for rate in self.rates]
        fused = outputs[:1]
        for branch in outputs[1:]:
            fused.append(branch if len(fused) == 1 else fused[-1] + branch)
        y = ops.concatenate(fused, axis=-1) if len(fused) > 1 else fused[0]
        if self.strides == 1:
            y = y + (x if self.projection is None else self.projection(x))
        return self.act(_apply(self.norm_layer, y, training))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "branches": self.branches,
                "strides": self.strides, "norm": self.norm, "activation": self.activation,
                "norm_groups": self.norm_groups}


def fourier_encode(position, num_frequencies):
    """Position (N, 3) in [0, 1] -> (N, 3 + 6F): [p, sin(2^k pi p), cos(2^k pi p) for k < F]."""
    features = [position]
    for k in range(num_frequencies):
        angle = position * (math.pi * 2.0 ** k)
        features += [ops.sin(angle), ops.cos(angle)]
    return ops.concatenate(features, axis=-1)


@keras.saving.register_keras_serializable(package="medseg_dl")
class PositionalConv(keras.layers.Layer):
    """Position-conditioned dynamic convolution (CondConv-style, Yang et al. 2019).

    Inputs [features (N, X, Y, Z, C), position (N, 3) in [0, 1]]; output (N, X, Y, Z, filters).
    A small MLP maps Fourier features of the position to E gate logits and `filters` biases;
    each sample n is convolved ('same' padding) with its own kernel and bias
        W_n = sum_e softmax(g(p_n))_e W_e,   b_n = b(p_n),
    where W_e are E learned expert kernels. Execution is chosen for speed on CPU:
    kernel_size 1 mixes the kernels first (N small C x filters matrices) and applies them as
    one einsum 'nxyzc,nco->nxyzo' (the cost of a static 1x1x1 conv); larger kernels run one
    static convolution with all E*filters expert outputs and take the per-sample weighted sum
    of the experts' outputs (E times the cost of a static conv: use them on coarse levels).
    A zero position gives a fixed kernel and bias, i.e. an ordinary learned convolution.
    """

    def __init__(self, filters, kernel_size=1, num_experts=4, fourier_features=4, hidden_units=32, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.num_experts = filters, kernel_size, num_experts
        self.fourier_features, self.hidden_units = fourier_features, hidden_units
        self.hidden = keras.layers.Dense(hidden_units, activation="relu", name="hidden")
        self.gate_logits = keras.layers.Dense(num_experts, name="gate_logits")
        self.bias_head = keras.layers.Dense(filters, name="bias_head")

    def build(self, input_shape):
        channels = input_shape[0][-1]
        k = self.kernel_size
        self.experts = self.add_weight(shape=(k, k, k, channels, self.num_experts * self.filters),
                                       initializer=keras.initializers.VarianceScaling(1.0, "fan_in"),
                                       name="experts")

    def condition(self, position):
        """Gates (N, E) summing to 1 and biases (N, filters), in the compute dtype."""
        hidden = self.hidden(fourier_encode(ops.cast(position, self.compute_dtype), self.fourier_features))
        gates = ops.softmax(ops.cast(self.gate_logits(hidden), "float32"), axis=-1)
        return ops.cast(gates, self.compute_dtype), self.bias_head(hidden)

    def call(self, inputs):
        features, position = inputs
        gates, bias = self.condition(position)
        if self.kernel_size == 1:
            experts = ops.reshape(self.experts, (-1, self.num_experts, self.filters))  # (C, E, filters)
            kernels = ops.einsum("ceo,ne->nco", experts, gates)
            y = ops.einsum("nxyzc,nco->nxyzo", features, kernels)
        else:
            stacked = ops.conv(features, self.experts, padding="same")  # (N, X, Y, Z, E * filters)
            shape = ops.shape(stacked)
            stacked = ops.reshape(stacked, (shape[0], shape[1], shape[2], shape[3], self.num_experts, self.filters))
            y = ops.einsum("nxyzeo,ne->nxyzo", stacked, gates)
        return y + bias[:, None, None, None, :]

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "num_experts": self.num_experts, "fourier_features": self.fourier_features,
                "hidden_units": self.hidden_units}


@keras.saving.register_keras_serializable(package="medseg_dl")
class UpBlock(BuildOnCall, keras.layers.Layer):
    """Up-sampling by a transposed convolution with kernel = strides, concatenated with the skip features.

    strides s: an int or 3 ints (x, y, z) in {1, 2}, the down-sampling being undone (2: 2x2x2, today's
    default; (2, 2, 1) leaves z as it is, with a 2x2x1 kernel). Inputs [x (N, X, Y, Z, C),
    skip (N, sx X, sy Y, sz Z, S)]; output (N, sx X, sy Y, sz Z, filters + S).
    """

    def __init__(self, filters, strides=2, **kwargs):
        super().__init__(**kwargs)
        strides = per_axis(strides)
        self.filters, self.strides = filters, strides
        self.transpose = keras.layers.Conv3DTranspose(filters, strides, strides=strides, name="transpose")

    def call(self, inputs):
        x, skip = inputs
        return ops.concatenate([self.transpose(x), skip], axis=-1)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}


def check_channels(image, channels):
    """Raise DataError unless the image batch (N, X, Y, Z, C) has `channels` = len(data.channels) channels."""
    if image.shape[-1] is not None and image.shape[-1] != channels:
        raise DataError(f"the network was built for {channels} input channel(s) (params data.channels) but got "
                        f"images with {image.shape[-1]}; make data.channels list one name per image channel")


def pad_to_multiple(x, multiple):
    """Zero-pad the spatial axes of (N, X, Y, Z, C) at their ends up to multiples of `multiple`.

    multiple: an int (every axis) or 3 ints (mx, my, mz), e.g. a U-Net's product of the strides
    of each axis. Returns the padded tensor; a no-op when the static sizes already are multiples.
    """
    multiples = triple(multiple)
    static = x.shape[1:4]
    if all(s is not None and s % m == 0 for s, m in zip(static, multiples)):
        return x
    sizes = ops.shape(x)[1:4]
    pads = [[0, 0]] + [[0, (-sizes[axis]) % m] for axis, m in enumerate(multiples)] + [[0, 0]]
    return ops.pad(x, pads)


def crop_spatial(x, sizes):
    """The first sizes[0] x sizes[1] x sizes[2] voxels of (N, X, Y, Z, C)."""
    return x[:, :sizes[0], :sizes[1], :sizes[2], :]
