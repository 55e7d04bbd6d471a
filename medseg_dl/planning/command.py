"""`medseg plan`: fingerprint a dataset folder, derive an experiment (planner.py), write it as a commented
params file whose derived keys say why, and the fingerprint beside it (`<name>.plan.json` for `<name>.yaml`)."""
import json
import os
from typing import Dict, List, Optional, Sequence

import yaml

from medseg_dl.config import schema
from medseg_dl.config.params import Params, default_class_name, defaults_dict, parse_override
from medseg_dl.data.io import read_volume
from medseg_dl.data.subjects import find_subjects, msd_channel_names
from medseg_dl.data.targets import regions_from_dataset_json
from medseg_dl.errors import ParamsError
from medseg_dl.planning.fingerprint import dataset_fingerprint
from medseg_dl.planning.planner import num_classes, plan
from medseg_dl.runtime import atomic



def fingerprint_path(output: str) -> str:
    """The plan.json beside a planned params file: <name>.plan.json for <name>.yaml."""
    root, _ = os.path.splitext(output)
    return root + ".plan.json"


def run_plan(data_dir: str, layout: str, output: str, modalities: Sequence[str] = (),
             gpu_memory_gb: Optional[float] = None, overrides: Sequence[str] = ()) -> str:
    """Plan the dataset in `data_dir` (layout `layout`; `overrides` such as data.channels=[...] for
    subject_folders) and write `output` (YAML) and its fingerprint beside it (`fingerprint_path`);
    returns the YAML's path. The YAML keeps `data_dir` as given (a relative path is resolved against
    the working directory when the params are loaded)."""
    data = {**defaults_dict()["data"], "source_dir": os.path.abspath(data_dir), "layout": layout,
            **_data_overrides(overrides)}
    data["channels"] = _channels(data, overrides)
    modalities = list(modalities) or _modalities(data)
    if len(modalities) != len(data["channels"]):
        raise ParamsError(f"--modality gives {len(modalities)} values for {len(data['channels'])} channels "
                          f"{data['channels']}; give one per channel (MRI or CT)")
    fingerprint = dataset_fingerprint(data)
    name = os.path.basename(os.path.normpath(data_dir))
    data_as_given = {**data, "source_dir": data_dir}
    written = {k: data_as_given[k] for k in ("source_dir", "layout", "channels", "label_pattern", "mask_pattern",
                                    "subject_glob") if data[k] is not None and _given(k, data, overrides)}
    written.update(_declared_targets(data))
    written["class_names"] = _class_names(data, num_classes(fingerprint, written.get("ignore_label")))
    values, why = plan(fingerprint, written, modalities, gpu_memory_gb, name)
    for override in overrides:  # the user's --set wins over the plan
        key, value = parse_override(override)
        values[key], why[key] = value, "given with --set"
    params = Params.from_dict(_nest(values), source=output)  # the planned file must validate
    header = (f"# Planned by `medseg plan` from the {fingerprint['cases']} cases of {fingerprint['source_dir']}\n"
              f"# ({'GPU budget ' + str(gpu_memory_gb) + ' GB' if gpu_memory_gb else 'no GPU: a CPU budget'}; "
              f"fingerprint: {os.path.basename(fingerprint_path(output))} beside this file).\n"
              f"# Each planned key says why; every other key takes its default (`medseg params-doc`).\n")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    atomic.write_text(output, header + render(_nest(values), why))
    atomic.write_json(fingerprint_path(output),
                      {"fingerprint": fingerprint, "planned": values, "why": why, "modalities": modalities,
                       "gpu_memory_gb": gpu_memory_gb, "seed": params.seed})
    return output


def render(nested: Dict, why: Dict[str, str], prefix: str = "", indent: int = 0) -> str:
    """YAML of a nested dict, each key whose dotted name is in `why` followed by its reason."""
    lines = []
    for key, value in nested.items():
        dotted, pad = prefix + key, "  " * indent
        comment = f"  # {why[dotted]}" if dotted in why else ""
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:{comment}")
            lines.append(render(value, why, dotted + ".", indent + 1))
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...")
            lines.append(f"{pad}{key}: {text.removesuffix('...').strip()}{comment}")
    return "\n".join(lines) + ("\n" if indent == 0 else "")


def _data_overrides(overrides: Sequence[str]) -> Dict:
    """The data.* keys of `--set` overrides, each checked against the schema."""
    found = {}
    for override in overrides:
        key, value = parse_override(override)
        if key.startswith("data."):
            found[key[len("data."):]] = schema.check(key, value)
    return found


def _nest(values: Dict[str, object]) -> Dict:
    nested: Dict = {}
    for dotted, value in values.items():
        node = nested
        *sections, last = dotted.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
    return nested


def _given(key, data, overrides):
    return key in ("source_dir", "layout", "channels") or key in _data_overrides(overrides)


def _channels(data: Dict, overrides: Sequence[str]) -> List[str]:
    """The channel names (msd: from dataset.json; images_labels: 'image', or image_0..C-1 for 4D files)."""
    if "channels" in _data_overrides(overrides) or data["layout"] == "subject_folders":
        return list(data["channels"])
    if data["layout"] == "msd":
        with open(os.path.join(data["source_dir"], "dataset.json")) as f:
            return msd_channel_names(json.load(f))
    first = read_volume(find_subjects({**data, "channels": ["image"]})[0].channels[0]).data
    return ["image"] if first.ndim == 3 else [f"image_{c}" for c in range(first.shape[3])]


def _modalities(data: Dict) -> List[str]:
    """CT for channels named CT (MSD's dataset.json), else MRI."""
    return ["CT" if name.upper() == "CT" else "MRI" for name in data["channels"]]


def _dataset_json(data: Dict) -> Optional[str]:
    """The msd layout's dataset.json, or None."""
    path = os.path.join(data["source_dir"], "dataset.json")
    return path if data["layout"] == "msd" and os.path.isfile(path) else None


def _declared_targets(data: Dict) -> Dict:
    """{"regions": ..., "ignore_label": ...} as far as the msd layout's dataset.json declares them (nnU-Net v2:
    labels with lists and regions_class_order; an "ignore" label), else {}."""
    path = _dataset_json(data)
    regions, ignore = regions_from_dataset_json(path) if path else (None, None)
    return {k: v for k, v in (("regions", regions), ("ignore_label", ignore)) if v is not None}


def _class_names(data: Dict, num_classes: int) -> List[str]:
    """Names from an MSD dataset.json's "labels" (a label value's name; regions and "ignore" name none: class_<k>),
    else class_0, class_1, ..."""
    path = _dataset_json(data)
    if path:
        labels = json.load(open(path)).get("labels", {})
        by_value = {int(v): k for k, v in labels.items() if isinstance(v, int) and k != "ignore"} \
            if labels and not list(labels)[0].isdigit() else {int(k): v for k, v in labels.items()}
        if by_value and set(by_value) <= set(range(num_classes)):
            return [str(by_value.get(k, default_class_name(k))) for k in range(num_classes)]
    return data["class_names"] if data["class_names"] and len(data["class_names"]) == num_classes else \
        [default_class_name(k) for k in range(num_classes)]
