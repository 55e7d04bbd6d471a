"""Networks by name: `build_network(params)` builds the one named by `model.architecture`.

Every network is a `keras.Model` called on {"image": (N, X, Y, Z, C) float32,
"position": (N, 3) float32} and returning float32 logits (N, X, Y, Z, K) for any patch size (see
each module for deep supervision); K is the outputs of the params' `Targets` (data/targets.py: the
classes, or the regions), and no activation is applied. The names and their builders are the architecture
registry's (config/architectures.py), where a new network is registered.
"""
import tensorflow as tf

from medseg_dl.config.architectures import network_builder


def build_network(params):
    """The network named by params.model.architecture, built from params.model and params.data;
    its variables do not exist until it is called (see `create_variables`)."""
    return network_builder(params.model.architecture)(params)


def create_variables(network, patch_size_vox):
    """Create the variables of `network` by one forward pass (training=False) of a zero batch of one
    patch (1, X, Y, Z, network.input_channels) at position 0; patch_size_vox: (X, Y, Z)."""
    dummy = {"image": tf.zeros((1, *patch_size_vox, network.input_channels)), "position": tf.zeros((1, 3))}
    network(dummy, training=False)

