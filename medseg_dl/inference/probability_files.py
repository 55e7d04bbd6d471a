"""`medseg predict --save-probabilities DTYPE`: probabilities (per class, or per region) streamed to disk, slab
by slab.

    writer = ProbabilityWriter(os.path.join(output_dir, subject_id), (X, Y, Z, K), affine, "uint8")
    writer.write(z_begin, probabilities)    # (X, Y, n, K) float32 of the slices [z_begin, z_begin + n)
    path = writer.close()                   # <stem>_probabilities.nii.gz (uint8) or .npy (float16)

Two compact types, the user's choice:
- uint8: a NIfTI volume (X, Y, Z, K) of round(255 p) with scl_slope 1/255, so a viewer (and nibabel's
  get_fdata) shows p to within 1/510; written uncompressed beside the target, then gzipped in one pass.
- float16: a NumPy .npy file (X, Y, Z, K) float16 in Fortran order (NIfTI has no 16-bit float), the layout
  of the NIfTI data, readable whole or memory-mapped by np.load(path, mmap_mode="r").
Either way the values of one class run x fastest, then y, then z, so the slices [z_begin, z_begin + n) of
a class are one contiguous run of the file: each slab is K writes at their offsets, in any order of z, and
nothing volume-sized for all classes is held. The file is written under a temporary name beside the
target and renamed when complete: it appears whole or not at all.
"""
import gzip
import os
import shutil
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

from medseg_dl.inference import PROBABILITY_DTYPES
from medseg_dl.runtime import atomic

SUFFIXES = {"uint8": "_probabilities.nii.gz", "float16": "_probabilities.npy"}
COPY_BYTES = 1 << 24


class ProbabilityWriter:
    """Writes the probabilities (X, Y, Z, K) of one case to `<stem>` + SUFFIXES[dtype], slab by slab along z.

    stem: the output path without suffix; shape: (X, Y, Z, K); affine: (4, 4) float64 voxel -> world mm;
    dtype: "uint8" or "float16"; header: a NIfTI header whose fields (units, codes) are kept (uint8 only).
    """

    def __init__(self, stem: str, shape: Sequence[int], affine: np.ndarray, dtype: str,
                 header: Optional[nib.Nifti1Header] = None):
        if dtype not in PROBABILITY_DTYPES:
            raise ValueError(f"dtype = {dtype!r}; expected one of {', '.join(PROBABILITY_DTYPES)}")
        self.path, self.shape, self.dtype = stem + SUFFIXES[dtype], tuple(int(s) for s in shape), dtype
        self._target = atomic.temporary_name(self.path)
        self._raw_path = self._target + ".raw" if dtype == "uint8" else self._target
        self._file = open(self._raw_path, "wb")
        self._data_offset = self._write_header(affine, header)

    def _write_header(self, affine, header) -> int:
        """Write the file's header; returns the byte offset of the data."""
        if self.dtype == "float16":
            np.lib.format.write_array_header_1_0(self._file, {"descr": np.dtype(np.float16).str, "fortran_order": True,
                                                              "shape": self.shape})
            return self._file.tell()
        header = nib.Nifti1Header() if header is None else header.copy()
        header.set_data_shape(self.shape)
        header.set_data_dtype(np.uint8)
        header.set_qform(affine, code=int(header["qform_code"]) or 1)
        header.set_sform(affine, code=int(header["sform_code"]) or 1)
        header.set_slope_inter(1.0 / 255.0, 0.0)
        header["vox_offset"] = 352
        header.write_to(self._file)
        self._file.write(b"\x00" * (352 - self._file.tell()))  # no extensions
        return 352

    def write(self, z_begin: int, probabilities: np.ndarray) -> None:
        """Write the probabilities (X, Y, n, K) float32 of the slices [z_begin, z_begin + n)."""
        x, y, z, k = self.shape
        values = (np.rint(probabilities * 255.0).astype(np.uint8) if self.dtype == "uint8"
                  else probabilities.astype(np.float16))
        for c in range(k):
            self._file.seek(self._data_offset + ((c * z + z_begin) * x * y) * values.itemsize)
            self._file.write(values[..., c].tobytes(order="F"))

    def close(self) -> str:
        """Finish the file (gzip the NIfTI) and move it into place; returns its path."""
        self._file.close()
        if self.dtype == "uint8":
            with open(self._raw_path, "rb") as raw, gzip.open(self._target, "wb", compresslevel=1) as packed:
                shutil.copyfileobj(raw, packed, COPY_BYTES)
            os.remove(self._raw_path)
        os.replace(self._target, self.path)
        return self.path

    def abandon(self) -> None:
        """Remove what was written (after an error): nothing half written stays."""
        self._file.close()
        for path in (self._raw_path, self._target):
            if os.path.exists(path):
                os.remove(path)
