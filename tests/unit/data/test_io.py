"""Reading and writing volumes (data/io.py, data/dicom.py): a real case converted by SimpleITK to NRRD, MHA and
MHD, and written by pydicom as an oblique DICOM series with anisotropic voxels, reads with the voxels and the
world geometry of its NIfTI twin; what `write_volume` writes reads back as written; a DICOM folder that is not
one evenly spaced series is refused with one line naming the folder and the series."""
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest

from helpers import (HIPPO, HIPPO_CASES, convert_expecting, synthetic_case, tilted_affine, write_dicom_series,
                     write_itk_twin)
from medseg_dl.data import store
from medseg_dl.data.io import output_suffix, read_volume, write_volume
from medseg_dl.errors import DataError

CASE = "hippocampus_001"


@pytest.fixture
def nifti_twin(tmp_path):
    """(path, data (X, Y, Z) uint8, affine) of a real MR image saved as NIfTI with a tilted, anisotropic affine."""
    data = np.asanyarray(nib.load(os.path.join(HIPPO, "images", f"{CASE}.nii.gz")).dataobj)
    path = tmp_path / "twin.nii.gz"
    nib.save(nib.Nifti1Image(data, tilted_affine()), str(path))
    return path, data, nib.load(str(path)).affine


def affine_of_tags(paths):
    """voxel (column, row, slice) -> RAS mm computed from the DICOM tags of `paths` alone: ImageOrientationPatient,
    PixelSpacing (row spacing, column spacing) and the ImagePositionPatient of the first two slices along the
    slice normal."""
    slices = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    orientation = np.asarray(slices[0].ImageOrientationPatient, np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = sorted((np.asarray(s.ImagePositionPatient, np.float64) for s in slices), key=lambda p: p @ normal)
    row_mm, column_mm = map(float, slices[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = orientation[:3] * column_mm, orientation[3:] * row_mm
    lps[:3, 2], lps[:3, 3] = positions[1] - positions[0], positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_nrrd_mha_and_mhd_read_as_their_nifti_twin(nifti_twin, tmp_path, suffix):
    nifti_path, data, affine = nifti_twin
    path = tmp_path / f"twin{suffix}"
    write_itk_twin(nifti_path, path)
    assert suffix != ".mhd" or (tmp_path / "twin.raw").is_file()
    volume, twin = read_volume(path), read_volume(nifti_path)
    np.testing.assert_array_equal(twin.data, data)
    assert volume.data.dtype == data.dtype
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_allclose(volume.affine, twin.affine, rtol=0, atol=1e-5)
    np.testing.assert_allclose(volume.spacing_mm, (0.7, 0.9, 2.5), rtol=1e-6)
    assert nib.aff2axcodes(volume.affine) == nib.aff2axcodes(affine) == ("L", "P", "S")


def test_an_oblique_dicom_series_reads_with_the_voxels_and_affine_of_its_tags(nifti_twin, tmp_path):
    """A CT series tilted 20 degrees with 0.7 x 0.9 x 2.5 mm voxels, its files named against the slice order: the
    voxels as written (RescaleIntercept applied), the affine the tags give, and its NIfTI twin's geometry."""
    nifti_path, data, _ = nifti_twin
    values = data.astype(np.int16) - 1000  # HU-like, negative
    paths = write_dicom_series(tmp_path / "series", values, tilted_affine(), description="tilted", intercept=-1024.0)
    for k, path in enumerate(paths):  # file names in the reverse slice order
        os.rename(path, tmp_path / "series" / f"S{len(paths) - k:04d}.dcm")
    volume = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(volume.data, values)
    expected = affine_of_tags(sorted((tmp_path / "series").iterdir()))
    np.testing.assert_allclose(volume.affine, expected, rtol=0, atol=1e-9)
    twin = read_volume(nifti_path)
    np.testing.assert_allclose(volume.affine, twin.affine, rtol=0, atol=1e-5)
    np.testing.assert_allclose(volume.spacing_mm, twin.spacing_mm, rtol=1e-6)
    assert nib.aff2axcodes(volume.affine) == nib.aff2axcodes(twin.affine) == ("L", "P", "S")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_volume_reads_back_as_written(tmp_path, suffix):
    """uint8 labels with a tilted affine and with a left-handed one read back with the same voxels and affine."""
    labels = np.random.default_rng(0).integers(0, 3, (7, 8, 9)).astype(np.uint8)
    mirrored = tilted_affine() @ np.diag([1.0, -1.0, 1.0, 1.0])
    for affine in (tilted_affine(), mirrored):
        write_volume(tmp_path / f"labels{suffix}", labels, affine)
        volume = read_volume(tmp_path / f"labels{suffix}")
        assert volume.data.dtype == np.uint8
        np.testing.assert_array_equal(volume.data, labels)
        atol = 1e-6 if suffix == ".nii.gz" else 1e-12  # NIfTI stores the affine in float32
        np.testing.assert_allclose(volume.affine, affine, rtol=0, atol=atol)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"labels{suffix}"]


def test_output_suffix_is_the_input_format_or_nifti():
    assert [output_suffix(p) for p in ("a.nrrd", "a.nhdr", "a.mha", "a.mhd", "a.nii", "a.nii.gz", "/x/series")] == [
        ".nrrd", ".nrrd", ".mha", ".mha", ".nii.gz", ".nii.gz", ".nii.gz"]


def small_series(folder, **kwargs):
    """An MR series of 8 x 9 x 6 voxels (1.2 x 1.1 x 3 mm, tilted) in `folder`; returns its file paths."""
    values = np.arange(8 * 9 * 6).reshape(8, 9, 6) % 300
    return write_dicom_series(folder, values, tilted_affine(spacing_mm=(1.2, 1.1, 3.0)), modality="MR", intercept=0.0,
                              **kwargs)


def refused(folder):
    """The message of the `DataError` that reading `folder` raises, checked to be one line naming the folder."""
    with pytest.raises(DataError) as raised:
        read_volume(folder)
    message = str(raised.value)
    assert message.startswith(f"{folder}: ") and "\n" not in message
    return message


def test_a_folder_of_two_dicom_series_is_refused_naming_both(tmp_path):
    small_series(tmp_path / "mixed", series_uid="1.2.826.0.1.3", description="T1", prefix="A")
    small_series(tmp_path / "mixed", series_uid="1.2.826.0.1.4", description="T2", prefix="B")
    assert refused(tmp_path / "mixed") == (f"{tmp_path / 'mixed'}: 2 DICOM series (1.2.826.0.1.3 'T1', "
                                           f"1.2.826.0.1.4 'T2'); put each series in its own folder")


def test_a_missing_slice_is_refused_naming_the_series_and_the_gap(tmp_path):
    paths = small_series(tmp_path / "gap", series_uid="1.2.826.0.1.5", description="T1 axial")
    os.remove(paths[2])
    message = refused(tmp_path / "gap")
    assert "DICOM series 1.2.826.0.1.5 'T1 axial' misses about 1 slice(s): a gap of 6 mm after IM0002.dcm, 3 mm " \
           "between the other slices; export the whole series again" in message


def test_uneven_slice_spacing_is_refused_naming_the_series(tmp_path):
    """One slice 0.1 mm (3% of the 3 mm step) off its place along the normal."""
    paths = small_series(tmp_path / "uneven", series_uid="1.2.826.0.1.6")
    dataset = pydicom.dcmread(paths[3])
    orientation = np.asarray(dataset.ImageOrientationPatient, np.float64)
    shifted = np.asarray(dataset.ImagePositionPatient, np.float64) + 0.1 * np.cross(orientation[:3], orientation[3:])
    dataset.ImagePositionPatient = [f"{v:.6f}" for v in shifted]
    dataset.save_as(paths[3])
    assert refused(tmp_path / "uneven").endswith(
        "DICOM series 1.2.826.0.1.6 has uneven slice spacing (steps of 2.9 to 3.1 mm, median 3 mm); export it again "
        "with evenly spaced slices")


def test_a_slice_without_position_is_refused_naming_the_file(tmp_path):
    paths = small_series(tmp_path / "unplaced", series_uid="1.2.826.0.1.7")
    dataset = pydicom.dcmread(paths[4])
    del dataset.ImagePositionPatient
    dataset.save_as(paths[4])
    assert refused(tmp_path / "unplaced").endswith(
        "IM0005.dcm of DICOM series 1.2.826.0.1.7 has no ImagePositionPatient or ImageOrientationPatient; remove "
        "the files that are not image slices")


def test_a_folder_without_dicom_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a DICOM file")
    assert refused(tmp_path / "empty").endswith("no DICOM files; give a folder holding the files of one DICOM series")


def test_truncated_gzip(hippo_dir, tmp_path):
    path = hippo_dir / "images" / f"{HIPPO_CASES[0]}.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    params, message = convert_expecting(tmp_path, hippo_dir, "cannot read the volume")
    assert str(path) in message
    assert not any(".tmp" in f for f in os.listdir(params.data.converted_dir))
    assert not os.path.exists(os.path.join(params.data.converted_dir, store.case_name(HIPPO_CASES[0])))


def test_not_an_image(tmp_path):
    synthetic_case(tmp_path / "d")
    (tmp_path / "d" / "images" / "case.nii.gz").write_bytes(b"this is not a NIfTI file at all")
    convert_expecting(tmp_path, tmp_path / "d", "cannot read the volume")
