"""Device choice and GPU memory per process (medseg_dl.runtime.devices): what can be checked without a GPU.
benchmarks/gpu_workflow.sh measures the rest (memory growth, limits, two processes on one GPU)."""
import shutil

import pytest

from medseg_dl.config.params import Params
from medseg_dl.errors import ParamsError
from medseg_dl.runtime import devices
from medseg_dl.runtime.devices import configure_devices, restrict_devices, uses_gpu


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


# Every entry point that builds a network (and show --batch, which runs the training pipeline) configures
# its devices before TensorFlow starts: on a machine that reports a GPU, memory growth (or the cap) is set
# before the first network is built. The GPU is simulated: tf.config reports one and records the settings.

class NetworkBuilt(Exception):
    """Raised instead of building a network: carries the device settings made until then."""


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    """A trained tiny model folder (train, val and test lists) and a 2-fold cross-validation root, both
    trained 2 steps; returns (tmp folder, the folder's params.yaml, the CV experiment's params file)."""
    import yaml

    from helpers import synthetic_dataset, tiny_params
    from medseg_dl.cli import main

    tmp = tmp_path_factory.mktemp("devices")
    root = synthetic_dataset(tmp / "data", cases=5)
    split = {"val": 0.2, "test": 0.2}
    (tmp / "exp.yaml").write_text(yaml.safe_dump(tiny_params(root, tmp / "run", training={"steps": 2},
                                                             data={"split": split})))
    (tmp / "cv.yaml").write_text(yaml.safe_dump(tiny_params(root, tmp / "cv", training={"steps": 2},
                                                            data={"split": {**split, "folds": 2}})))
    assert main(["train", "--params", str(tmp / "exp.yaml")]) == 0
    for fold in ("0", "1"):
        assert main(["train", "--params", str(tmp / "cv.yaml"), "--fold", fold]) == 0
    return tmp, str(tmp / "run" / "params.yaml"), str(tmp / "cv.yaml")


@pytest.fixture
def simulated_gpu(monkeypatch):
    """tf.config reports one GPU (compute capability 7.0) and records what is set on it; building a network
    raises `NetworkBuilt` with the settings recorded until then. Returns the list of settings."""
    import tensorflow as tf

    from medseg_dl.inference import trained
    from medseg_dl.model import model_fn

    settings = []
    gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    real_list = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [gpu] if kind == "GPU" else real_list(kind))
    monkeypatch.setattr(tf.config, "set_visible_devices",
                        lambda chosen, kind=None: settings.append(("visible", [d.name for d in chosen])))
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth",
                        lambda device, enable: settings.append(("memory growth", device.name, enable)))
    monkeypatch.setattr(tf.config, "set_logical_device_configuration",
                        lambda device, configs: settings.append(("memory limit MB", device.name,
                                                                 configs[0].memory_limit)))
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: {"compute_capability": (7, 0)})

    def build_network(params):
        raise NetworkBuilt(list(settings))
    monkeypatch.setattr(trained, "build_network", build_network)
    monkeypatch.setattr(model_fn, "build_network", build_network)
    return settings


GROWTH = [("visible", ["/physical_device:GPU:0"]), ("memory growth", "/physical_device:GPU:0", True)]


@pytest.mark.parametrize("entry_point", [
    ["train", "--params", "{exp}"],
    ["evaluate", "--params", "{own}", "--once", "--set", "evaluation.checkpoint_process=never"],
    ["evaluate", "--params", "{own}", "--set", "evaluation.checkpoint_process=never", "--timeout", "5"],
    ["evaluate", "--params", "{own}", "--split", "test"],
    ["evaluate", "--params", "{own}", "--data", "{data}"],
    ["evaluate", "--params", "{cv}", "--cv"],
    ["evaluate", "--params", "{cv}", "--cv", "--split", "test"],
    ["predict", "--model-dir", "{run}", "--input", "{image}", "--output", "{tmp}/out"],
    ["predict", "--model-dir", "{tmp}/cv", "--folds", "all", "--input", "{image}", "--output", "{tmp}/out"],
    ["export", "--model-dir", "{run}", "--output", "{tmp}/savedmodel"],
], ids=lambda argv: " ".join(a for a in argv if "{" not in a and a != "--params"))
def test_each_entry_point_sets_memory_growth_before_it_builds_a_network(experiments, simulated_gpu, entry_point):
    from medseg_dl.cli import main

    tmp, own, cv = experiments
    names = {"exp": tmp / "exp.yaml", "own": own, "cv": cv, "run": tmp / "run", "data": tmp / "data", "tmp": tmp,
             "image": tmp / "data" / "images" / "case_00.nii.gz"}
    with pytest.raises(NetworkBuilt) as built:
        main([a.format(**names) for a in entry_point])
    assert built.value.args[0] == GROWTH


def test_the_memory_cap_is_set_instead_of_growth(experiments, simulated_gpu):
    from medseg_dl.cli import main

    tmp, own, _ = experiments
    with pytest.raises(NetworkBuilt) as built:
        main(["predict", "--model-dir", str(tmp / "run"), "--set", "evaluation.gpu_memory_limit_mb=1500",
              "--input", str(tmp / "data" / "images"), "--output", str(tmp / "out")])
    assert built.value.args[0] == [("visible", ["/physical_device:GPU:0"]),
                                   ("memory limit MB", "/physical_device:GPU:0", 1500)]


def test_the_evaluator_with_a_child_per_checkpoint_keeps_off_the_gpu_and_its_child_sets_growth(
        experiments, simulated_gpu, monkeypatch):
    """evaluation.checkpoint_process auto on a GPU: the watching process hides the GPUs, and the child
    (runner.main, run here in this process) configures them before it builds its network."""
    from medseg_dl.cli import main
    from medseg_dl.evaluation import runner

    tmp, own, _ = experiments
    children = []

    def child(self, staged_prefix, step):  # what the child would be given (its params outlive the staging)
        children.append((shutil.copy(self.params_path, tmp / "child_params.yaml"), staged_prefix, str(step)))
        return {"step": step, "mean_dice": 0.5, "classes": {}}
    monkeypatch.setattr(runner.ChildProcessRunner, "__call__", child)
    assert main(["evaluate", "--params", own, "--once"]) == 0
    assert simulated_gpu == [("visible", [])] and len(children) == 1
    with pytest.raises(NetworkBuilt) as built:
        runner.main([str(children[0][0]), *children[0][1:]])
    assert built.value.args[0] == [("visible", []), *GROWTH]


def test_show_batch_sets_memory_growth(experiments, simulated_gpu):
    from medseg_dl.cli import main

    tmp, own, _ = experiments
    assert main(["show", "--batch", "--params", own, "--out", str(tmp / "batch.png")]) == 0
    assert simulated_gpu == GROWTH
