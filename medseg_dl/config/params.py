"""Params: YAML-backed experiment parameters with dict and attribute access.

    p = Params.load("params/hippocampus.yaml", overrides=["training.steps=200"])
    p["training"]["steps"] == p.training.steps == 200

Values are merged over the schema's defaults (schema.py), validated (unknown keys get a
"did you mean" hint; types, bounds, choices and list lengths are checked), and relative paths
(`PATH_KEYS`) are made absolute against the working directory, except in a file whose
`experiment.model_dir` is '.': that is the folder of the file itself, and its other relative
paths are relative to it too. A model folder's own params.yaml is saved so (experiment/experiment.py),
which makes the folder movable: moved or copied, it is still its own model folder.
"""
import copy
import difflib
import os
import re
from typing import Any, Tuple

import yaml

from medseg_dl.config.schema import SCHEMA
from medseg_dl.errors import ParamsError
from medseg_dl.runtime import atomic

PATH_KEYS = ("experiment.model_dir", "data.source_dir", "data.converted_dir")


class Params(dict):
    """A nested dict of validated parameters; sections are `Params` too, so `p.a.b == p['a']['b']`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no params key '{name}'") from None

    def __setattr__(self, name, value):
        self[name] = value

    def __deepcopy__(self, memo):
        return Params(copy.deepcopy(dict(self), memo))

    @classmethod
    def load(cls, path, overrides=(), base_dir=None):
        """Read a YAML file (safe_load), apply `section.key=value` overrides, merge, validate. Relative paths
        are taken from `base_dir`; None: from the file's folder where its experiment.model_dir is '.' (a
        model folder's own params.yaml), else from the working directory."""
        values = read_yaml_mapping(path)
        if base_dir is None and _names_its_own_folder(values):
            base_dir = os.path.dirname(os.path.abspath(path))
        return cls.from_dict(values, overrides=overrides, source=str(path), base_dir=base_dir)

    @classmethod
    def from_dict(cls, user, overrides=(), source="<dict>", base_dir=None):
        """Merge a plain dict (plus overrides) over the defaults and validate it; relative paths are taken
        from `base_dir` (None: the working directory)."""
        user = copy.deepcopy(user or {})
        for override in overrides:
            _apply_override(user, override)
        merged = _merge(defaults_dict(), user, SCHEMA, prefix="", source=source)
        _validate(merged, SCHEMA, prefix="", source=source)
        _resolve(merged, base_dir or os.getcwd())
        return _wrap(merged)

    def to_dict(self):
        """A plain nested dict (for YAML or JSON)."""
        return _unwrap(self)

    def save(self, path, relative_to=None, within=None, header=""):
        """Write the parameters as YAML, atomically (a failure leaves the previous file intact). With
        `relative_to` (a folder), the paths (`PATH_KEYS`) inside `within` (default: that folder) are
        written relative to it, to be loaded with `base_dir=relative_to`. `header`: comment lines on top."""
        values = self.to_dict()
        if relative_to is not None:
            for dotted in PATH_KEYS:
                section, key = dotted.split(".")
                path_value = values[section][key]
                if path_value is not None and _is_inside(path_value, within or relative_to):
                    values[section][key] = os.path.relpath(path_value, relative_to)
        atomic.write_text(path, header + yaml.safe_dump(values, sort_keys=False))


def default_class_name(label: int) -> str:
    """The name of label value `label` where nothing names it (data.class_names unset, a dataset.json's label
    without a name): class_<label>."""
    return f"class_{label}"


def read_yaml_mapping(path):
    """Load a YAML file that must hold a mapping; `ParamsError` names the file otherwise."""
    if not os.path.isfile(path):
        raise ParamsError(f"{path}: params file not found; pass an existing YAML file "
                          f"(examples are in params/)")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a YAML mapping of sections (seed:, data:, training:, ...), "
                          f"got a {type(data).__name__}")
    return data


def _names_its_own_folder(values):
    """Whether a params mapping (as read) has experiment.model_dir '.', the folder of its file."""
    experiment = values.get("experiment")
    return isinstance(experiment, dict) and experiment.get("model_dir") == "."


def defaults_dict(schema=SCHEMA):
    """The defaults as a plain nested dict."""
    return {k: defaults_dict(v) if isinstance(v, dict) else copy.deepcopy(v.default)
            for k, v in schema.items()}


def all_keys(schema=SCHEMA, prefix=""):
    """Every dotted key of the schema with its `Key`, in schema order."""
    for name, entry in schema.items():
        dotted = prefix + name
        if isinstance(entry, dict):
            yield from all_keys(entry, dotted + ".")
        else:
            yield dotted, entry


def parse_override(override: str) -> Tuple[str, Any]:
    """(dotted key, value) of one `--set section.key=value`: the value read as YAML (a string where it is not
    YAML); `ParamsError` without an "=". The one grammar of --set (train, evaluate, predict, plan, ...)."""
    if "=" not in override:
        raise ParamsError(f"--set {override!r}: expected section.key=value, e.g. training.steps=100")
    dotted, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return dotted.strip(), value


def _apply_override(user, override):
    dotted, value = parse_override(override)
    node = user
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"--set {override!r}: '{part}' is not a section")
    node[parts[-1]] = value


def _unknown_key_error(dotted, source):
    known = [k for k, _ in all_keys()] + [k for k in _section_names()]
    hint = difflib.get_close_matches(dotted, known, n=1, cutoff=0.5)
    if not hint:  # a typo in the last part: compare last parts within the section
        section, _, last = dotted.rpartition(".")
        near = difflib.get_close_matches(last, [k.rpartition(".")[2] for k in known if k.startswith(section)],
                                         n=1, cutoff=0.5)
        hint = [f"{section}.{near[0]}" if section else near[0]] if near else []
    did_you_mean = f"; did you mean {hint[0]}?" if hint else ""
    return ParamsError(f"{source}: unknown key '{dotted}'{did_you_mean}")


def _section_names(schema=SCHEMA, prefix=""):
    for name, entry in schema.items():
        if isinstance(entry, dict):
            yield prefix + name
            yield from _section_names(entry, prefix + name + ".")


def _merge(base, user, schema, prefix, source):
    if not isinstance(user, dict):
        raise ParamsError(f"{source}: '{prefix.rstrip('.')}' must be a mapping of keys, got {user!r}")
    for name, value in user.items():
        dotted = prefix + str(name)
        if name not in schema:
            raise _unknown_key_error(dotted, source)
        if isinstance(schema[name], dict):
            base[name] = _merge(base[name], value, schema[name], dotted + ".", source)
        else:
            base[name] = value
    return base


def _validate(values, schema, prefix, source):
    for name, entry in schema.items():
        dotted = prefix + name
        if isinstance(entry, dict):
            _validate(values[name], entry, dotted + ".", source)
        else:
            entry.check(values[name], dotted, source)


def _is_inside(path, folder):
    """Whether the absolute `path` is `folder` or lies below it."""
    return os.path.commonpath([path, folder]) == folder


def _resolve(values, base_dir):
    """Absolute paths (relative ones from `base_dir`), derived defaults (converted_dir, class_names),
    consistency checks."""
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        if values[section][key] is not None:
            values[section][key] = os.path.normpath(os.path.join(base_dir, os.path.expanduser(values[section][key])))
    data = values["data"]
    if data["converted_dir"] is None:
        data["converted_dir"] = os.path.join(values["experiment"]["model_dir"], "converted")
    if data["class_names"] is None:
        data["class_names"] = [default_class_name(i) for i in range(data["num_classes"])]
    if len(data["class_names"]) != data["num_classes"]:
        raise ParamsError(f"data.class_names has {len(data['class_names'])} names but data.num_classes is "
                          f"{data['num_classes']}; give one name per class")
    _check_targets(data)
    if data["split"]["val"] + data["split"]["test"] >= 1.0:
        raise ParamsError("data.split: val + test must leave subjects for training (sum < 1)")
    _check_folds(data["split"])
    normalization = values["preprocessing"]["normalization"]
    if isinstance(normalization, list) and len(normalization) != len(data["channels"]):
        raise ParamsError(f"preprocessing.normalization lists {len(normalization)} methods but data.channels has "
                          f"{len(data['channels'])}; give one per channel, or one string for all")
    probs = values["sampling"]["class_probabilities"]
    if probs and len(probs) != data["num_classes"]:
        raise ParamsError(f"sampling.class_probabilities has {len(probs)} values; expected "
                          f"data.num_classes = {data['num_classes']}, or null")
    model = values["model"]
    _check_per_level(model, "strides", model["depth"] - 1, "one per down-sampling", lambda v: v in (1, 2),
                     "strides of 1 or 2 per axis, e.g. [2, 2, 1]")
    _check_per_level(model, "kernel_sizes", model["depth"], "one per resolution level", lambda v: v % 2 == 1,
                     "odd kernel sizes per axis, e.g. [3, 3, 1]")


def _check_targets(data):
    """data.regions and data.ignore_label: consistent with num_classes and with each other; one-line ParamsError
    naming the key."""
    classes, ignore = data["num_classes"], data["ignore_label"]
    if ignore is not None and ignore < classes:
        raise ParamsError(f"data.ignore_label = {ignore} is also a class (data.num_classes = {classes} covers "
                          f"0..{classes - 1}); give it a value >= {classes}, e.g. {classes}")
    names = set()
    regions = data["regions"] or []
    for index, region in enumerate(regions):
        where = f"data.regions[{index}]"
        if set(region) != {"name", "labels", "paint"}:
            raise ParamsError(f"{where} = {region!r}: expected {{name: ..., labels: [label values], paint: value}}")
        labels, paint, name = region["labels"], region["paint"], region["name"]
        if not isinstance(name, str) or name in names:
            raise ParamsError(f"{where}.name = {name!r}: expected a name no other region has")
        names.add(name)
        if (not isinstance(labels, list) or not labels
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels)):
            raise ParamsError(f"{where}.labels = {labels!r}: expected a non-empty list of label values")
        if ignore is not None and ignore in labels:
            raise ParamsError(f"{where}.labels = {labels}: holds data.ignore_label = {ignore}; an ignored voxel "
                              f"belongs to no region")
        missing = [v for v in labels if not 0 < v < classes]
        if missing:
            raise ParamsError(f"{where}.labels = {labels}: {missing} is no foreground label of data.num_classes = "
                              f"{classes} (1..{classes - 1})")
        if paint not in labels:
            raise ParamsError(f"{where}.paint = {paint!r}: expected one of the region's labels {labels}")
    for index, region in enumerate(regions):
        for later in range(index + 1, len(regions)):
            if set(region["labels"]) <= set(regions[later]["labels"]):
                raise ParamsError(f"data.regions[{index}] ({region['name']}) is painted over entirely by "
                                  f"data.regions[{later}] ({regions[later]['name']}), which holds all its labels and "
                                  f"is painted later; list the larger region first")


def _check_folds(split):
    """data.split.folds, fold, group_pattern: consistent with each other and with lists; one-line ParamsError."""
    folds, fold, pattern = split["folds"], split["fold"], split["group_pattern"]
    if folds == 1:
        raise ParamsError("data.split.folds = 1: cross-validation needs at least 2 folds (nnU-Net: 5); 0 for none")
    if folds and split["lists"]:
        raise ParamsError("data.split.lists and data.split.folds exclude each other; give explicit lists or "
                          "folds, not both")
    if fold is not None and not folds:
        raise ParamsError(f"data.split.fold = {fold} needs data.split.folds >= 2; set folds, or fold: null")
    if fold is not None and fold >= folds:
        raise ParamsError(f"data.split.fold = {fold}: expected 0..{folds - 1} for data.split.folds = {folds}")
    if pattern is not None and not folds:
        raise ParamsError("data.split.group_pattern is used only by cross-validation; set data.split.folds >= 2, "
                          "or group_pattern: null")
    if pattern is not None:
        try:
            groups = re.compile(pattern).groups
        except re.error as err:
            raise ParamsError(f"data.split.group_pattern = {pattern!r} does not compile ({err}); fix the regular "
                              f"expression, e.g. '^(pat\\d+)_'") from None
        if groups < 1:
            raise ParamsError(f"data.split.group_pattern = {pattern!r} has no group; put the patient part in "
                              f"parentheses, e.g. '^(pat\\d+)_'")


def _check_per_level(model, key, count, meaning, valid, expected):
    """model.<key>: null, or `count` lists of 3 positive ints that each pass `valid`; one-line ParamsError."""
    entries = model[key]
    if entries is None:
        return
    if len(entries) != count:
        raise ParamsError(f"model.{key} has {len(entries)} entries but model.depth = {model['depth']} needs "
                          f"{count} ({meaning}), or null")
    for index, entry in enumerate(entries):
        if (not isinstance(entry, list) or len(entry) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in entry)):
            raise ParamsError(f"model.{key}[{index}] = {entry!r}: expected 3 positive ints (x, y, z)")
        if not all(valid(v) for v in entry):
            raise ParamsError(f"model.{key}[{index}] = {entry!r}: expected {expected}")


def _wrap(value):
    if isinstance(value, dict):
        return Params({k: _wrap(v) for k, v in value.items()})
    return value


def _unwrap(value):
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value
