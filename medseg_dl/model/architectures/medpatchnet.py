"""MedPatchNet: a light ESP encoder-decoder whose dynamic convolutions see the patch position.

    stem       ConvNormAct 3x3x3                                  level 0, base filters
    encoder    per level 1..depth-1: strided ESP block + ESP block   filters double (cap 320)
    bottleneck x + act(PositionalConv k^3 ([x, position]))        k = bottleneck_kernel (1 or 3)
    decoder    per level depth-2..0: UpBlock (transposed conv + skip) -> ESP block
    refine     x + act(PositionalConv 1x1x1 ([x, position]))      per-sample kernels and biases
    classifier dropout -> Conv3D 1x1x1 -> float32 logits

The dynamic convolutions are not followed by a normalisation: an instance norm would remove the
per-sample biases through which the position acts. `use_position=False` feeds a zero position,
so the same network (same variables) runs with fixed kernels, for ablations.

Shape contract: input {"image": (N, X, Y, Z, C) float32, "position": (N, 3) float32 in [0, 1]},
any X, Y, Z (zero-padded at the ends to multiples of 2**(depth-1) inside, cropped back);
output float32 logits (N, X, Y, Z, num_outputs), K = num_outputs: the classes or the regions of the
params' `Targets`.
"""
import keras
from keras import ops

from medseg_dl.data.targets import Targets
from medseg_dl.errors import ParamsError
from medseg_dl.model.architectures.unet import stage_filters
from medseg_dl.model.layers import (BuildOnCall, ConvNormAct, ESPBlock, PositionalConv, UpBlock, check_channels,
                                    crop_spatial, make_activation, pad_to_multiple)


@keras.saving.register_keras_serializable(package="medseg_dl")
class MedPatchNet(BuildOnCall, keras.Model):
    """Position-conditioned ESP encoder-decoder; see the module docstring."""

    def __init__(self, num_outputs, input_channels=1, base_filters=16, depth=4, esp_branches=4, norm="instance",
                 activation="leaky_relu", norm_groups=8, use_position=True, fourier_features=4, dynamic_experts=4,
                 bottleneck_kernel=1, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.arguments = dict(num_outputs=num_outputs, input_channels=input_channels, base_filters=base_filters,
                              depth=depth, esp_branches=esp_branches, norm=norm, activation=activation,
                              norm_groups=norm_groups, use_position=use_position, fourier_features=fourier_features,
                              dynamic_experts=dynamic_experts, bottleneck_kernel=bottleneck_kernel,
                              dropout=dropout)
        self.input_channels, self.depth, self.use_position = input_channels, depth, use_position
        filters = stage_filters(base_filters, depth)
        block = dict(norm=norm, activation=activation, norm_groups=norm_groups)
        esp = dict(branches=esp_branches, **block)
        dynamic = dict(num_experts=dynamic_experts, fourier_features=fourier_features)
        self.stem = ConvNormAct(filters[0], name="stem", **block)
        # Sub-layers are attributes (down_1, encoder_1, ...): Keras 3 lists are invisible to tf.train.Checkpoint.
        for level in range(1, depth):
            setattr(self, f"down_{level}", ESPBlock(filters[level], strides=2, name=f"down_{level}", **esp))
            setattr(self, f"encoder_{level}", ESPBlock(filters[level], name=f"encoder_{level}", **esp))
        self.bottleneck = PositionalConv(filters[-1], kernel_size=bottleneck_kernel, name="bottleneck", **dynamic)
        self.bottleneck_act = make_activation(activation, name="bottleneck_act")
        for level in range(depth - 1):
            setattr(self, f"up_{level}", UpBlock(filters[level], name=f"up_{level}"))
            setattr(self, f"decoder_{level}", ESPBlock(filters[level], name=f"decoder_{level}", **esp))
        self.refine = PositionalConv(filters[0], kernel_size=1, name="refine", **dynamic)
        self.refine_act = make_activation(activation, name="refine_act")
        self.dropout = keras.layers.Dropout(dropout)
        self.classifier = keras.layers.Conv3D(num_outputs, 1, name="classifier")

    def call(self, inputs, training=None):
        """{"image": (N, X, Y, Z, C), "position": (N, 3)} -> float32 logits (N, X, Y, Z, num_outputs)."""
        image, position = inputs["image"], inputs["position"]
        check_channels(image, self.input_channels)
        if not self.use_position:
            position = ops.zeros_like(position)
        sizes = ops.shape(image)[1:4]
        x = self.stem(pad_to_multiple(image, 2 ** (self.depth - 1)), training=training)
        skips = [x]
        for level in range(1, self.depth):
            x = getattr(self, f"down_{level}")(x, training=training)
            x = getattr(self, f"encoder_{level}")(x, training=training)
            skips.append(x)
        x = x + self.bottleneck_act(self.bottleneck([x, position]))
        for level in reversed(range(self.depth - 1)):
            x = getattr(self, f"up_{level}")([x, skips[level]])
            x = getattr(self, f"decoder_{level}")(x, training=training)
        x = x + self.refine_act(self.refine([x, position]))
        logits = self.classifier(self.dropout(crop_spatial(x, sizes), training=training))
        return ops.cast(logits, "float32")

    def get_config(self):
        return {**super().get_config(), **self.arguments}


def build_medpatchnet(params):
    """MedPatchNet from params.model (base_filters, depth, esp_branches, norm, activation, norm_groups,
    use_position, fourier_features, dynamic_experts, bottleneck_kernel, dropout) and params.data
    (channels; the outputs of its `Targets`)."""
    model = params.model
    if model.esp_branches > model.base_filters:
        raise ParamsError(f"model.esp_branches = {model.esp_branches} exceeds model.base_filters = "
                          f"{model.base_filters}: every ESP branch needs a channel; lower esp_branches")
    return MedPatchNet(num_outputs=Targets.from_params(params.data).outputs,
                       input_channels=len(params.data.channels),
                       base_filters=model.base_filters, depth=model.depth, esp_branches=model.esp_branches,
                       norm=model.norm, activation=model.activation, norm_groups=model.norm_groups,
                       use_position=model.use_position, fourier_features=model.fourier_features,
                       dynamic_experts=model.dynamic_experts,
                       bottleneck_kernel=model.bottleneck_kernel, dropout=model.dropout, name="medpatchnet")
