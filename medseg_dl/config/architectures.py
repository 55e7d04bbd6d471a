"""The architecture registry: the one list of networks, by the name `model.architecture` takes.

Each name maps to its builder, `build(params) -> keras.Model` (model/architectures/__init__.py states what
a network takes and returns), given as "module:function" so that the list is known without importing
TensorFlow: the params schema takes its choices from here (schema.py), and `build_network` imports the
builder when a network is built. Register a network of your own before loading params that name it:

    register_network("vnet", "my_package.vnet:build_vnet")    # or the function itself
"""
import importlib
from typing import Callable, Dict, Union

Builder = Union[str, Callable]

NETWORKS: Dict[str, Builder] = {
    "unet": "medseg_dl.model.architectures.unet:build_unet",
    "medpatchnet": "medseg_dl.model.architectures.medpatchnet:build_medpatchnet",
}


def register_network(name: str, builder: Builder) -> None:
    """Add network `name` (a `model.architecture` value from now on) built by `builder`: a function
    `build(params) -> keras.Model` or its "module:function"; `ValueError` for a name already taken."""
    if name in NETWORKS:
        raise ValueError(f"name = {name!r}: a network of this name is registered already; choose another name")
    NETWORKS[name] = builder


def network_builder(name: str) -> Callable:
    """The builder function of registered network `name` (imported on first use); `KeyError` for another."""
    builder = NETWORKS[name]
    if isinstance(builder, str):
        module, function = builder.split(":")
        builder = getattr(importlib.import_module(module), function)
    return builder
