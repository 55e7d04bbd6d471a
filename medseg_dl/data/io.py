"""Read and write volumes with their geometry (NIfTI, NRRD, MHA/MHD, DICOM series).

Reading goes through `medio` (nibabel, itk and pydicom backends, chosen by file type) in
nibabel's coordinate convention, so the 4x4 `affine` maps voxel indices to RAS mm exactly as
`nibabel.load(path).affine` does, for every format. Writing uses nibabel (NIfTI).
"""
import os
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from medio import read_img

from medseg_dl.errors import DataError


@dataclass
class Volume:
    """A volume as stored: `data` (X, Y, Z) or (X, Y, Z, C) in file voxel order, its 4x4 RAS
    `affine` (float64, voxel -> mm), and `spacing_mm` (3,) float64 (the affine's column norms)."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def spacing_mm(self):
        return spacing_from_affine(self.affine)


def spacing_from_affine(affine):
    """Voxel size in mm along each array axis: the norms of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))


def read_volume(path):
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


def write_nifti(path, data, affine, header=None):
    """Write `data` with `affine` as NIfTI, atomically (a crash leaves no partial file)."""
    path = str(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp{os.getpid()}-{name}")
    image = nib.Nifti1Image(data, affine, header=header)
    if header is not None:
        image.set_data_dtype(data.dtype)
    nib.save(image, tmp)
    os.replace(tmp, path)
