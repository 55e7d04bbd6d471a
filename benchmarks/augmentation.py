"""W4 of BENCHMARKS.md: elastic deformation + rotation of one whole BraTS volume and its label map.

    python benchmarks/augmentation.py [--workload W4] [--quick] [--peers] [--repetitions 3]

The volume: FLAIR and T1c of one subject (240x240x155x2 float32, 1 mm voxels) and its label map
(OTMultiClass, labels 0..4, rounded to int32), read once by the parent and handed to each library's
fresh subprocess as .npy files, so that its peak RSS (imports, the arrays and the deformation; measured by
the harness, `harness.RSS_METHOD`) is its own. Every call deforms the image (linear
interpolation, zero padding) and the label map (nearest) with one new random field (seeded by the
repetition) and the same rotation, ANGLES_DEG about x, y, z (one fixed draw of U(-15, 15) degrees),
each library in its own angle convention. The elastic fields are matched in RMS displacement, about
2 mm per component (measured on coordinate images); their forms are each library's own:
- medseg_dl `deform_volume`: 7^3 standard normal control points, Gaussian-smoothed (sigma 6.5 mm),
  linearly interpolated, RMS exactly 2 mm; one XLA-compiled sampling pass in slabs along x.
- MONAI `Rand3DElasticd(prob=1)`: the dense form, per-voxel U(-1, 1) offsets smoothed by a Gaussian
  of sigma 6.5 voxels times magnitude 385 (RMS 0.0052 x 385 = 2.0 voxels), rotation via rotate_range.
- TorchIO `RandomAffineElasticDeformation` (affine and elastic in one SimpleITK resampling): 7
  control points, cubic B-spline, U(-13.3, 13.3) mm per point (borders locked; RMS 0.15 x 13.3 =
  2.0 mm), rotation fixed by degrees=(a, a, b, b, c, c), scale 1.
- elasticdeform `deform_random_grid`: 3^3 control points of normal displacements, sigma 2.85 voxels,
  cubic B-spline (RMS 0.70 x 2.85 = 2.0 voxels), the rotation as its output affine about the middle,
  order 1 (image) and 0 (label). It needs numpy < 2 (0.5.1 is built against numpy 1): it runs in
  its own environment (benchmarks/venvs.sh); its subprocess imports only numpy and elasticdeform.
Each library runs with its own interpreter (`harness.python_for`; `isolated` on its line).
The figure is the median s/volume of the repetitions (each kept: `value_runs`) after one warm-up
(`first_call_s`: the warm-up, with medseg_dl's XLA compilation); medseg_dl's line adds
speedup_vs_<peer> = peer s / our s.
`--quick`: a 64x64x48 crop, one repetition (a smoke run; nothing is kept in benchmarks/results/).
"""
import argparse
import json
import os
import tempfile

import numpy as np
from datasets import BRATS_SUBJECT, read_brats_image
from harness import add_ratios, peers_available, run_python, spread, timed_runs
from machine_info import record

LABEL_FILE = "OTMultiClass.nii.gz"
ANGLES_DEG = (4.11, -6.91, -13.77)  # about x, y, z: np.random.default_rng(0).uniform(-15, 15, 3), rounded
RMS_MM = 2.0
MONAI_SIGMA_VOX, MONAI_MAGNITUDE = 6.5, 385.0
TORCHIO_POINTS, TORCHIO_MAX_MM = 7, 13.3
ELASTICDEFORM_POINTS, ELASTICDEFORM_SIGMA_VOX = 3, 2.85
PEERS = ("monai", "torchio", "elasticdeform")


def write_volume(subject_dir, quick, folder):
    """Write the workload's image.npy (X, Y, Z, 2) float32 and label.npy (X, Y, Z) int32 into `folder`;
    quick: a 64x64x48 crop."""
    from medseg_dl.data.io import read_volume
    image = read_brats_image(subject_dir)
    label = np.rint(read_volume(os.path.join(subject_dir, LABEL_FILE)).data).astype(np.int32)
    if quick:
        image, label = image[88:152, 88:152, 54:102], label[88:152, 88:152, 54:102]
    np.save(os.path.join(folder, "image.npy"), np.ascontiguousarray(image, np.float32))
    np.save(os.path.join(folder, "label.npy"), np.ascontiguousarray(label))


def run_medseg_dl(image, label, repetitions):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from medseg_dl.pipeline.whole_volume import deform_volume
    return timed_runs(lambda seed: deform_volume(image, label, rotation_deg=ANGLES_DEG, elastic_sigma_mm=6.5,
                                                 elastic_magnitude_mm=RMS_MM, elastic_grid_points=7, seed=seed),
                      repetitions)


def run_monai(image, label, repetitions):
    import torch
    from monai.transforms import Rand3DElasticd
    torch.set_grad_enabled(False)
    transform = Rand3DElasticd(["image", "label"], sigma_range=(MONAI_SIGMA_VOX,) * 2,
                               magnitude_range=(MONAI_MAGNITUDE,) * 2, prob=1.0,
                               rotate_range=[(a, a) for a in np.deg2rad(ANGLES_DEG)], mode=("bilinear", "nearest"),
                               padding_mode="zeros")
    data = {"image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0))),
            "label": torch.from_numpy(label[None])}

    def deform(seed):
        transform.set_random_state(seed)
        return transform(data)

    return timed_runs(deform, repetitions)


def run_torchio(image, label, repetitions):
    import torch
    import torchio as tio
    channels_first = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))
    subject = tio.Subject(image=tio.ScalarImage(tensor=channels_first),
                          label=tio.LabelMap(tensor=torch.from_numpy(label[None])))
    degrees = [bound for angle in ANGLES_DEG for bound in (angle, angle)]
    transform = tio.RandomAffineElasticDeformation(
        affine_kwargs={"scales": 0, "degrees": degrees, "default_pad_value": 0},
        elastic_kwargs={"num_control_points": TORCHIO_POINTS, "max_displacement": TORCHIO_MAX_MM})

    def deform(seed):
        torch.manual_seed(seed)
        return transform(subject)

    return timed_runs(deform, repetitions)


def middle_rotation_affine(shape_vox):
    """(3, 4) output affine of elasticdeform: the rotation by ANGLES_DEG (x, then y, then z) about the middle."""
    rotation = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(ANGLES_DEG)):
        plane = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[np.ix_(plane, plane)] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        rotation = turn @ rotation
    middle = (np.asarray(shape_vox) - 1) / 2
    return np.concatenate([rotation, (middle - rotation @ middle)[:, None]], axis=1)


def run_elasticdeform(image, label, repetitions):
    import elasticdeform
    affine = middle_rotation_affine(label.shape)

    def deform(seed):
        np.random.seed(seed)
        return elasticdeform.deform_random_grid([image, label], sigma=ELASTICDEFORM_SIGMA_VOX,
                                                points=ELASTICDEFORM_POINTS, order=[1, 0], mode="constant",
                                                axis=[(0, 1, 2), (0, 1, 2)], affine=affine)

    return timed_runs(deform, repetitions)


RUNNERS = {"medseg_dl": run_medseg_dl, "monai": run_monai, "torchio": run_torchio,
           "elasticdeform": run_elasticdeform}


def child(library, args):
    """Run one library and print its raw measurements as one JSON object."""
    image = np.load(os.path.join(args.volume_dir, "image.npy"))
    label = np.load(os.path.join(args.volume_dir, "label.npy"))
    warmup_s, times = RUNNERS[library](image, label, args.repetitions)  # each runner: harness.timed_runs
    print(json.dumps({"times": times, "first_call_s": warmup_s[0], "shape": list(image.shape)}))


def measure(library, args):
    """Raw measurements of one library, from a fresh subprocess with its peak RSS."""
    measured, isolated = run_python(library, [os.path.abspath(__file__), "--child", library,
                                              "--repetitions", args.repetitions, "--volume-dir", args.volume_dir])
    return {**measured.result, "peak_rss_mb": measured.peak_rss_mb, "isolated": isolated}


def line(library, raw):
    """The BENCHMARKS.md JSON line of one library."""
    return {"workload": "W4", "library": library, **spread(raw["times"], 4), "unit": "s",
            "peak_rss_mb": round(raw["peak_rss_mb"], 1),
            "first_call_s": round(raw["first_call_s"], 4), "shape": raw["shape"],
            "rotation_deg": list(ANGLES_DEG), "elastic_rms_mm": RMS_MM, "isolated": raw["isolated"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W4", choices=["W4"])
    parser.add_argument("--quick", action="store_true", help="small crop, one repetition (smoke run)")
    parser.add_argument("--peers", action="store_true",
                        help="also run MONAI, TorchIO and elasticdeform when importable")
    parser.add_argument("--repetitions", type=int, default=None, help="timed runs after the warm-up (default 3)")
    parser.add_argument("--subject-dir", default=BRATS_SUBJECT, help="folder of the BraTS subject")
    parser.add_argument("--child", metavar="LIBRARY", help=argparse.SUPPRESS)
    parser.add_argument("--volume-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repetitions is None:
        args.repetitions = 1 if args.quick else 3
    if args.child:
        child(args.child, args)
        return
    libraries = ["medseg_dl"] + (peers_available({peer: peer for peer in PEERS}) if args.peers else [])
    with tempfile.TemporaryDirectory() as folder:
        write_volume(args.subject_dir, args.quick, folder)
        args.volume_dir = folder
        lines = [line(library, measure(library, args)) for library in libraries]
    for other in lines[1:]:  # speedup_vs_<peer> (peer s / our s) on the medseg_dl line
        add_ratios(lines[0], other, other["library"], rss=False)
    for item in lines:
        record("augmentation", item, keep=not args.quick)


if __name__ == "__main__":
    main()
