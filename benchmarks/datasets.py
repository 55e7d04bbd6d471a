"""The data the benchmarks run on: the bundled folders beside the checkout (../shared/data) and the synthetic
CT-like cases of BENCHMARKS.md's W6-W8, written once under a work folder."""
import os

import nibabel as nib
import numpy as np

from harness import REPO

DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
HIPPO = os.path.join(DATA, "msd_hippocampus")
BRATS = os.path.join(DATA, "brats2015_deepmedic")
BRATS_SUBJECT = os.path.join(BRATS, "train", "brats_2013_pat0005_1")  # the one volume of W2 and W4
BRATS_CHANNEL_FILES = ("Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz")
# `medseg plan` / `--set` of the BraTS folder: its channels, labels, mask and class names
BRATS_PATTERNS = ["data.channels=[Flair*.nii.gz, T1c*.nii.gz]", "data.label_pattern=OTMultiClass*.nii.gz",
                  "data.mask_pattern=brainmask*.nii.gz",
                  "data.class_names=[background, necrosis, edema, non_enhancing, enhancing]"]
HIPPO_CLASS_NAMES = "data.class_names=[background, anterior, posterior]"
CT_SPACING_MM = (0.8, 0.8, 2.5)


def read_brats_image(subject_dir):
    """The FLAIR and T1c volumes of a BraTS subject folder as one (X, Y, Z, 2) float32 image."""
    from medseg_dl.data.io import read_volume

    channels = [read_volume(os.path.join(subject_dir, name)).data for name in BRATS_CHANNEL_FILES]
    return np.stack(channels, axis=-1).astype(np.float32, copy=False)


def synthetic_ct(shape, classes, rng):
    """(image (X, Y, Z) int16 HU, label (X, Y, Z) uint8) of BENCHMARKS.md's CT-like case: air (-1000) outside a
    body ellipse filling ~70% of each slice, smooth soft tissue (0-80 HU) plus noise (std 20) inside, and
    classes - 1 ellipsoid organs of 2-15% of the body each with their own mean HU."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    body = (x / 0.95) ** 2 + (y / 0.75) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)
    smooth = 40 + 40 * np.sin(3 * x + rng.uniform(0, 6)) * np.cos(2 * y + rng.uniform(0, 6)) * np.cos(z * 2)
    image = np.where(body, smooth + rng.normal(0, 20, shape).astype(np.float32), -1000.0)
    label = np.zeros(shape, np.uint8)
    body_fraction = body.mean()
    for organ in range(1, classes):
        volume = rng.uniform(0.02, 0.15) * body_fraction * 8 / (4 / 3 * np.pi)  # of the [-1, 1]^3 cube
        radii = volume ** (1 / 3) * rng.uniform(0.7, 1.3, 3)
        centre = rng.uniform(-0.5, 0.5, 3) * np.array([0.8, 0.6, 0.7])
        inside = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + \
                 ((z - centre[2]) / radii[2]) ** 2 <= 1.0
        inside &= body
        label[inside] = organ
        image[inside] += rng.uniform(-60, 120)
    return np.clip(image, -1024, 3071).astype(np.int16), label


def write_cases(folder, count, shape, classes, seed=0):
    """images/ and labels/ of `count` seeded cases under `folder` (written once: existing files are kept)."""
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    affine = np.diag([*CT_SPACING_MM, 1.0])
    for i in range(count):
        names = [os.path.join(folder, sub, f"case_{i:03d}.nii.gz") for sub in ("images", "labels")]
        if all(os.path.exists(n) for n in names):
            continue
        image, label = synthetic_ct(shape, classes, np.random.default_rng([seed, i]))
        nib.save(nib.Nifti1Image(label, affine), names[1])
        nib.save(nib.Nifti1Image(image, affine), names[0])
