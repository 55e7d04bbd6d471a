"""Read and write volumes with their geometry (NIfTI, NRRD, MHA/MHD, DICOM series).

Reading goes through `medio` (nibabel, itk and pydicom backends, chosen by file type) in
nibabel's coordinate convention, so the 4x4 `affine` maps voxel indices to RAS mm exactly as
`nibabel.load(path).affine` does, for every format. Writing uses nibabel (NIfTI).
"""
import os
import zlib
from dataclasses import dataclass
from typing import Optional, Union

import nibabel as nib
import numpy as np
from medio import read_img

from medseg_dl import atomic
from medseg_dl.errors import DataError


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
    """Read a volume file or DICOM series folder; raises `DataError` naming the path on failure."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found; check the dataset folder and data.layout")
    try:
        data, metadata = read_img(path, coord_sys="nib")
    except (EOFError, zlib.error, OSError, ValueError, RuntimeError, nib.filebasedimages.ImageFileError) as err:
        raise DataError(f"{path}: cannot read the volume ({type(err).__name__}: {err}); the file is "
                        f"truncated or not a medical image, re-export or replace it") from None
    data = np.asarray(data)
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI stores vector data as (X, Y, Z, 1, C)
        data = data[:, :, :, 0]
    return Volume(data, np.asarray(metadata.affine, np.float64))


def write_nifti(path: str, data: np.ndarray, affine: np.ndarray,
                header: Optional[nib.Nifti1Header] = None) -> None:
    """Write `data` with `affine` (4, 4) as NIfTI (.nii or .nii.gz by the suffix of `path`), atomically;
    with a `header` (a nibabel NIfTI header) its fields are kept and the data type is `data`'s."""
    image = nib.Nifti1Image(data, affine, header=header)
    if header is not None:
        image.set_data_dtype(data.dtype)
    with atomic.replacing(path) as temporary:
        nib.save(image, temporary)
