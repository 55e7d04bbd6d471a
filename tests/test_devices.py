"""Device choice and GPU memory per process (medseg_dl.devices): what can be checked without a GPU.
benchmarks/gpu_workflow.sh measures the rest (memory growth, limits, two processes on one GPU)."""
import pytest

from medseg_dl import devices
from medseg_dl.config.params import Params
from medseg_dl.devices import configure_devices, restrict_devices, uses_gpu
from medseg_dl.errors import ParamsError


def test_a_gpu_that_does_not_exist_is_a_params_error_naming_the_key():
    with pytest.raises(ParamsError, match=r"evaluation.device = 'gpu:99', but this machine has \d+ GPU"):
        restrict_devices("gpu:99", None, "evaluation.device")


def test_cpu_uses_no_gpu_and_auto_uses_what_there_is():
    params = Params.from_dict({"evaluation": {"device": "cpu", "gpu_memory_limit_mb": 2048}})
    assert configure_devices(params.evaluation, "evaluation") == []
    assert not uses_gpu("cpu")


@pytest.mark.parametrize("device", ["gpu", "gpu:x", "GPU:0", "cuda:0"])
def test_device_values_are_checked_by_the_schema(device):
    with pytest.raises(ParamsError, match="training.device .* expected auto, cpu or gpu:N"):
        Params.from_dict({"training": {"device": device}})


@pytest.mark.parametrize("native, expected", [(True, "mixed_bfloat16"), (False, "float32")])
def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(devices, "cpu_has_bfloat16", lambda: native)
    assert devices.resolve_precision("auto", "cpu") == expected
    for explicit in ("float32", "mixed_bfloat16", "mixed_float16"):
        assert devices.resolve_precision(explicit, "cpu") == explicit
