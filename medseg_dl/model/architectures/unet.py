"""nnU-Net-like 3D U-Net (Isensee et al. 2021): plain conv-norm-leaky-ReLU pairs, strided
convolutions down, transposed convolutions up, filters doubling per level up to 320.

Shape contract. Input {"image": (N, X, Y, Z, C) float32, "position": ignored}; any X, Y, Z:
the image is zero-padded at the ends to multiples of 2**(depth-1) and the logits cropped back.
Output: float32 logits (N, X, Y, Z, num_classes). With deep supervision and training=True the
output is a list [level 0, level 1, ..., level depth-2] where level l has shape
(N, ceil(X/2^l), ceil(Y/2^l), ceil(Z/2^l), num_classes), aligned with labels[:, ::2^l, ::2^l, ::2^l]
(see losses.deep_supervision_loss); in inference it is the level-0 tensor only.
"""
import keras
from keras import ops

from medseg_dl.model.architectures import register
from medseg_dl.model.layers import (BuildOnCall, ConvPair, ResidualBlock, UpBlock, check_channels, crop_spatial,
                                    pad_to_multiple)

MAX_FILTERS = 320  # nnU-Net's cap on the filters of a stage


def stage_filters(base_filters, depth, max_filters=MAX_FILTERS):
    """Filters of each resolution level: base * 2^level, capped at max_filters."""
    return [min(base_filters * 2 ** level, max_filters) for level in range(depth)]


@keras.saving.register_keras_serializable(package="medseg_dl")
class UNet(BuildOnCall, keras.Model):
    """3D U-Net with `depth` resolution levels (depth - 1 down-samplings); see the module docstring."""

    def __init__(self, num_classes, input_channels=1, base_filters=16, depth=4, norm="instance",
                 activation="leaky_relu", norm_groups=8, residual=False, deep_supervision=False, dropout=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.arguments = dict(num_classes=num_classes, input_channels=input_channels, base_filters=base_filters,
                              depth=depth, norm=norm, activation=activation, norm_groups=norm_groups,
                              residual=residual, deep_supervision=deep_supervision, dropout=dropout)
        self.input_channels, self.depth, self.deep_supervision = input_channels, depth, deep_supervision
        filters = stage_filters(base_filters, depth)
        block = dict(norm=norm, activation=activation, norm_groups=norm_groups)
        stage = ResidualBlock if residual else ConvPair
        # Sub-layers are attributes (encoder_0, up_0, ...): Keras 3 lists are invisible to tf.train.Checkpoint.
        for level, f in enumerate(filters):
            setattr(self, f"encoder_{level}", stage(f, strides=2 if level else 1, name=f"encoder_{level}", **block))
        for level in range(depth - 1):
            setattr(self, f"up_{level}", UpBlock(filters[level], name=f"up_{level}"))
            setattr(self, f"decoder_{level}", ConvPair(filters[level], name=f"decoder_{level}", **block))
        self.dropout = keras.layers.Dropout(dropout)
        self.head_levels = max(depth - 1, 1) if deep_supervision else 1
        for level in range(self.head_levels):
            setattr(self, f"head_{level}", keras.layers.Conv3D(num_classes, 1, name=f"head_{level}"))

    def call(self, inputs, training=None):
        """{"image": (N, X, Y, Z, C)} -> float32 logits; a list of levels with deep supervision in training."""
        image = inputs["image"]
        check_channels(image, self.input_channels)
        sizes = ops.shape(image)[1:4]
        x = pad_to_multiple(image, 2 ** (self.depth - 1))
        skips = []
        for level in range(self.depth):
            x = getattr(self, f"encoder_{level}")(x, training=training)
            skips.append(x)
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

    def _logits(self, level, x, sizes):
        """float32 logits of the head of `level`, cropped to ceil(size / 2^level)."""
        stride = 2 ** level
        cropped = crop_spatial(x, [(size + stride - 1) // stride for size in sizes])
        return ops.cast(getattr(self, f"head_{level}")(cropped), "float32")

    def get_config(self):
        return {**super().get_config(), **self.arguments}


@register("unet")
def build_unet(params):
    """UNet from params.model (base_filters, depth, norm, activation, norm_groups, residual,
    deep_supervision, dropout) and params.data (channels, num_classes)."""
    model = params.model
    return UNet(num_classes=params.data.num_classes, input_channels=len(params.data.channels),
                base_filters=model.base_filters, depth=model.depth, norm=model.norm, activation=model.activation,
                norm_groups=model.norm_groups, residual=model.residual, deep_supervision=model.deep_supervision,
                dropout=model.dropout, name="unet")
