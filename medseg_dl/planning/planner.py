"""An experiment derived from a dataset fingerprint (`medseg plan`): the rules, after nnU-Net's.

- Target spacing: the median spacing per axis; for anisotropic data (an axis more than ANISOTROPY x
  coarser than the finest) the coarse axis takes the 10th percentile of its spacings instead
  (nnU-Net's rule: less blur of the thin axis). No resampling when every case is at it already.
- Network: a U-Net whose levels pool an axis by 2 only while its spacing is at most twice the finest
  current spacing and its feature map keeps MIN_FEATURE_VOX voxels; kernels are 1 along an axis that
  is still that much coarser (anisotropic kernels), else 3; at most MAX_LEVELS levels.
- Patch: the median shape at the target spacing, rounded up to a multiple of the total stride of
  each axis, then shrunk along its largest axis until the estimated activation memory fits the GPU
  budget (`gpu_memory_gb`), or, without a GPU, until it has at most CPU_PATCH_VOXELS voxels.
- Batch: with a GPU, as many patches as the memory budget holds (at least 2); on a CPU, CPU_BATCH.
- Normalisation per channel: z-score per case for MRI (inside the mask when the layout has one), for
  CT clipping to the dataset's foreground 0.5 / 99.5 percentiles then the dataset mean and std.
- Augmentation: nnU-Net's ranges; rotation in-plane only (about the coarse axis) for anisotropic data.
- Recipe: GPU_RECIPE (nnU-Net's) with a GPU; CPU_RECIPE, measured on a 2-core CPU, without one. The
  precision is left to training.precision's default, auto (bfloat16 where the training machine computes
  it natively).
Every key the rules set carries its reason as a comment in the written YAML.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple


ANISOTROPY = 3.0
MIN_FEATURE_VOX = 4
MAX_LEVELS = 6
MAX_FILTERS = 320
CPU_PATCH_VOXELS = 64 ** 3
CPU_BATCH = 4
# estimated training memory per activation (float32 conv-norm-act pairs, forward + backward), calibrated
# so that nnU-Net's reference 3d_fullres (base 32, 6 levels, 128^3, batch 2) needs about 10 GB
BYTES_PER_ACTIVATION = 56.0

GPU_RECIPE = {
    "model.base_filters": (32, "nnU-Net's 32 filters at full resolution, doubling per level up to 320"),
    "model.deep_supervision": (True, "nnU-Net: losses on the coarser decoder outputs too"),
    "loss.name": ("dice_ce", "nnU-Net: soft Dice + cross-entropy"),
    "training.optimizer": ("sgd", "nnU-Net: SGD with Nesterov momentum 0.99"),
    "training.learning_rate": (0.01, "nnU-Net's initial rate, poly decay to 0"),
    "training.steps": (250000, "nnU-Net: 1000 epochs of 250 iterations"),
}
# the median training step of the planned hippocampus experiment on 2 CPU cores (its 60-minute run in
# docs/benchmarks.md, 'Accuracy'; benchmarks/results/hippocampus_accuracy.jsonl), from which the CPU recipe's
# time is stated
CPU_STEP_S = 0.49
CPU_STEPS = 4000
CPU_RECIPE = {
    "model.base_filters": (16, "a CPU budget: see docs/benchmarks.md, 'Accuracy'"),
    "model.deep_supervision": (True, "losses on the coarser decoder outputs too (nnU-Net)"),
    "loss.name": ("dice_ce", "soft Dice + cross-entropy (nnU-Net)"),
    "training.optimizer": ("adam", "test Dice 0.856 against 0.835 for nnU-Net's SGD (0.01, Nesterov 0.99) after 1000 "
                                   "steps of the planned hippocampus experiment on 2 CPU cores, and ahead at every "
                                   "200 steps (docs/benchmarks.md, 'Accuracy')"),
    "training.learning_rate": (0.003, "the Adam rate of the CPU runs in docs/benchmarks.md, 'Accuracy' "
                                      "(no other rate measured)"),
    "training.steps": (CPU_STEPS, f"about {CPU_STEPS * CPU_STEP_S / 60:.0f} minutes at the {CPU_STEP_S} s/step "
                                  f"measured on 2 CPU cores for a hippocampus-sized patch "
                                  "(docs/benchmarks.md, 'Accuracy')"),
}


def target_spacing(fingerprint: Dict) -> Tuple[List[float], bool, str]:
    """(spacing (3,) mm, whether the data needs resampling, why)."""
    spacing = fingerprint["spacing_mm"]
    median = list(spacing["median"])
    coarse = int(max(range(3), key=lambda a: median[a]))
    finest = min(median)
    why = f"the median spacing {median} mm"
    if median[coarse] > ANISOTROPY * finest:
        median[coarse] = spacing["p10"][coarse]
        why = (f"anisotropic (axis {coarse} {spacing['median'][coarse]:.3g} mm vs {finest:.3g} mm): the median "
               f"spacing, and the 10th percentile {median[coarse]:.3g} mm along axis {coarse} (nnU-Net)")
    same = all(abs(lo - hi) < 1e-3 and abs(lo - m) < 1e-3 for lo, hi, m in
               zip(spacing["min"], spacing["max"], median))
    if same:
        why = f"every case is already at {median} mm: no resampling"
    return [round(float(s), 4) for s in median], not same, why


def network_shape(shape_vox: Sequence[float], spacing_mm: Sequence[float]) -> Tuple[List[List[int]], List[List[int]]]:
    """(strides: one [sx, sy, sz] per down-sampling, kernels: one [kx, ky, kz] per level) for a patch."""
    size, current = [float(s) for s in shape_vox], [float(s) for s in spacing_mm]
    strides, kernels = [], []
    while len(kernels) < MAX_LEVELS:
        finest = min(current)
        kernels.append([3 if c <= 2 * finest else 1 for c in current])
        pool = [2 if (c <= 2 * finest and size[a] / 2 >= MIN_FEATURE_VOX) else 1 for a, c in enumerate(current)]
        if len(kernels) == MAX_LEVELS or 2 not in pool:
            break
        strides.append(pool)
        size = [s / p for s, p in zip(size, pool)]
        current = [c * p for c, p in zip(current, pool)]
    return strides, kernels


def total_stride(strides: Sequence[Sequence[int]]) -> List[int]:
    return [int(math.prod(level[a] for level in strides)) for a in range(3)]


def round_up(shape: Sequence[float], multiple: Sequence[int]) -> List[int]:
    return [int(math.ceil(s / m) * m) for s, m in zip(shape, multiple)]


def memory_gb(patch: Sequence[int], strides, base_filters: int, batch: int) -> float:
    """Estimated training memory of the U-Net on `batch` patches (BYTES_PER_ACTIVATION per activation)."""
    size, activations = list(patch), 0.0
    for level in range(len(strides) + 1):
        activations += math.prod(size) * min(base_filters * 2 ** level, MAX_FILTERS)
        if level < len(strides):
            size = [s / p for s, p in zip(size, strides[level])]
    return batch * activations * BYTES_PER_ACTIVATION / 1e9


def patch_and_batch(median_shape: Sequence[float], spacing_mm: Sequence[float], base_filters: int,
                    gpu_memory_gb: Optional[float]) -> Tuple[List[int], List[List[int]], List[List[int]], int, str]:
    """(patch (3,) voxels, strides, kernels, batch, why) for the median shape at the target spacing."""
    shape = list(median_shape)
    while True:
        strides, kernels = network_shape(shape, spacing_mm)
        patch = round_up(shape, total_stride(strides))
        fits = memory_gb(patch, strides, base_filters, 2) <= gpu_memory_gb if gpu_memory_gb else \
            math.prod(patch) <= CPU_PATCH_VOXELS
        if fits or max(shape) <= MIN_FEATURE_VOX:
            break
        largest = max(range(3), key=lambda a: shape[a] * spacing_mm[a])
        shape[largest] *= 0.9  # nnU-Net shrinks the largest axis step by step
    strides, kernels = network_shape(patch, spacing_mm)  # the levels the final patch allows
    patch = round_up(patch, total_stride(strides))
    if gpu_memory_gb:
        batch = max(2, int(gpu_memory_gb // memory_gb(patch, strides, base_filters, 1)))
        why = (f"the median shape {[round(s) for s in median_shape]} at the target spacing, rounded up to the "
               f"total stride {total_stride(strides)}, shrunk to fit {gpu_memory_gb:g} GB (estimated "
               f"{memory_gb(patch, strides, base_filters, batch):.1f} GB for batch {batch})")
    else:
        batch = CPU_BATCH
        why = (f"the median shape {[round(s) for s in median_shape]} at the target spacing, rounded up to the "
               f"total stride {total_stride(strides)}, at most {CPU_PATCH_VOXELS} voxels (no GPU: a CPU budget)")
    return patch, strides, kernels, batch, why


def normalization(modalities: Sequence[str], has_mask: bool) -> Tuple[List[str], str]:
    """One method per channel from its modality (MRI or CT)."""
    methods = ["ct" if m.upper() == "CT" else ("zscore_mask" if has_mask else "zscore") for m in modalities]
    reasons = {"ct": "CT: clip to the dataset's foreground 0.5/99.5 percentiles, then its mean and std",
               "zscore": "MRI: z-score per case", "zscore_mask": "MRI: z-score per case inside the mask"}
    return methods, "; ".join(reasons[m] for m in dict.fromkeys(methods)) + " (nnU-Net)"


def augmentation(anisotropic_axis: Optional[int]) -> Tuple[Dict, str]:
    """nnU-Net's augmentation ranges; rotation in-plane only (about the coarse axis) when anisotropic."""
    degrees = [0.0, 0.0, 0.0] if anisotropic_axis is not None else [30.0, 30.0, 30.0]
    why = "nnU-Net's ranges: rotation up to 30 degrees about each axis (in mm), scale 0.7-1.4"
    if anisotropic_axis is not None:
        degrees[anisotropic_axis] = 180.0
        why = (f"anisotropic data: rotation in-plane only, about axis {anisotropic_axis}, up to 180 degrees "
               f"(nnU-Net); scale 0.7-1.4")
    return {"flip": {"p": 0.5}, "rotate": {"p": 0.2, "max_deg": degrees}, "scale": {"p": 0.2, "range": [0.7, 1.4]},
            "noise": {"p": 0.1, "std": [0.0, 0.1]}, "blur": {"p": 0.2, "sigma_vox": [0.5, 1.0]},
            "brightness_contrast": {"p": 0.15}, "gamma": {"p": 0.3}}, why


def num_classes(fingerprint: Dict, ignore_label: Optional[int]) -> int:
    """The label values that are classes: those of the fingerprinted cases below the ignore label, if any."""
    return fingerprint["num_classes"] if ignore_label is None else min(fingerprint["num_classes"], ignore_label)


def plan(fingerprint: Dict, data: Dict, modalities: Sequence[str], gpu_memory_gb: Optional[float],
         name: str) -> Tuple[Dict[str, object], Dict[str, str]]:
    """({dotted key: value}, {dotted key: why}) of the experiment for a fingerprinted dataset. data: the
    data section to write (source_dir, layout, channels, patterns, class_names, and regions and ignore_label
    where the dataset declares them)."""
    spacing, resample, spacing_why = target_spacing(fingerprint)
    source = fingerprint["spacing_mm"]["median"]
    median_shape = [m * s / t for m, s, t in zip(fingerprint["shape_vox"]["median"], source, spacing)]
    recipe = GPU_RECIPE if gpu_memory_gb else CPU_RECIPE
    base = recipe["model.base_filters"][0]
    patch, strides, kernels, batch, patch_why = patch_and_batch(median_shape, spacing, base, gpu_memory_gb)
    coarse = int(max(range(3), key=lambda a: spacing[a]))
    anisotropic = spacing[coarse] > ANISOTROPY * min(spacing)
    methods, norm_why = normalization(modalities, bool(data.get("mask_pattern")))
    aug, aug_why = augmentation(coarse if anisotropic else None)
    per_volume = max(1, min(4, round(math.prod(median_shape) / math.prod(patch))))
    values = {"experiment.name": name, "experiment.model_dir": f"runs/{name}",
              **{f"data.{k}": v for k, v in data.items()},
              "data.num_classes": num_classes(fingerprint, data.get("ignore_label")),
              "data.split": {"val": 0.2, "test": 0.0},
              "preprocessing.normalization": methods if len(methods) > 1 else methods[0],
              "preprocessing.target_spacing_mm": spacing if resample else None,
              "sampling.patch_size": patch, "sampling.batch_size": batch, "sampling.samples_per_volume": per_volume,
              **{f"augmentation.{k}": v for k, v in aug.items()},
              "model.architecture": "unet", "model.depth": len(kernels),
              "model.strides": strides if any(1 in s for s in strides) else None,
              "model.kernel_sizes": kernels if any(1 in k for k in kernels) else None,
              "model.norm": "instance", "model.activation": "leaky_relu",
              **{k: v for k, (v, _) in recipe.items()}, "training.schedule": "poly",
              "training.checkpoint_every": max(1, recipe["training.steps"][0] // 20),
              "evaluation.tta_mirroring": True}
    if values["training.optimizer"] == "sgd":
        values.update({"training.momentum": 0.99, "training.weight_decay": 3e-5})
    why = {"data.num_classes": f"label values 0..{values['data.num_classes'] - 1} in the {fingerprint['cases']} cases"
                               + (" (below the ignore label)" if data.get("ignore_label") is not None else ""),
           "data.regions": "regions declared in dataset.json (labels given as lists), painted in its "
                           "regions_class_order: one sigmoid per region, scored as regions",
           "data.ignore_label": "the 'ignore' label of dataset.json: left out of losses, metrics and patch centres",
           "preprocessing.normalization": norm_why, "preprocessing.target_spacing_mm": spacing_why,
           "sampling.patch_size": patch_why, "sampling.batch_size": patch_why.split(", shrunk")[0] if gpu_memory_gb
           else f"a CPU budget ({CPU_BATCH} patches per step)",
           "sampling.samples_per_volume": f"about {per_volume} patch(es) fill the median volume",
           "augmentation.rotate": aug_why,
           "model.depth": f"poolings while each axis keeps {MIN_FEATURE_VOX}+ voxels, at most {MAX_LEVELS} levels",
           "model.strides": "no pooling of an axis that is much coarser or already small (nnU-Net)",
           "model.kernel_sizes": "kernel 1 along an axis that is still much coarser (anisotropic kernels)",
           "model.norm": "instance norm, leaky ReLU (nnU-Net)", **{k: w for k, (_, w) in recipe.items()},
           "evaluation.tta_mirroring": "average over the 8 mirrorings at test time (nnU-Net)"}
    return values, why
