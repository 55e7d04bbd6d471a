"""Check a DICOM series folder before it is read: one series, no missing slice, evenly spaced slices.

Only the headers are read (pydicom, `stop_before_pixels=True`); files that are not DICOM are ignored. A
slice's position is its ImagePositionPatient projected on the slice normal (the cross product of the two
ImageOrientationPatient rows of the first slice), in mm; the steps are the differences of the sorted
positions. Thresholds:

- missing slices: a step over `MISSING_STEP_RATIO` (1.5) x the median step. One missing slice makes a step
  of twice the median; 1.5 lies halfway between that and an even step, so neither jitter nor a single gap
  is mistaken for the other.
- uneven spacing: a step that differs from the median by more than `UNEVEN_STEP_FRACTION` (1%) of it: ten
  times the largest deviation of healthy series (0.1%, medio's calibration on 68 CT series; positions are
  decimal strings of at most 16 characters), and medio's own tolerance, so the two agree on spacing.

medio reads the folder next and refuses these folders too, but with a multi-line message written for its
Python callers (which `read_volume` would pass on as "cannot read the volume"); this check gives the one-line
`DataError` that names the folder, the series and the fix. Slices of one series at other orientations or
in-plane sizes (a localizer) are left to medio's check.
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import pydicom
import pydicom.misc
from pydicom.errors import InvalidDicomError

from medseg_dl.errors import DataError

MISSING_STEP_RATIO = 1.5
UNEVEN_STEP_FRACTION = 0.01
_TAGS = ["SeriesInstanceUID", "SeriesDescription", "ImagePositionPatient", "ImageOrientationPatient"]


@dataclass(frozen=True)
class SliceHeader:
    """The header fields of one DICOM file that place it: `position_mm` (3,) and `orientation` (6,) float64
    (ImagePositionPatient and ImageOrientationPatient, LPS), both None when the file has none."""

    name: str
    series_uid: str
    description: str
    position_mm: Optional[np.ndarray]
    orientation: Optional[np.ndarray]


def check_series(folder: str) -> None:
    """Raise a one-line `DataError` naming `folder` (and the series) unless its DICOM files are one series whose
    slices are evenly spaced along the slice normal without a gap."""
    headers = read_headers(folder)
    if not headers:
        raise DataError(f"{folder}: no DICOM files; give a folder holding the files of one DICOM series")
    series: Dict[str, List[SliceHeader]] = {}
    for header in headers:
        series.setdefault(header.series_uid, []).append(header)
    if len(series) > 1:
        names = ", ".join(series_name(members[0]) for _, members in sorted(series.items()))
        raise DataError(f"{folder}: {len(series)} DICOM series ({names}); put each series in its own folder")
    if len(headers) > 1:
        _check_steps(folder, headers)


def is_series_folder(folder: str, files_looked_at: int = 8) -> bool:
    """Whether `folder` holds DICOM files (whatever their names: scanners often write IM0001 or no suffix): one
    of its first `files_looked_at` regular files, in name order, starts with the DICOM preamble."""
    names = [n for n in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, n))]
    return any(pydicom.misc.is_dicom(os.path.join(folder, n)) for n in names[:files_looked_at])


def read_headers(folder: str) -> List[SliceHeader]:
    """The `SliceHeader` of every DICOM file in `folder` (not its subfolders), in file name order."""
    headers = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        except InvalidDicomError:
            continue
        located = "ImagePositionPatient" in dataset and "ImageOrientationPatient" in dataset
        headers.append(SliceHeader(
            name, str(dataset.get("SeriesInstanceUID", "")), str(dataset.get("SeriesDescription", "")),
            np.asarray(dataset.ImagePositionPatient, np.float64) if located else None,
            np.asarray(dataset.ImageOrientationPatient, np.float64) if located else None))
    return headers


def series_name(header: SliceHeader) -> str:
    """"1.2.3 'T1'": the SeriesInstanceUID and, when the header has one, the SeriesDescription."""
    return f"{header.series_uid} '{header.description}'" if header.description else header.series_uid


def slice_positions_mm(headers: List[SliceHeader]) -> np.ndarray:
    """(N,) float64: each slice's ImagePositionPatient projected on the unit normal of the first slice."""
    normal = np.cross(headers[0].orientation[:3], headers[0].orientation[3:])
    return np.array([h.position_mm @ normal for h in headers]) / np.linalg.norm(normal)


def _check_steps(folder: str, headers: List[SliceHeader]) -> None:
    """`DataError` for a file without position, a gap (missing slices) or uneven steps between the slices."""
    name = series_name(headers[0])
    unplaced = [h.name for h in headers if h.position_mm is None]
    if unplaced:
        raise DataError(f"{folder}: {unplaced[0]} of DICOM series {name} has no ImagePositionPatient or "
                        f"ImageOrientationPatient; remove the files that are not image slices")
    positions_mm = slice_positions_mm(headers)
    order = np.argsort(positions_mm)
    steps_mm = np.diff(positions_mm[order])
    median_mm = float(np.median(steps_mm))
    if median_mm > 0 and np.all(np.abs(steps_mm - median_mm) <= UNEVEN_STEP_FRACTION * median_mm):
        return
    gaps = np.flatnonzero(steps_mm > MISSING_STEP_RATIO * median_mm)
    if median_mm > 0 and gaps.size:
        missing = int(sum(round(steps_mm[i] / median_mm) - 1 for i in gaps))
        raise DataError(f"{folder}: DICOM series {name} misses about {missing} slice(s): a gap of "
                        f"{steps_mm[gaps[0]]:.4g} mm after {headers[order[gaps[0]]].name}, {median_mm:.4g} mm between "
                        f"the other slices; export the whole series again")
    raise DataError(f"{folder}: DICOM series {name} has uneven slice spacing (steps of {steps_mm.min():.4g} to "
                    f"{steps_mm.max():.4g} mm, median {median_mm:.4g} mm); export it again with evenly spaced slices")
