import pytest
import yaml

from helpers import tiny_params
from medseg_dl.config.params import Params, defaults_dict
from medseg_dl.errors import ParamsError


def write(tmp_path, data, name="p.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_defaults_merge_and_both_access_styles(tmp_path):
    p = Params.load(write(tmp_path, {"training": {"steps": 7}}))
    assert p["training"]["steps"] == p.training.steps == 7
    assert p.training.learning_rate == defaults_dict()["training"]["learning_rate"]
    assert p.augmentation.flip.p == 0.0


def test_every_default_validates():
    p = Params.from_dict({})
    assert set(p.to_dict()) == set(defaults_dict())


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ParamsError, match=r"training\.learning_rat.*did you mean training\.learning_rate\?"):
        Params.load(write(tmp_path, {"training": {"learning_rat": 0.1}}))
    with pytest.raises(ParamsError, match="did you mean sampling"):
        Params.load(write(tmp_path, {"samplng": {}}))


@pytest.mark.parametrize("section,key,value,message", [
    ("training", "steps", "ten", "expected int"),
    ("training", "steps", 0, ">= 1"),
    ("training", "steps", True, "expected int"),
    ("evaluation", "blending", "hann", "one of"),
    ("sampling", "patch_size", [40, 56], "list of 3"),
    ("augmentation", "flip", {"p": 1.5}, "<= 1"),
])
def test_bad_values_name_the_key(tmp_path, section, key, value, message):
    with pytest.raises(ParamsError, match=message) as err:
        Params.load(write(tmp_path, {section: {key: value}}))
    assert f"{section}.{key}" in str(err.value)


def test_yaml_not_a_mapping_and_missing_file(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a YAML mapping") as err:
        Params.load(path)
    assert path in str(err.value)
    with pytest.raises(ParamsError, match="not found"):
        Params.load(str(tmp_path / "missing.yaml"))
    with pytest.raises(ParamsError, match="not valid YAML"):
        Params.load(write(tmp_path, "a: [1, 2\n"))


def test_overrides_are_typed_and_checked(tmp_path):
    p = Params.load(write(tmp_path, {}), overrides=["training.steps=12", "sampling.patch_size=[8, 8, 8]",
                                                    "evaluation.tta_mirroring=true"])
    assert p.training.steps == 12 and p.sampling.patch_size == [8, 8, 8] and p.evaluation.tta_mirroring is True
    with pytest.raises(ParamsError, match="did you mean training.steps"):
        Params.load(write(tmp_path, {}), overrides=["training.stepz=3"])
    with pytest.raises(ParamsError, match="section.key=value"):
        Params.load(write(tmp_path, {}), overrides=["training.steps"])


def test_save_round_trip_and_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = Params.load(write(tmp_path, {"experiment": {"model_dir": "runs/x"}, "data": {"num_classes": 3}}))
    assert p.experiment.model_dir == str(tmp_path / "runs" / "x")
    assert p.data.converted_dir == str(tmp_path / "runs" / "x" / "converted")
    assert p.data.class_names == ["class_0", "class_1", "class_2"]
    p.save(str(tmp_path / "saved.yaml"))
    assert Params.load(str(tmp_path / "saved.yaml")) == p


def test_consistency_checks():
    with pytest.raises(ParamsError, match="class_names"):
        Params.from_dict({"data": {"num_classes": 3, "class_names": ["a", "b"]}})
    with pytest.raises(ParamsError, match="class_probabilities"):
        Params.from_dict({"data": {"num_classes": 3}, "sampling": {"class_probabilities": [0.5, 0.5]}})


def test_one_normalisation_per_channel_or_one_for_all():
    two = {"data": {"channels": ["t1", "ct"]}}
    assert Params.from_dict({**two, "preprocessing": {"normalization": ["zscore", "ct"]}}).preprocessing.normalization
    assert Params.from_dict({**two, "preprocessing": {"normalization": "zscore"}})
    with pytest.raises(ParamsError, match="lists 3 methods but data.channels has 2"):
        Params.from_dict({**two, "preprocessing": {"normalization": ["zscore", "ct", "none"]}})
    with pytest.raises(ParamsError, match="expected one of"):
        Params.from_dict({**two, "preprocessing": {"normalization": ["zscore", "hu"]}})


BRATS_REGIONS = [{"name": "whole_tumour", "labels": [1, 2, 3, 4], "paint": 2},
                 {"name": "tumour_core", "labels": [1, 3, 4], "paint": 1},
                 {"name": "enhancing", "labels": [4], "paint": 4}]


def test_regions_and_ignore_label_are_accepted():
    data = Params.from_dict({"data": {"num_classes": 5, "regions": BRATS_REGIONS, "ignore_label": 5}}).data
    assert data.regions == BRATS_REGIONS and data.ignore_label == 5


@pytest.mark.parametrize("data,message", [
    ({"ignore_label": 2}, r"^data.ignore_label = 2 is also a class \(data.num_classes = 5 covers 0..4\)"),
    ({"regions": [{"name": "a", "labels": [1, 6], "paint": 1}]},
     r"^data.regions\[0\].labels = \[1, 6\]: \[6\] is no foreground label"),
    ({"regions": [{"name": "a", "labels": [0, 1], "paint": 1}]}, r"^data.regions\[0\].labels = \[0, 1\]: \[0\] is no"),
    ({"regions": [{"name": "a", "labels": [1, 5], "paint": 1}], "ignore_label": 5},
     r"^data.regions\[0\].labels = \[1, 5\]: holds data.ignore_label = 5"),
    ({"regions": BRATS_REGIONS[::-1]}, r"^data.regions\[0\] \(enhancing\) is painted over entirely by "
                                       r"data.regions\[1\] \(tumour_core\)"),
    ({"regions": [{"name": "a", "labels": [1, 2], "paint": 3}]}, r"^data.regions\[0\].paint = 3: expected one of"),
    ({"regions": [{"name": "a", "labels": [1]}]}, r"^data.regions\[0\] = .*: expected \{name: "),
    ({"regions": [{"name": "a", "labels": [1], "paint": 1}, {"name": "a", "labels": [2], "paint": 2}]},
     r"^data.regions\[1\].name = 'a': expected a name no other region has"),
    ({"regions": ["whole"]}, r"data.regions = \['whole'\]: expected a list of dict"),
])
def test_bad_regions_and_ignore_label_name_the_key(data, message):
    with pytest.raises(ParamsError, match=message) as err:
        Params.from_dict({"data": {"num_classes": 5, **data}})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("probabilities, message", [
    ([0.5, -0.2, 0.7], r"sampling.class_probabilities = \[0.5, -0.2, 0.7\]: must be >= 0.0"),
    ([0.5, "a", 0.5], r"sampling.class_probabilities = .*: expected a list of int or float"),
])
def test_class_probabilities_must_be_non_negative_numbers(tmp_path, probabilities, message):
    with pytest.raises(ParamsError, match=message):
        Params.from_dict(tiny_params(tmp_path, tmp_path / "run", sampling={"class_probabilities": probabilities}))
