"""W1 of BENCHMARKS.md: training input pipeline throughput in patches/s (higher is better).

    python benchmarks/input_pipeline.py --workload W1a [--quick] [--peers]

Decoded, z-scored volumes are held in memory; each library draws class-balanced patches with flips,
rotation, scaling, elastic deformation and Gaussian noise; batches are fetched and thrown away.
After a warm-up, 3 segments are timed (W1a 288 patches, W1b 200, W1b peers 16: they run at about
1 patch/s; `segment_patches`); the figure is the median rate (every segment's kept: `value_runs`).

With --peers (and torch, monai, torchio importable by the peers' interpreter) MONAI and TorchIO run
the same workload in the same run, TorchIO twice: its usual Queue (the transform on each subject, 8 patches
per draw) and per patch (each patch sampled from the untransformed subject, then transformed). Every (workload,
library) runs in its own subprocess, with the library's own interpreter (`harness.python_for`;
`isolated` on its line), one after the other; each peer line gets a `ratio` key and
the medseg_dl line, printed last, `ratio_<peer>` keys (ours / theirs). One JSON line per
(workload, library), kept in benchmarks/results/input_pipeline.jsonl (not with --quick).
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np
from datasets import BRATS, HIPPO
from harness import ChildFailed, peers_available, run_python, speedup, spread
from machine_info import record

from medseg_dl.data.io import read_volume
from medseg_dl.data.preprocess import class_locations, normalize

WORKLOADS = {
    "W1a": {"patch": [40, 56, 40], "batch": 9, "classes": 3, "segment": 288, "peer_segment": 288},
    "W1b": {"patch": [96, 96, 96], "batch": 2, "classes": 5, "segment": 200, "peer_segment": 16},
}
SAMPLES_PER_VOLUME = 8
ROTATE_DEG, SCALE_RANGE, NOISE_STD = 15.0, (0.85, 1.25), 0.1
LONG_EPOCH = 2000  # patches per peer epoch (cases repeated or drawn with replacement)
QUEUE_LENGTH = 16  # TorchIO's queue refills every 16 patches: peer segments are multiples of 16


# --- data ---------------------------------------------------------------------------------------


def load_cases(workload, quick):
    """List of dicts: image (X, Y, Z, C) float32 z-scored per case, label (X, Y, Z) int32, subject."""
    cases = []
    if workload == "W1a":
        labels = sorted(glob.glob(os.path.join(HIPPO, "labels", "*.nii.gz")))[: 8 if quick else None]
        for path in labels:
            image = read_volume(path.replace(os.sep + "labels" + os.sep, os.sep + "images" + os.sep)).data
            cases.append({"image": normalize(image[..., None].astype(np.float32), "zscore"),
                          "label": np.rint(read_volume(path).data).astype(np.int32),
                          "subject": os.path.basename(path).split(".")[0]})
    else:
        folders = sorted(glob.glob(os.path.join(BRATS, "*", "brats_*")))[: 1 if quick else None]
        for folder in folders:
            channels = [read_volume(glob.glob(os.path.join(folder, f"{name}*.nii.gz"))[0]).data.astype(np.float32)
                        for name in ("Flair", "T1c")]
            cases.append({"image": normalize(np.stack(channels, axis=-1), "zscore"),
                          "label": np.rint(read_volume(os.path.join(folder, "OTMultiClass.nii.gz")).data).astype(
                              np.int32),
                          "subject": os.path.basename(folder)})
    return cases


def padded_to(array, size, channel_first):
    """`array` zero-padded at the end of its spatial axes to at least `size` (peers need this)."""
    spatial = array.shape[1:] if channel_first else array.shape[:3]
    pads = [(0, max(0, s - n)) for s, n in zip(size, spatial)]
    return np.pad(array, ([(0, 0)] + pads) if channel_first else pads + [(0, 0)] * (array.ndim - 3))


# --- timing -------------------------------------------------------------------------------------


def timed_rates(next_batch, warmup_patches, segment_patches, segments=3):
    """Patches/s of `segments` timed segments after a warm-up; next_batch() returns its patch count."""
    done = 0
    while done < warmup_patches:
        done += next_batch()
    rates = []
    for _ in range(segments):
        count, start = 0, time.perf_counter()
        while count < segment_patches:
            count += next_batch()
        rates.append(count / (time.perf_counter() - start))
    return rates


def result_line(workload, library, rates, **details):
    return {"workload": workload, "library": library, **spread(rates, 3), "unit": "patches/s", **details}


# --- medseg_dl ------------------------------------------------------------------------------------


def medseg_params(spec):
    from medseg_dl.config.params import Params

    classes = spec["classes"]
    return Params.from_dict({
        "seed": 0,
        "data": {"num_classes": classes},
        "sampling": {"patch_size": spec["patch"], "batch_size": spec["batch"],
                     "samples_per_volume": SAMPLES_PER_VOLUME, "class_probabilities": [1.0 / classes] * classes},
        "augmentation": {"flip": {"p": 0.5}, "rotate": {"p": 1.0, "max_deg": [ROTATE_DEG] * 3},
                         "scale": {"p": 1.0, "range": list(SCALE_RANGE)},
                         "elastic": {"p": 1.0, "sigma_mm": [5.0, 8.0], "magnitude_mm": [0.2, 1.2],
                                     "grid_points": 7},
                         "noise": {"p": 1.0, "std": [NOISE_STD, NOISE_STD]}}})


def memory_dataset(cases, num_classes):
    """A tf.data.Dataset of volume dicts (as pipeline/inputs.py `read_case` reads them) from in-memory cases."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    locations, counts, voxels = zip(*[class_locations(c["label"], num_classes, 2000, rng) for c in cases])

    def ragged(arrays):  # row i: arrays[i] with its leading axes flattened ((N,) or (N, 3))
        rows = [a.reshape(-1, *a.shape[1:]) if a.ndim == 2 else a.ravel() for a in arrays]
        return tf.RaggedTensor.from_row_lengths(np.concatenate(rows), [len(r) for r in rows])

    slices = {"image": ragged([c["image"] for c in cases]), "label": ragged([c["label"] for c in cases]),
              "class_locations": ragged(list(locations)), "class_location_counts": np.stack(counts),
              "class_voxels": np.stack(voxels),
              "shape": np.array([c["label"].shape for c in cases], np.int32),
              "spacing_mm": np.ones((len(cases), 3), np.float32),  # both workloads are 1 mm isotropic
              "subject": [c["subject"] for c in cases]}
    channels = cases[0]["image"].shape[-1]

    def unflatten(case):
        return {**case, "image": tf.reshape(case["image"], tf.concat([case["shape"], [channels]], 0)),
                "label": tf.reshape(case["label"], case["shape"])}

    return tf.data.Dataset.from_tensor_slices(slices).map(unflatten)


def run_medseg(workload, cases, quick):
    from medseg_dl.pipeline.inputs import patch_dataset, prepare_volume

    spec = WORKLOADS[workload]
    params = medseg_params(spec)
    volumes = memory_dataset(cases, spec["classes"]).map(lambda volume: prepare_volume(volume, "constant"))
    volumes = volumes.cache().shuffle(64, seed=0).repeat()
    iterator = iter(patch_dataset(volumes, params, seed=0, in_flight=params.sampling.loaded_volumes))

    def next_batch():
        return int(next(iterator)["image"].shape[0])

    start = time.perf_counter()
    first = next_batch()
    warmup = len(cases) * SAMPLES_PER_VOLUME  # one pass: every size bucket compiled
    segment = 2 * spec["batch"] if quick else spec["segment"]
    rates = timed_rates(next_batch, max(warmup - first, 0), segment)
    return result_line(workload, "medseg_dl", rates, cases=len(cases), first_batch_s=round(time.perf_counter() -
                       start, 1), samples_per_volume=SAMPLES_PER_VOLUME,
                       segment_patches=segment)


# --- peers ---------------------------------------------------------------------------------------


def loader_rates(loader, patches_in, spec, quick):
    """timed_rates over a torch DataLoader (re-iterated when an epoch ends); patches_in(batch) -> int."""
    batches = iter(())

    def next_batch():
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        return patches_in(batch)

    segment = 2 * spec["batch"] if quick else spec["peer_segment"]
    return timed_rates(next_batch, 2 * spec["batch"], segment), segment


def run_monai(workload, cases, quick):
    import monai
    import torch
    from monai import transforms as mt

    spec = WORKLOADS[workload]
    classes, patch = spec["classes"], spec["patch"]
    region = [min(int(np.ceil(p * 1.5)), max(c["label"].shape[i] for c in cases)) for i, p in enumerate(patch)]
    data = [{"image": padded_to(np.moveaxis(c["image"], -1, 0), region, True),
             "label": padded_to(c["label"][None], region, True)} for c in cases]
    deterministic = [mt.ClassesToIndicesd(keys="label", num_classes=classes)]
    random = [mt.RandCropByLabelClassesd(keys=["image", "label"], label_key="label", spatial_size=region,
                                         ratios=[1] * classes, num_classes=classes, num_samples=1,
                                         indices_key="label_cls_indices", warn=False),
              mt.Rand3DElasticd(keys=["image", "label"], sigma_range=(5, 8), magnitude_range=(50, 150), prob=1.0,
                                spatial_size=patch, rotate_range=[np.deg2rad(ROTATE_DEG)] * 3,
                                scale_range=[(SCALE_RANGE[0] - 1, SCALE_RANGE[1] - 1)] * 3,
                                mode=("bilinear", "nearest"), padding_mode="zeros"),
              *[mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=axis) for axis in range(3)],
              mt.RandGaussianNoised(keys="image", prob=1.0, std=NOISE_STD)]
    dataset = monai.data.CacheDataset(data, mt.Compose(deterministic + random), progress=False)
    endless = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=LONG_EPOCH)
    loader = monai.data.DataLoader(dataset, batch_size=spec["batch"], sampler=endless, num_workers=2,
                                   persistent_workers=True, drop_last=True)
    rates, segment = loader_rates(loader, lambda batch: int(batch["image"].shape[0]), spec, quick)
    return result_line(workload, "monai", rates, cases=len(cases), crop_region=region, workers=2,
                       scale="1+U(-0.15,0.25) per axis", segment_patches=segment)


def torchio_parts(spec, cases):
    """TorchIO subjects (padded to the patch size), the W1 transform and the class-balanced sampler."""
    import torchio as tio

    subjects = [tio.Subject(image=tio.ScalarImage(tensor=padded_to(np.moveaxis(c["image"], -1, 0), spec["patch"],
                                                                   True)),
                            label=tio.LabelMap(tensor=padded_to(c["label"][None], spec["patch"], True)))
                for c in cases]
    transform = tio.Compose([tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5),
                             tio.RandomAffine(scales=SCALE_RANGE, degrees=ROTATE_DEG, p=1.0),
                             tio.RandomElasticDeformation(num_control_points=7, max_displacement=7.5, p=1.0),
                             tio.RandomNoise(std=(NOISE_STD, NOISE_STD), p=1.0)])
    sampler = tio.LabelSampler(spec["patch"], label_name="label",
                               label_probabilities={k: 1 for k in range(spec["classes"])})
    return subjects, transform, sampler


class PerPatchDataset:
    """TorchIO per patch: item i draws one patch of subject i % n with `sampler`, then transforms it."""

    def __init__(self, subjects, sampler, transform):
        self.subjects, self.sampler, self.transform = subjects, sampler, transform

    def __len__(self):
        return LONG_EPOCH

    def __getitem__(self, index):
        return self.transform(next(iter(self.sampler(self.subjects[index % len(self.subjects)], 1))))


def run_torchio(workload, cases, quick, per_patch):
    """TorchIO's usual Queue (the transform on each subject, 8 patches per draw), or per patch."""
    import torch
    import torchio as tio

    spec = WORKLOADS[workload]
    subjects, transform, sampler = torchio_parts(spec, cases)
    if per_patch:
        loader = torch.utils.data.DataLoader(PerPatchDataset(subjects, sampler, transform), batch_size=spec["batch"],
                                             shuffle=True, num_workers=2, persistent_workers=True, drop_last=True)
    else:
        repeats = -(-LONG_EPOCH // (len(subjects) * SAMPLES_PER_VOLUME))  # no worker restarts while timing
        queue = tio.Queue(tio.SubjectsDataset(subjects * repeats, transform=transform), max_length=QUEUE_LENGTH,
                          samples_per_volume=SAMPLES_PER_VOLUME, sampler=sampler, num_workers=2)
        loader = torch.utils.data.DataLoader(queue, batch_size=spec["batch"], num_workers=0)
    rates, segment = loader_rates(loader, lambda batch: int(batch["image"][tio.DATA].shape[0]), spec, quick)
    return result_line(workload, "torchio", rates, cases=len(cases), mode="per_patch" if per_patch else "queue",
                       samples_per_volume=1 if per_patch else SAMPLES_PER_VOLUME, workers=2,
                       segment_patches=segment)


RUNNERS = {"medseg_dl": run_medseg, "monai": run_monai,
           "torchio": lambda w, c, q: run_torchio(w, c, q, per_patch=False),
           "torchio_per_patch": lambda w, c, q: run_torchio(w, c, q, per_patch=True)}


def run_in_subprocess(workload, library, quick, timeout_s=1800):
    """The JSON line of one (workload, library) run in a fresh interpreter; None (reported on stderr)
    if it fails or takes longer than `timeout_s`."""
    arguments = [os.path.abspath(__file__), "--workload", workload, "--library", library, *["--quick"] * quick]
    try:
        measured, isolated = run_python(library, arguments, timeout_s=timeout_s)
    except ChildFailed as failure:
        print(f"{workload} {library}: no result ({failure})", file=sys.stderr)
        return None
    return {**measured.result, "isolated": isolated}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
    parser.add_argument("--quick", action="store_true", help="few cases and patches (a smoke run)")
    parser.add_argument("--peers", action="store_true", help="also run MONAI and TorchIO (if importable)")
    parser.add_argument("--library", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--label", help="names the checkout on medseg_dl's line (e.g. a before/after pair)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for workload in args.workload or sorted(WORKLOADS):
        if args.library:  # a child of run_in_subprocess: its parent keeps the line
            print(json.dumps(RUNNERS[args.library](workload, load_cases(workload, args.quick), args.quick)), flush=True)
            continue
        if not (args.peers and peers_available({"monai": "monai, torch, torchio"})):
            line = RUNNERS["medseg_dl"](workload, load_cases(workload, args.quick), args.quick)
            record("input_pipeline", {**line, **({"label": args.label} if args.label else {})}, keep=not args.quick)
            continue
        ours = run_in_subprocess(workload, "medseg_dl", args.quick)
        for library in list(RUNNERS)[1:]:  # each peer line as soon as it is measured
            line = run_in_subprocess(workload, library, args.quick)
            if line and ours:
                line["ratio"] = ours[f"ratio_{library}"] = speedup(ours, line, digits=2)
            if line:
                record("input_pipeline", line, keep=not args.quick)
        if ours:
            record("input_pipeline", ours, keep=not args.quick)


if __name__ == "__main__":
    main()
