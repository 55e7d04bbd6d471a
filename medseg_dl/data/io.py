"""Read and write volumes with their geometry: NIfTI, NRRD, MHA/MHD and DICOM series folders.

Reading goes through `medio` (nibabel for NIfTI, itk for the others) in nibabel's coordinate convention,
so the 4x4 `affine` maps voxel indices to RAS mm exactly as `nibabel.load(path).affine` does, for every
format (tests/unit/data/test_io.py: NRRD, MHA and MHD made by SimpleITK from a NIfTI file read as that file,
an oblique DICOM series made by pydicom with the affine of its tags). A DICOM folder is checked first
(dicom.py: one series, no missing slice, even spacing). Writing (`write_volume`) uses nibabel for NIfTI
and medio (itk) for NRRD and MHA; `output_suffix` is the format of a result written over an input.
"""
import os
import zlib
from dataclasses import dataclass
from typing import Optional, Union

import nibabel as nib
import numpy as np
from medio import Affine, MetaData, read_img, save_img

from medseg_dl.data import dicom
from medseg_dl.errors import DataError
from medseg_dl.runtime import atomic


@dataclass
class Volume:
    """A volume as stored: `data` (X, Y, Z) or (X, Y, Z, C) in file voxel order, its 4x4 RAS
    `affine` (float64, voxel -> mm), and `spacing_mm` (3,) float64 (the affine's column norms)."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def spacing_mm(self) -> np.ndarray:
        return spacing_from_affine(self.affine)


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis: the norms of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))


def read_volume(path: Union[str, os.PathLike]) -> Volume:
    """Read a volume file or DICOM series folder (checked first: dicom.check_series) as a `Volume`: data
    (X, Y, Z[, C]) in the file's type and voxel order (a DICOM series rescaled by RescaleSlope/Intercept, X
    its columns, Y its rows, Z its slices along the normal). Raises a one-line `DataError` naming the path."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found; check the dataset folder and data.layout")
    if os.path.isdir(path):
        dicom.check_series(path)
    try:
        data, metadata = read_img(path, coord_sys="nib")
    except (EOFError, zlib.error, OSError, ValueError, RuntimeError, nib.filebasedimages.ImageFileError) as err:
        raise DataError(f"{path}: cannot read the volume ({type(err).__name__}: {err}); the file is "
                        f"truncated or not a medical image, re-export or replace it") from None
    data = np.asarray(data)
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI stores vector data as (X, Y, Z, 1, C)
        data = data[:, :, :, 0]
    return Volume(data, np.asarray(metadata.affine, np.float64))


def output_suffix(input_path: str) -> str:
    """The suffix of a volume written over the input `input_path`: .nrrd for NRRD (.nrrd, .nhdr), .mha for
    MetaImage (.mha, .mhd: a .mhd needs its .raw beside it, which cannot be replaced atomically with it),
    .nii.gz for NIfTI and DICOM series folders."""
    for suffixes, output in (((".nrrd", ".nhdr"), ".nrrd"), ((".mha", ".mhd"), ".mha")):
        if input_path.endswith(suffixes):
            return output
    return ".nii.gz"


def write_volume(path: Union[str, os.PathLike], data: np.ndarray, affine: np.ndarray,
                 header: Optional[nib.Nifti1Header] = None) -> None:
    """Write `data` (X, Y, Z) with `affine` (4, 4) float64 voxel -> RAS mm, atomically, in the format of the
    suffix of `path`: NIfTI (.nii, .nii.gz, also (X, Y, Z, C)) with nibabel, where a `header` (a nibabel
    NIfTI header) keeps its fields and the data type is `data`'s; NRRD (.nrrd, gzip) and MetaImage (.mha,
    zlib) with medio (itk), whose `read_volume` gives `data` and `affine` back (within 1e-12 mm)."""
    path = os.fspath(path)
    with atomic.replacing(path) as temporary:
        if path.endswith((".nii", ".nii.gz")):
            image = nib.Nifti1Image(data, affine, header=header)
            if header is not None:
                image.set_data_dtype(data.dtype)
            nib.save(image, temporary)
        else:
            save_img(temporary, data, MetaData(Affine(np.array(affine, np.float64)), coord_sys="nib"),
                     compression=True)
