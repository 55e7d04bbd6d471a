"""Shared fixtures: copies of a few real cases (the shared data is read-only) and synthetic volumes."""
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
HIPPO = os.path.join(DATA, "msd_hippocampus")
BRATS = os.path.join(DATA, "brats2015_deepmedic")
HIPPO_CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]


@pytest.fixture(autouse=True)
def float32_policy():
    """Every test starts and ends with Keras' float32 policy: training sets the global policy (precision "auto"
    is mixed_bfloat16 on a CPU with AVX512-BF16 or AMX), which would leak into the tests that follow."""
    import keras
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def hippo_dir(tmp_path):
    """A writable images/ + labels/ folder with four real hippocampus cases (003 has a float label)."""
    root = tmp_path / "hippo"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
        for case in HIPPO_CASES:
            shutil.copy(os.path.join(HIPPO, sub, case + ".nii.gz"), root / sub)
    return root


@pytest.fixture
def brats_subject_dir(tmp_path):
    """A subject_folders layout with one real BraTS subject."""
    source = os.path.join(BRATS, "train", "brats_2013_pat0005_1")
    target = tmp_path / "brats" / "brats_2013_pat0005_1"
    shutil.copytree(source, target)
    return tmp_path / "brats"


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
