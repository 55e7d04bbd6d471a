"""Networks by name: `build_network(params)` builds the one named by `model.architecture`.

Every network is a `keras.Model` called on {"image": (N, X, Y, Z, C) float32,
"position": (N, 3) float32} and returning float32 logits (N, X, Y, Z, K) for any patch size (see
each module for deep supervision); K is the outputs of the params' `Targets` (data/targets.py: the
classes, or the regions), and no activation is applied. Register a new one with

    @register("name")
    def build_name(params) -> keras.Model: ...
"""
import tensorflow as tf

from medseg_dl.errors import ParamsError

_BUILDERS = {}


def register(name):
    """Decorator: record `builder(params) -> keras.Model` under `name`."""
    def decorator(builder):
        if name in _BUILDERS:
            raise ValueError(f"architecture {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder
    return decorator


def registered():
    """The registered architecture names, sorted."""
    return sorted(_BUILDERS)


def build_network(params):
    """The network named by params.model.architecture, built from params.model and params.data;
    its variables do not exist until it is called (see `create_variables`)."""
    name = params.model.architecture
    if name not in _BUILDERS:
        raise ParamsError(f"model.architecture = {name!r} is not a registered network; choose one of "
                          f"{registered()}")
    return _BUILDERS[name](params)


def create_variables(network, patch_size_vox):
    """Create the variables of `network` by one forward pass (training=False) of a zero batch of one
    patch (1, X, Y, Z, network.input_channels) at position 0; patch_size_vox: (X, Y, Z)."""
    dummy = {"image": tf.zeros((1, *patch_size_vox, network.input_channels)), "position": tf.zeros((1, 3))}
    network(dummy, training=False)


from medseg_dl.model.architectures import medpatchnet, unet  # noqa: E402,F401  (registers the networks)
