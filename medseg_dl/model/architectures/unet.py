"""nnU-Net-like 3D U-Net (Isensee et al. 2021): plain conv-norm-leaky-ReLU pairs, strided
convolutions down, transposed convolutions up, filters doubling per level up to 320.

Per-axis geometry (nnU-Net's plans for anisotropic voxels, e.g. 0.7 x 0.7 x 5 mm):
- strides (params model.strides): None, 2 on every axis at each of the depth - 1 down-samplings; or
  depth - 1 lists (sx, sy, sz) in {1, 2}, the stride of the first convolution of encoder level
  l + 1 and of the transposed convolution (kernel = stride) of up-block l, e.g. [[2, 2, 1], [2, 2, 2]]
  for depth 3 does not pool z at the first step. Level l then has the cumulative stride
  S_l = prod(strides[:l]) per axis (S_0 = (1, 1, 1)); `UNet.level_strides` lists them.
- kernel_sizes (params model.kernel_sizes): None, 3x3x3 everywhere; or depth lists (kx, ky, kz)
  of odd ints, the kernel of every convolution of level l, encoder and decoder, e.g. [3, 3, 1]
  on the levels where z is still coarse.
None gives exactly the isotropic network (same variables, same outputs) as explicit 2s and 3s.

Shape contract. Input {"image": (N, X, Y, Z, C) float32, "position": ignored}; any X, Y, Z:
the image is zero-padded at the ends to multiples of S_{depth-1} per axis (2**(depth-1) on
every axis by default) and the logits cropped back. Output: float32 logits (N, X, Y, Z,
num_outputs), one per class or region of the params' `Targets`. With deep supervision and
training=True the output is a list [level 0, level 1, ..., level depth-2] where level l has
shape (N, ceil(X/Sx), ceil(Y/Sy), ceil(Z/Sz), num_outputs) for S_l = (Sx, Sy, Sz), aligned with
labels[:, ::Sx, ::Sy, ::Sz] (see losses.deep_supervision_loss, given the same level strides); in
inference it is the level-0 tensor only.
"""
import keras
from keras import ops

from medseg_dl.data.targets import Targets
from medseg_dl.model.layers import (BuildOnCall, ConvPair, ResidualBlock, UpBlock, check_channels, crop_spatial,
                                    cumulative_strides, pad_to_multiple, triple)

MAX_FILTERS = 320  # nnU-Net's cap on the filters of a stage


def stage_filters(base_filters, depth, max_filters=MAX_FILTERS):
    """Filters of each resolution level: base * 2^level, capped at max_filters."""
    return [min(base_filters * 2 ** level, max_filters) for level in range(depth)]


def _per_level(values, count, name):
    """None, or `count` per-axis triples as a tuple of int tuples (ValueError otherwise)."""
    if values is None:
        return None
    values = tuple(triple(v) for v in values)
    if len(values) != count:
        raise ValueError(f"UNet {name} has {len(values)} entries; expected {count}")
    if any(v < 1 for entry in values for v in entry):
        raise ValueError(f"UNet {name} = {values}: expected positive ints")
    return values


@keras.saving.register_keras_serializable(package="medseg_dl")
class UNet(BuildOnCall, keras.Model):
    """3D U-Net with `depth` resolution levels (depth - 1 down-samplings); see the module docstring.

    strides: None or depth - 1 per-axis strides (3 ints each); kernel_sizes: None or depth per-axis
    kernels (3 ints each); lists or tuples, kept in the config as lists of lists (or None).
    `level_strides`: the cumulative stride (sx, sy, sz) of each of the depth levels.
    """

    def __init__(self, num_outputs, input_channels=1, base_filters=16, depth=4, norm="instance",
                 activation="leaky_relu", norm_groups=8, residual=False, deep_supervision=False, dropout=0.0,
                 strides=None, kernel_sizes=None, **kwargs):
        super().__init__(**kwargs)
        strides = _per_level(strides, depth - 1, "strides")
        kernel_sizes = _per_level(kernel_sizes, depth, "kernel_sizes")
        self.arguments = dict(num_outputs=num_outputs, input_channels=input_channels, base_filters=base_filters,
                              depth=depth, norm=norm, activation=activation, norm_groups=norm_groups,
                              residual=residual, deep_supervision=deep_supervision, dropout=dropout,
                              strides=strides, kernel_sizes=kernel_sizes)
        self.input_channels, self.depth, self.deep_supervision = input_channels, depth, deep_supervision
        self.level_strides = tuple(cumulative_strides(strides, depth))
        # None keeps the int forms 2 and 3, i.e. exactly the sub-layers (and configs) of the isotropic network.
        down = (2,) * (depth - 1) if strides is None else strides
        kernels = (3,) * depth if kernel_sizes is None else kernel_sizes
        filters = stage_filters(base_filters, depth)
        block = dict(norm=norm, activation=activation, norm_groups=norm_groups)
        stage = ResidualBlock if residual else ConvPair
        # Sub-layers are attributes (encoder_0, up_0, ...): Keras 3 lists are invisible to tf.train.Checkpoint.
        for level, f in enumerate(filters):
            setattr(self, f"encoder_{level}", stage(f, strides=down[level - 1] if level else 1,
                                                    kernel_size=kernels[level], name=f"encoder_{level}", **block))
        for level in range(depth - 1):  # up_l undoes the down-sampling from level l to l + 1
            setattr(self, f"up_{level}", UpBlock(filters[level], strides=down[level], name=f"up_{level}"))
            setattr(self, f"decoder_{level}", ConvPair(filters[level], kernel_size=kernels[level],
                                                       name=f"decoder_{level}", **block))
        self.dropout = keras.layers.Dropout(dropout)
        self.head_levels = max(depth - 1, 1) if deep_supervision else 1
        for level in range(self.head_levels):
            setattr(self, f"head_{level}", keras.layers.Conv3D(num_outputs, 1, name=f"head_{level}"))

    def call(self, inputs, training=None):
        """{"image": (N, X, Y, Z, C)} -> float32 logits; a list of levels with deep supervision in training."""
        image = inputs["image"]
        check_channels(image, self.input_channels)
        sizes = ops.shape(image)[1:4]
        skips = self.encode(image, training=training)
        x = skips[-1]
        decoded = [None] * self.depth
        for level in reversed(range(self.depth - 1)):
            x = getattr(self, f"up_{level}")([x, skips[level]])
            x = decoded[level] = getattr(self, f"decoder_{level}")(x, training=training)
        logits = self._logits(0, self.dropout(x, training=training), sizes)
        if not self.deep_supervision:
            return logits
        coarse_levels = range(1, self.head_levels)
        if not training:
            for level in coarse_levels:  # create the heads' variables now, not in a later training step
                head = getattr(self, f"head_{level}")
                if not head.built:
                    head.build(decoded[level].shape)
            return logits
        return [logits] + [self._logits(level, decoded[level], sizes) for level in coarse_levels]

    def encode(self, image, training=None):
        """The encoder features of every level (the last is the bottleneck), as `call` computes them.

        image (N, X, Y, Z, C) is zero-padded to (N, X', Y', Z', C), multiples of level_strides[-1] per
        axis; level l has shape (N, X'/Sx, Y'/Sy, Z'/Sz, filters of level l) for S_l = level_strides[l].
        """
        x = pad_to_multiple(image, self.level_strides[-1])
        features = []
        for level in range(self.depth):
            x = getattr(self, f"encoder_{level}")(x, training=training)
            features.append(x)
        return features

    def _logits(self, level, x, sizes):
        """float32 logits of the head of `level`, cropped to ceil(size / S) per axis, S = level_strides[level]."""
        cropped = crop_spatial(x, [(sizes[axis] + s - 1) // s for axis, s in enumerate(self.level_strides[level])])
        return ops.cast(getattr(self, f"head_{level}")(cropped), "float32")

    def get_config(self):
        config = {**super().get_config(), **self.arguments}
        for key in ("strides", "kernel_sizes"):  # plain lists of lists (YAML, JSON), or None
            config[key] = None if config[key] is None else [list(entry) for entry in config[key]]
        return config


def build_unet(params):
    """UNet from params.model (base_filters, depth, strides, kernel_sizes, norm, activation, norm_groups,
    residual, deep_supervision, dropout) and params.data (channels; the outputs of its `Targets`)."""
    model = params.model
    return UNet(num_outputs=Targets.from_params(params.data).outputs, input_channels=len(params.data.channels),
                base_filters=model.base_filters, depth=model.depth, norm=model.norm, activation=model.activation,
                norm_groups=model.norm_groups, residual=model.residual, deep_supervision=model.deep_supervision,
                dropout=model.dropout, strides=model.strides, kernel_sizes=model.kernel_sizes, name="unet")
