"""Which devices a process uses, and how much GPU memory: set once, before TensorFlow touches a GPU.

TensorFlow's default maps nearly all memory of every visible GPU into the first process, so a
trainer and an evaluator could not share one GPU. `configure_devices` therefore switches memory
growth on for every GPU the process sees (it allocates what it uses), or sets a hard limit
(`*.gpu_memory_limit_mb`), and with `*.device: gpu:N` hides the other GPUs; `cpu` hides them all.
TensorFlow never hands GPU memory back while the process lives: the evaluator therefore runs each
checkpoint in a child process when it uses a GPU (evaluation.checkpoint_process).
"""
from typing import List, Optional

import tensorflow as tf

from medseg_dl.errors import ParamsError


def configure_devices(section, name: str) -> List[str]:
    """Restrict this process to `section.device` ("auto", "cpu" or "gpu:N") and bound its GPU memory by
    `section.gpu_memory_limit_mb`; `name` is the section's name in the params (training, evaluation).
    Returns the names of the GPUs the process will use. A call after TensorFlow has set up its GPUs
    changes nothing (the first call of the process wins); without GPUs only "gpu:N" is an error."""
    return restrict_devices(section.device, section.gpu_memory_limit_mb, f"{name}.device")


def restrict_devices(device: str, memory_limit_mb: Optional[int], key: str) -> List[str]:
    """`configure_devices` for one device string ("auto", "cpu" or "gpu:N"; `key` names it in errors)."""
    gpus = tf.config.list_physical_devices("GPU")
    chosen = _chosen(gpus, device, key)
    if not gpus:
        return []
    try:
        tf.config.set_visible_devices(chosen, "GPU")
        for gpu in chosen:
            if memory_limit_mb:
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=memory_limit_mb)])
            else:
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # TensorFlow has initialised its GPUs already: keep what was set first
        pass
    return [gpu.name for gpu in chosen]


def uses_gpu(device: str) -> bool:
    """Whether a process configured for `device` computes on a GPU (one is present and not hidden)."""
    return device != "cpu" and bool(tf.config.list_physical_devices("GPU"))


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (the AVX512-BF16 or AMX-BF16 flags of /proc/cpuinfo):
    then mixed_bfloat16 is faster than float32 on it; elsewhere it is emulated and slower."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    """The keras dtype policy of training.precision for a process configured for `device`: `precision`
    itself unless it is "auto", which is mixed_bfloat16 where bfloat16 is native (a GPU of compute
    capability 8.0+, or on the CPU `cpu_has_bfloat16`), else float32."""
    if precision != "auto":
        return precision
    if uses_gpu(device):
        capabilities = [tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
                        for gpu in tf.config.list_physical_devices("GPU")]
        native = all(tuple(c) >= (8, 0) for c in capabilities)
    else:
        native = cpu_has_bfloat16()
    return "mixed_bfloat16" if native else "float32"


def _chosen(gpus, device, key):
    if device == "cpu":
        return []
    if device == "auto":
        return list(gpus)
    index = int(device.split(":")[1])
    if index >= len(gpus):
        raise ParamsError(f"{key} = {device!r}, but this machine has {len(gpus)} GPU(s)"
                          f"{' (gpu:0 .. gpu:' + str(len(gpus) - 1) + ')' if gpus else ''}; "
                          f"choose one that exists, auto or cpu")
    return [gpus[index]]
