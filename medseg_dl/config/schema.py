"""The one schema of every params key: default, accepted types, bounds and meaning.

`Params` (params.py) merges a user's YAML over these defaults and validates it against
this schema; the params reference is generated from it (`medseg params-doc`). A key's `types`
lists the Python types a YAML value may have (`type(None)` allows null), `items` the types of
the elements of a list value. Every bound and choice of the project is written here once: code
that takes such a value from elsewhere than a params file checks it with `check(dotted, value)`.
"""
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from medseg_dl.config.architectures import NETWORKS
from medseg_dl.errors import ParamsError

NUMBER = (int, float)
NONE = type(None)


APPLIED, REFUSED, NO_EFFECT = "applied", "refused", "no effect"


@dataclass(frozen=True)
class OnResume:
    """What resuming a run with a changed value of a key does (experiment/resume.py): its `verdict` (APPLIED,
    REFUSED or NO_EFFECT) and `why`. `network`: the key decides whether a checkpoint fits the network, so the
    evaluator and `medseg predict` refuse its changes too."""

    verdict: str
    why: str
    network: bool = False


@dataclass(frozen=True)
class Key:
    """One params key: its default, accepted types, optional bounds/choices, and meaning."""

    default: Any
    types: tuple
    doc: str
    choices: Optional[Sequence[Any]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    length: Optional[int] = None  # required list length, when the value is a list
    items: Optional[tuple] = None  # accepted types of the elements, when the value is a list
    pattern: Optional[str] = None  # regular expression a string value must match entirely
    on_resume: Optional[OnResume] = None  # its own resume rule; None: its section's

    def check(self, value, dotted, source=""):
        """Raise `ParamsError` ("<source>: <dotted> = <value>: expected ...") unless `value` fits."""
        where = f"{source}: {dotted}" if source else dotted
        if isinstance(value, bool) and bool not in self.types:
            raise ParamsError(f"{where} = {value!r}: expected {type_names(self.types)}")
        if not isinstance(value, self.types):
            raise ParamsError(f"{where} = {value!r}: expected {type_names(self.types)}, "
                              f"got {type(value).__name__}")
        if value is None:
            return
        if self.choices is not None and not all(v in self.choices for v in (value if isinstance(value, list)
                                                                              else [value])):
            raise ParamsError(f"{where} = {value!r}: expected one of {list(self.choices)}"
                              + (" (or a list of them)" if list in self.types else ""))
        if self.pattern is not None and isinstance(value, str) and not re.fullmatch(self.pattern, value):
            raise ParamsError(f"{where} = {value!r}: expected {self.doc.split(';')[0]}")
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if self.length is not None and isinstance(value, (list, tuple)) and len(value) != self.length:
            raise ParamsError(f"{where} = {value!r}: expected a list of {self.length} values")
        if self.items is not None and not all(_is_instance(v, self.items) for v in values):
            raise ParamsError(f"{where} = {value!r}: expected a list of {type_names(self.items)}")
        for number in values:
            if not isinstance(number, (int, float)) or isinstance(number, bool):
                continue
            if self.minimum is not None and number < self.minimum:
                raise ParamsError(f"{where} = {value!r}: must be >= {self.minimum}")
            if self.maximum is not None and number > self.maximum:
                raise ParamsError(f"{where} = {value!r}: must be <= {self.maximum}")


def _is_instance(value, types):
    """isinstance that does not take a bool for an int (YAML's true is not a number of voxels)."""
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def type_names(types):
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


class Section(dict):
    """A section of the schema: its keys and sub-sections (a dict), and `on_resume`, the resume rule of those
    that state none of their own."""

    def __init__(self, on_resume: OnResume, entries: dict):
        super().__init__(entries)
        self.on_resume = on_resume


DEVICE = r"auto|cpu|gpu:\d+"


def _device(process):
    return Key("auto", (str,), f"auto, cpu or gpu:N: where the {process} runs (auto: every visible GPU, else "
                               f"the CPU); gpu:N hides the other GPUs from this process", pattern=DEVICE)


def _memory_limit(process):
    return Key(None, (int, NONE), f"GPU memory in MB the {process} may use (null: it grows as needed); set it "
                                  f"when the trainer and the evaluator share one GPU", minimum=1)


def _prob(doc="probability of applying this transform to a patch"):
    return Key(0.0, NUMBER, doc, minimum=0.0, maximum=1.0)


SCHEMA = {
    "seed": Key(42, (int,), "one seed for splits, sampling, augmentation and weights", minimum=0,
                on_resume=OnResume(REFUSED, "it fixed the split, the conversion and the initial weights")),
    "experiment": Section(OnResume(APPLIED, "recorded only (model_dir is the folder itself)"), {
        "name": Key("experiment", (str,), "experiment name, recorded in the model folder"),
        "model_dir": Key("runs/experiment", (str,), "model folder: params, file lists, checkpoints, logs, evaluations"),
    }),
    "data": Section(OnResume(REFUSED, "it defines the subjects, their split and the converted records"), {
        "source_dir": Key(None, (str, NONE), "folder of the raw dataset",
                          on_resume=OnResume(APPLIED, "the data folder may move: it must hold the same subjects "
                                             "(ids, file names and sizes, checked before anything is written); "
                                             "the file lists then point there")),
        "layout": Key("images_labels", (str,), "how subjects are laid out in source_dir",
                      choices=["images_labels", "msd", "subject_folders"]),
        "converted_dir": Key(None, (str, NONE), "where the converted cases go (one folder each, and dataset.json); "
                             "null: <model_dir>/converted"),
        "channels": Key(["image"], (list,), "channel names; subject_folders: one glob pattern per channel "
                                            "(e.g. 'Flair*.nii.gz'), msd: names only",
                        on_resume=OnResume(REFUSED, "it fixes the network's input channels", network=True)),
        "label_pattern": Key("*label*", (str,), "subject_folders: glob of the label file in a subject folder"),
        "mask_pattern": Key(None, (str, NONE), "subject_folders: glob of an optional brain/body mask"),
        "subject_glob": Key("**", (str,), "subject_folders: glob (relative to source_dir) of candidate subject "
                                          "folders"),
        "num_classes": Key(2, (int,), "number of label values, background included: labels lie in [0, num_classes)",
                           minimum=2, maximum=256,
                           on_resume=OnResume(REFUSED, "it fixes the network's outputs", network=True)),
        "class_names": Key(None, (list, NONE), "one name per class; null: class_0, class_1, ...",
                           on_resume=OnResume(APPLIED, "names in logs and reports from now on")),
        "regions": Key(None, (list, NONE), "region-based training (BraTS): a list of {name, labels: [label values], "
                       "paint: one of them}; the network ends in one sigmoid per region (soft Dice + binary "
                       "cross-entropy), metrics score regions, and predictions paint the regions back into one "
                       "label map in list order (a later region overwrites an earlier one: list the largest "
                       "first); null: one softmax over the num_classes labels", items=(dict,),
                       on_resume=OnResume(REFUSED, "it fixes the network's outputs", network=True)),
        "ignore_label": Key(None, (int, NONE), "label value of voxels left out (sparse annotations): no loss term, "
                            "no metric, never a patch centre; not a class, so >= num_classes (nnU-Net: the "
                            "highest value); null: every voxel counts", minimum=1, maximum=255,
                            on_resume=OnResume(REFUSED, "it decides which voxels the converted records' sampling "
                                               "locations and the trained network's losses counted")),
        "split": {
            "val": Key(0.2, NUMBER, "fraction of subjects for validation", minimum=0.0, maximum=1.0),
            "test": Key(0.0, NUMBER, "fraction of subjects for testing", minimum=0.0, maximum=1.0),
            "lists": Key(None, (dict, NONE), "explicit {train: [...], val: [...], test: [...]} subject ids; "
                                             "overrides the fractions"),
            "folds": Key(0, (int,), "k-fold cross-validation (nnU-Net: 5), or 0: none. The test subjects are held "
                                    "out first (the ones the same seed and fractions give without folds), the others "
                                    "are dealt into folds of balanced size; fold k validates on fold k and trains on "
                                    "the others (data.split.val then picks no validation subjects)", minimum=0),
            "fold": Key(None, (int, NONE), "the fold this model folder trains, 0..folds-1; set by --fold k, which "
                                           "trains in <model_dir>/fold_k/ (records shared in <model_dir>/converted); "
                                           "null outside cross-validation", minimum=0),
            "group_pattern": Key(None, (str, NONE), "with folds: regular expression whose first group names the "
                                                    "patient in a subject id, e.g. '^(pat\\d+)_': all subjects of a "
                                                    "patient land in one fold (and test holds whole patients); an "
                                                    "id it does not match is a patient of its own"),
        },
        "workers": Key(2, (int,), "parallel processes for conversion", minimum=1,
                       on_resume=OnResume(APPLIED, "conversion processes from now on")),
    }),
    "preprocessing": Section(OnResume(REFUSED, "the converted records and the trained network depend on it",
                                      network=True), {
        "normalization": Key("zscore", (str, list), "intensity normalisation, one for all channels or a list "
                             "with one per channel: zscore (per case), zscore_mask (per case inside the mask), "
                             "ct (clip to dataset percentiles, then dataset mean/std), none",
                             choices=["zscore", "zscore_mask", "ct", "none"]),
        "ct_percentiles": Key([0.5, 99.5], (list,), "ct: clipping percentiles of foreground intensities", length=2),
        "target_spacing_mm": Key(None, (list, NONE), "resample to this spacing (x, y, z) in mm; null keeps it",
                                 length=3),
        "reorient_ras": Key(False, (bool,), "reorient volumes to RAS at conversion"),
        "max_locations_per_class": Key(2000, (int,), "voxel locations stored per class for class-balanced "
                                                      "sampling", minimum=1),
        "affine_tolerance": Key(1e-3, NUMBER, "largest |image affine - label affine| accepted", minimum=0.0),
    }),
    "sampling": Section(OnResume(APPLIED, "the input pipeline is rebuilt at each start"), {
        "patch_size": Key([40, 56, 40], (list,), "patch size in voxels (x, y, z)", length=3, items=(int,),
                          minimum=1),
        "batch_size": Key(9, (int,), "patches per training batch (global, over all replicas)", minimum=1),
        "samples_per_volume": Key(8, (int,), "patches drawn from each loaded volume", minimum=1),
        "class_probabilities": Key(None, (list, NONE), "probability of centring a patch on each class; "
                                   "null: equal over classes present in the volume; [] : uniform centres",
                                   items=NUMBER, minimum=0.0),
        "padding": Key("constant", (str,), "how patches reaching past the volume are filled",
                       choices=["constant", "edge"]),
        "cache": Key("auto", (str, bool), "keep the decoded training volumes in memory after the first epoch: "
                     "true, false, or auto (when they fit sampling.input_budget_mb; the decision is printed)",
                     choices=["auto", True, False]),
        "input_budget_mb": Key(1024, (int,), "the most memory the loaded training volumes may take ((4 x channels "
                               "+ 1) bytes per voxel): all cached when they fit (sampling.cache auto), else as many "
                               "at once as fit, at least one", minimum=0),
        "loaded_volumes": Key(4, (int,), "without the cache: at most this many volumes read in parallel and being "
                              "sampled at once (fewer when sampling.input_budget_mb holds fewer of the largest)",
                              minimum=1),
        "patch_shuffle_buffer": Key(16, (int,), "patches in the buffer that mixes patches of different "
                                    "volumes into batches; 1: off", minimum=1),
        "deterministic": Key(False, (bool,), "repeatable order of parallel reads (slower)"),
    }),
    "augmentation": Section(OnResume(APPLIED, "the input pipeline is rebuilt at each start"), {
        "flip": {"p": _prob("probability of mirroring, drawn per axis"),
                 "axes": Key([0, 1, 2], (list,), "axes that may be mirrored")},
        "rotate": {"p": _prob(), "max_deg": Key([15.0, 15.0, 15.0], (list,),
                                                "largest rotation about each axis (x, y, z) in degrees, in mm "
                                                "space: [0, 0, a] rotates in the x-y plane only", length=3)},
        "scale": {"p": _prob(), "range": Key([0.85, 1.25], (list,), "zoom factor range (>1 enlarges)", length=2),
                  "anisotropic": Key(False, (bool,), "draw one factor per axis instead of one for all")},
        "elastic": {"p": _prob(),
                    "sigma_mm": Key([5.0, 8.0], (list,), "range of the smoothing sigma of the displacement "
                                                        "field in mm", length=2),
                    "magnitude_mm": Key([0.2, 1.2], (list,), "range of the RMS displacement in mm", length=2),
                    "grid_points": Key(7, (int,), "control points per axis of the coarse displacement grid",
                                       minimum=2)},
        "noise": {"p": _prob(), "std": Key([0.0, 0.1], (list,), "range of the Gaussian noise std", length=2)},
        "gamma": {"p": _prob(), "range": Key([0.7, 1.5], (list,), "gamma exponent range", length=2)},
        "brightness_contrast": {"p": _prob(),
                                "brightness": Key([-0.1, 0.1], (list,), "additive shift range", length=2),
                                "contrast": Key([0.75, 1.25], (list,), "multiplicative factor range", length=2)},
        "blur": {"p": _prob(), "sigma_vox": Key([0.5, 1.0], (list,), "Gaussian blur sigma range in voxels",
                                                length=2)},
    }),
    "model": Section(OnResume(REFUSED, "it fixes the network's variables in the checkpoints", network=True), {
        "architecture": Key("unet", (str,), "network, a name of the architecture registry "
                                            "(config/architectures.py: unet, medpatchnet and any registered)",
                            choices=NETWORKS),
        "base_filters": Key(16, (int,), "filters of the first stage", minimum=1),
        "depth": Key(4, (int,), "resolution levels (each halves the size)", minimum=1),
        "strides": Key(None, (list, NONE), "unet: the down-sampling of each of the depth - 1 levels below the "
                                           "first, per axis, e.g. [[2, 2, 1], [2, 2, 2], [2, 2, 2]] (no pooling of "
                                           "an axis that is already a few voxels); null: 2 on every axis",
                       items=(list,)),
        "kernel_sizes": Key(None, (list, NONE), "unet: the convolution kernel of each of the depth levels, per "
                                                "axis, e.g. [[3, 3, 1], [3, 3, 3], ...] for coarse z; null: 3",
                            items=(list,)),
        "norm": Key("instance", (str,), "normalisation layer", choices=["batch", "instance", "group", "none"]),
        "activation": Key("leaky_relu", (str,), "activation", choices=["relu", "leaky_relu", "prelu"]),
        "deep_supervision": Key(False, (bool,), "unet: extra losses on coarser decoder outputs"),
        "esp_branches": Key(4, (int,), "medpatchnet: parallel dilated branches per ESP block (rates 1,2,4,..)",
                            minimum=1),
        "use_position": Key(True, (bool,), "medpatchnet: condition dynamic convolutions on the patch position"),
        "fourier_features": Key(4, (int,), "medpatchnet: Fourier frequencies per position coordinate",
                                minimum=0),
        "dropout": Key(0.0, NUMBER, "dropout rate before the classifier", minimum=0.0, maximum=1.0),
        "residual": Key(False, (bool,), "unet: residual encoder stages (nnU-Net ResEnc style) instead of plain "
                                        "conv pairs"),
        "norm_groups": Key(8, (int,), "group norm: groups per layer (the gcd with the layer's channel count)",
                           minimum=1),
        "dynamic_experts": Key(4, (int,), "medpatchnet: expert kernels that each position-conditioned "
                                          "convolution mixes per sample", minimum=1),
        "bottleneck_kernel": Key(1, (int,), "medpatchnet: kernel size of the bottleneck's position-conditioned "
                                            "convolution (3: E times the weights and cost of a static conv)",
                                 choices=[1, 3]),
    }),
    "loss": Section(OnResume(APPLIED, "from the resume step"), {
        "name": Key("dice_ce", (str,), "loss function", choices=["dice", "jaccard", "dice_ce", "jaccard_ce", "ce"]),
        "smooth": Key(1e-5, NUMBER, "smoothing added to numerator and denominator", minimum=0.0),
        "squared_denominator": Key(False, (bool,), "square the terms of the soft Dice/Jaccard denominator"),
        "batch_dice": Key(True, (bool,), "sum over the whole batch (true) or per sample then average"),
        "include_background": Key(False, (bool,), "include class 0 in the Dice/Jaccard term"),
        "ce_weight": Key(1.0, NUMBER, "weight of cross-entropy in the combined losses", minimum=0.0),
    }),
    "training": Section(OnResume(APPLIED, "from the resume step"), {
        "steps": Key(10000, (int,), "training steps", minimum=1,
                     on_resume=OnResume(APPLIED, "the learning rate continues from its current value and decays "
                                        "to 0 at the new last step; a stale done marker is removed, so the "
                                        "evaluator follows")),
        "optimizer": Key("adam", (str,), "optimizer", choices=["adam", "adamw", "sgd"],
                         on_resume=OnResume(REFUSED, "the optimizer's state (moments, momentum) is in the "
                                            "checkpoints")),
        "learning_rate": Key(0.001, NUMBER, "initial learning rate", minimum=0.0,
                             on_resume=OnResume(APPLIED, "the schedule restarts from this rate at the resume step")),
        "schedule": Key("poly", (str,), "learning rate schedule", choices=["constant", "poly", "cosine"],
                        on_resume=OnResume(APPLIED, "from the current rate at the resume step")),
        "warmup_steps": Key(0, (int,), "linear warm-up steps", minimum=0,
                            on_resume=OnResume(NO_EFFECT, "warm-up is only at the start of the first run; a resume "
                                               "continues the schedule it restores")),
        "weight_decay": Key(0.0, NUMBER, "decoupled weight decay (adamw, sgd)", minimum=0.0),
        "momentum": Key(0.99, NUMBER, "sgd: Nesterov momentum", minimum=0.0, maximum=1.0),
        "clip_norm": Key(12.0, (int, float, NONE), "global gradient norm clipping; null: off", minimum=0.0),
        "checkpoint_every": Key(500, (int,), "steps between checkpoints", minimum=1),
        "keep_last": Key(5, (int,), "training checkpoints kept", minimum=1),
        "log_every": Key(50, (int,), "steps between scalar logs", minimum=1),
        "image_summary_every": Key(500, (int,), "steps between image summaries", minimum=1),
        "strategy": Key("auto", (str,), "tf.distribute strategy",
                        choices=["auto", "default", "mirrored", "multi_worker"]),
        "precision": Key("auto", (str,), "compute precision (variables, loss and logits stay float32): "
                         "auto (mixed_bfloat16 where bfloat16 is native: a CPU with AVX512-BF16 or AMX, a GPU of "
                         "compute capability 8.0+; float32 elsewhere; the choice is printed at start); float32; "
                         "mixed_bfloat16 (no loss scaling); mixed_float16 (GPUs; dynamic loss scaling)",
                         choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"],
                         on_resume=OnResume(REFUSED, "mixed_float16's loss-scale state is in the checkpoints "
                                            "(and not in others)")),
        "jit_compile": Key(False, (bool,), "XLA-compile the training step (for GPUs; on a CPU XLA does not use "
                           "oneDNN's convolutions: measured 13x slower on a 2-core AVX512 CPU, so never on by "
                           "default)"),
        "device": _device("trainer"),
        "gpu_memory_limit_mb": _memory_limit("trainer"),
        "input_service": Key(None, (str, NONE), "address of a tf.data service dispatcher (grpc://HOST:PORT, started "
                             "with `medseg input-service dispatcher`) whose workers make the training batches when "
                             "this host's cores cannot feed its GPUs; null: this process makes them",
                             pattern=r"grpc://[^\s:]+:\d+"),
    }),
    "evaluation": Section(OnResume(APPLIED, "read by the evaluator when it starts (restart it to apply)"), {
        "overlap": Key(0.5, NUMBER, "fractional overlap of sliding windows", minimum=0.0, maximum=0.95),
        "blending": Key("gaussian", (str,), "window weighting", choices=["gaussian", "constant"]),
        "batch_size": Key(4, (int,), "windows per inference batch", minimum=1),
        "keep_best": Key(3, (int,), "best checkpoints kept in <model_dir>/best", minimum=1),
        "metric": Key("mean_dice", (str,), "selection metric of summary.json (higher is better)",
                      choices=["mean_dice"]),
        "tta_mirroring": Key(False, (bool,), "average predictions over all 8 mirrorings"),
        "accumulation": Key("float32", (str,), "precision of the sliding-window sums behind probabilities and "
                                               "labels: float32, or float16 (half the live sums; window logits "
                                               "shifted per voxel by their maximum; probabilities within about "
                                               "1e-3, "
                                               "a few labels in a million may differ)",
                            choices=["float32", "float16"]),
        "save_predictions": Key(False, (bool,), "write NIfTI predictions under eval/<step>/"),
        "save_overlays": Key(True, (bool,), "write overlay PNGs under eval/<step>/"),
        "surface_tolerance_mm": Key(1.0, NUMBER, "tolerance of the surface Dice", minimum=0.0),
        "poll_seconds": Key(10.0, NUMBER, "watch mode: seconds between checks for new checkpoints",
                            minimum=0.0),
        "device": _device("evaluator (and predict)"),
        "gpu_memory_limit_mb": _memory_limit("evaluator (and predict)"),
        "checkpoint_process": Key("auto", (str,), "evaluate each checkpoint in a child process, so that nothing "
                                                   "stays in GPU memory between checkpoints: auto (when a GPU is "
                                                   "used), always, never", choices=["auto", "always", "never"]),
    }),
}


def lookup(tree, dotted):
    """The entry at a dotted name such as "evaluation.overlap" in a nested mapping (the schema, a params dict,
    a `Params`: anything indexed by section, then key); `KeyError` for an unknown one. The one walk over dotted
    names."""
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def key(dotted, schema=SCHEMA):
    """The `Key` of a dotted name such as "evaluation.overlap"; `KeyError` for an unknown one."""
    entry = lookup(schema, dotted)
    if not isinstance(entry, Key):
        raise KeyError(f"{dotted} is a section, not a key")
    return entry


def resume_rule(dotted):
    """The `OnResume` of a dotted key: its own, else that of the innermost section that states one."""
    tree, rule = SCHEMA, None
    for part in dotted.split("."):
        tree = tree[part]
        rule = getattr(tree, "on_resume", None) or rule
    return rule


def resume_rules(tree=SCHEMA, prefix=""):
    """(dotted name, `OnResume`) of every section and key that states its own rule, in schema order."""
    for name, entry in tree.items():
        if getattr(entry, "on_resume", None) is not None:
            yield prefix + name, entry.on_resume
        if isinstance(entry, dict):
            yield from resume_rules(entry, prefix + name + ".")


def check(dotted, value):
    """Check one value against the schema's rule for `dotted`; returns it, or raises `ParamsError`."""
    key(dotted).check(value, dotted)
    return value


def check_argument(argument, value, dotted):
    """Check the value of a library function's `argument` against the rule of the params key `dotted` (the one
    place of that rule); returns it, or raises `ValueError` naming the argument, not a key of a params file
    (the config layer checks the params and names their keys)."""
    try:
        key(dotted).check(value, argument)
    except ParamsError as err:
        raise ValueError(str(err)) from None
    return value
