"""What the tests share beside the fixtures of conftest.py: the repository and data paths, writers of
synthetic and real-looking volumes (NIfTI, DICOM, ITK formats), and small params for a few training steps;
conversions expected to fail.
Import it as `helpers` (tests/ is on sys.path: conftest.py lies there)."""
import csv
import os
import re

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
import yaml

from medseg_dl.config.params import Params
from medseg_dl.data import store
from medseg_dl.data.convert import convert_dataset
from medseg_dl.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
HIPPO = os.path.join(DATA, "msd_hippocampus")
BRATS = os.path.join(DATA, "brats2015_deepmedic")
BRATS_SUBJECT = os.path.join(BRATS, "train", "brats_2013_pat0005_1")
HIPPO_CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]


# What a CPU user must not see on stderr (tests/integration/test_logs.py, test_end_to_end.py)
TENSORFLOW_NOISE = [
    re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d"),  # a C++ log line in absl's format: I0000 00:00:1796518796.45 ...
    re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IE] "),  # INFO/ERROR in TensorFlow's own older format
    re.compile("cuInit"),  # the CUDA platform's failed start on a machine without an NVIDIA driver (E-level)
    re.compile("oneDNN custom operations"),  # the INFO notice that oneDNN kernels are on
    re.compile("absl::InitializeLog"),  # absl's notice that it logs to stderr before it is set up
    re.compile("leaked semaphore"),  # multiprocessing's resource tracker: a conversion worker was killed
]
# the environment a user runs `medseg` in: without the TF_CPP_MIN_LOG_LEVEL this suite sets, without CUDA_VISIBLE_DEVICES
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}


def tensorflow_noise(stderr):
    """The lines of `stderr` (str) that match TENSORFLOW_NOISE."""
    return [line for line in stderr.splitlines() if any(p.search(line) for p in TENSORFLOW_NOISE)]


def hippo_params(root, model_dir, **sections):
    """A params dict for the hippocampus layout in `root`, merged with `sections`."""
    params = {"experiment": {"name": "t", "model_dir": str(model_dir)},
              "data": {"source_dir": str(root), "layout": "images_labels", "channels": ["mri"],
                       "num_classes": 3, "workers": 1, "split": {"val": 0.25, "test": 0.0}}}
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    return params


def write_nifti(path, data, affine=None):
    """Save `data` as NIfTI with `affine` (identity by default)."""
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def tilted_affine(degrees=20.0, spacing_mm=(0.7, 0.9, 2.5), origin_mm=(60.5, 80.25, -40.75)):
    """voxel -> RAS mm of an axial DICOM series as a scanner writes it (columns toward the patient's left, rows
    toward posterior, slices toward superior: LPS axis codes), tilted by `degrees` about the left-right axis,
    with anisotropic `spacing_mm` (columns, rows, slices)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    affine = np.eye(4)
    affine[:3, :3] = np.array([[-1.0, 0.0, 0.0], [0.0, -c, -s], [0.0, -s, c]]) @ np.diag(spacing_mm)
    affine[:3, 3] = origin_mm
    return affine


def write_itk_twin(nifti_path, path):
    """Convert a NIfTI file to `path` (.nrrd, .mha or .mhd with its .raw: the format of the suffix) with SimpleITK's
    own reader and writer; only the voxels and the geometry are carried over."""
    import SimpleITK as sitk
    image = sitk.ReadImage(str(nifti_path))
    twin = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(image))
    twin.CopyInformation(image)
    sitk.WriteImage(twin, str(path))


DICOM_STORAGE = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def write_dicom_series(folder, data, affine, modality="CT", series_uid=None, description="", prefix="IM",
                       intercept=-1024.0):
    """Write `data` (X, Y, Z) integers as a DICOM series with pydicom, one file per slice (`<prefix><k>.dcm`, k from
    1) in `folder`: slice k is data[:, :, k].T (Rows = Y, Columns = X), int16 stored as data - `intercept`
    (RescaleSlope 1), placed by `affine` (4, 4) voxel -> RAS mm (its third column along the slice normal), tags
    as a scanner writes them (decimal strings of at most 16 characters). Returns the file paths, slice order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import format_number_as_ds

    decimal = lambda values: [format_number_as_ds(float(v)) for v in values]
    os.makedirs(folder, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, np.float64)[:3]
    spacing_mm = np.linalg.norm(lps[:, :3], axis=0)
    orientation = np.concatenate([lps[:, 0] / spacing_mm[0], lps[:, 1] / spacing_mm[1]])
    shared = {"PatientID": "MEDSEG-0001", "PatientName": "Test^Formats", "PatientBirthDate": "19700101",
              "PatientSex": "O", "StudyID": "1", "AccessionNumber": "A1", "ReferringPhysicianName": "",
              "StudyTime": "120000", "StudyInstanceUID": generate_uid(),
              "SeriesInstanceUID": series_uid or generate_uid(), "FrameOfReferenceUID": generate_uid(),
              "Modality": modality, "SeriesDescription": description, "SeriesNumber": 3, "StudyDate": "20240102",
              "ImageOrientationPatient": decimal(orientation), "PixelSpacing": decimal(spacing_mm[[1, 0]]),
              "SliceThickness": decimal(spacing_mm[2:])[0], "Rows": data.shape[1], "Columns": data.shape[0],
              "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 16,
              "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 1, "RescaleSlope": "1",
              "RescaleIntercept": format_number_as_ds(intercept), "SOPClassUID": DICOM_STORAGE[modality]}
    paths = []
    for k in range(data.shape[2]):
        dataset = Dataset()
        for keyword, value in shared.items():
            setattr(dataset, keyword, value)
        dataset.SOPInstanceUID = generate_uid()
        dataset.InstanceNumber = k + 1
        dataset.ImagePositionPatient = decimal(lps @ [0.0, 0.0, k, 1.0])
        dataset.PixelData = np.ascontiguousarray(data[:, :, k].T - intercept).astype("<i2").tobytes()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        paths.append(os.path.join(folder, f"{prefix}{k + 1:04d}.dcm"))
        dataset.save_as(paths[-1], enforce_file_format=True)
    return paths


def synthetic_dataset(root, cases=4, shape=(20, 20, 20), seed=0):
    """images/ + labels/ of `cases` noisy volumes with a bright sphere (label 1) and a dark cube (label 2)."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    for i in range(cases):
        centre = rng.uniform(6, np.array(shape) - 6)
        label = np.zeros(shape, np.uint8)
        label[np.linalg.norm(grid - centre, axis=-1) < 4] = 1
        corner = rng.integers(1, np.array(shape) - 6)
        cube = tuple(slice(c, c + 4) for c in corner)
        label[cube] = np.where(label[cube] == 0, 2, label[cube])
        image = np.choose(label, [0.0, 2.0, -2.0]) + rng.normal(0, 0.3, shape)
        write_nifti(root / "images" / f"case_{i:02d}.nii.gz", image.astype(np.float32))
        write_nifti(root / "labels" / f"case_{i:02d}.nii.gz", label)
    return root


def tiny_params(root, model_dir, **sections):
    """A params dict for a tiny, fast experiment on `synthetic_dataset(root)`."""
    params = {"seed": 3, "experiment": {"name": "tiny", "model_dir": str(model_dir)},
              "data": {"source_dir": str(root), "layout": "images_labels", "channels": ["img"],
                       "num_classes": 3, "workers": 1, "split": {"val": 0.25}},
              "sampling": {"patch_size": [12, 12, 12], "batch_size": 2, "samples_per_volume": 2},
              "model": {"architecture": "unet", "base_filters": 4, "depth": 2},
              "training": {"steps": 20, "learning_rate": 0.01, "checkpoint_every": 5, "keep_last": 2,
                           "log_every": 5, "image_summary_every": 10}}
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    return params


def leftovers(folder):
    """Temporary or record files of a conversion that failed on its only subject."""
    if not os.path.isdir(folder):
        return []
    return [f for f in os.listdir(folder) if ".tmp" in f or f.endswith(store.CASE_SUFFIX)]


def convert_expecting(tmp_path, root, match, **sections):
    params = Params.from_dict(hippo_params(root, tmp_path / "run", **sections))
    with pytest.raises(DataError, match=match) as err:
        convert_dataset(params)
    return params, str(err.value)


def synthetic_case(root, name="case", shape=(8, 9, 10), image=None, label=None, label_affine=None):
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_nifti(root / "images" / f"{name}.nii.gz",
                np.random.rand(*shape).astype(np.float32) if image is None else image)
    write_nifti(root / "labels" / f"{name}.nii.gz",
                np.zeros(shape, np.uint8) if label is None else label, label_affine)


def tiny_params_file(tmp_path, **sections):
    """The path of a params file for a few training steps on a synthetic dataset in tmp_path/data (made once),
    model folder tmp_path/run, merged with `sections`."""
    root = synthetic_dataset(tmp_path / "data") if not (tmp_path / "data").exists() else tmp_path / "data"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_params(root, tmp_path / "run", **sections)))
    return str(path)


def read_scalars(model_dir):
    """The rows of a model folder's logs/train/scalars.csv, as dicts of strings."""
    with open(model_dir.scalars_csv) as f:
        return list(csv.DictReader(f))


def checkpoint_counters(path):
    """(step, optimizer iterations) saved in the checkpoint `path`."""
    reader = tf.train.load_checkpoint(path)
    return int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")), \
        int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))


def damage_checkpoint(prefix, damage):
    """Damage the checkpoint `prefix`: "truncated data" halves its data file, anything else removes its index."""
    if damage == "truncated data":
        data = prefix + ".data-00000-of-00001"
        os.truncate(data, os.path.getsize(data) // 2)
    else:
        os.remove(prefix + ".index")


def ellipsoid_dataset(root, spacing, shape, channels=1, hu=False, cases=4):
    """images/ + labels/: a bright ellipsoid (1) with a core (2); intensities in HU when `hu`."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    for i in range(cases):
        centre = np.array(shape) * np.array(spacing) / 2 + rng.uniform(-2, 2, 3)
        distance = np.linalg.norm((grid - centre) / [6.0, 6.0, 8.0], axis=-1)
        label = (distance < 1).astype(np.uint8) + (distance < 0.5)
        base = np.choose(label, [-900.0, 40.0, 80.0]) if hu else np.choose(label, [0.0, 1.0, 2.0])
        image = np.stack([base + rng.normal(0, 20 if hu else 0.2, shape) * (c + 1) for c in range(channels)], -1)
        affine = np.diag([*spacing, 1.0])
        write_nifti(root / "images" / f"c{i}.nii.gz", image[..., 0] if channels == 1 else image, affine)
        write_nifti(root / "labels" / f"c{i}.nii.gz", label, affine)
    return root


def fold_root(tmp_path):
    """An experiment root tmp_path/experiment with fold_0, fold_2, fold_10 (each with a params.yaml); fold_1
    without one; fold_x and other/ beside, which are not folds."""
    root = tmp_path / "experiment"
    for name in ("fold_0", "fold_2", "fold_10", "fold_x", "other"):
        (root / name).mkdir(parents=True)
        (root / name / "params.yaml").write_text("{}\n")
    (root / "fold_1").mkdir()
    return root
