"""A DICOM SEG of a label map predicted for a DICOM series (`medseg predict --dicom-seg`), written with highdicom.

One BINARY segment per foreground label value (segment n = label n, named by the class names of the model), one
frame per source slice and segment where the segment is present (highdicom omits empty frames), each frame
referencing its source instance. A source slice is matched to a plane of the label map by its position: its
ImagePositionPatient mapped through the inverse of the affine that `read_volume` gave the series. The segments'
category and type are the generic SNOMED CT "Tissue" (the model does not know what its classes are); the
algorithm is medseg_dl, of the family "Artificial Intelligence".

The SEG copies its patient and study from the source series. Those of their attributes that DICOM lets be empty
(type 2: patient name, ID, birth date and sex; study date, time, ID, accession number, referring physician) are
written empty where the series lacks them; a series without a UID the SEG must reference (study, series, frame of
reference, SOP class and instance) or without a modality is refused by `check_series`, which `medseg predict`
runs on every DICOM series before it predicts anything.
"""
import os
from typing import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

import medseg_dl
from medseg_dl.data import dicom
from medseg_dl.errors import DataError
from medseg_dl.runtime import atomic

MAY_BE_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                "AccessionNumber", "ReferringPhysicianName")  # type 2 in the SEG's patient and study modules
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID", "SOPInstanceUID",
            "Modality")  # type 1: the SEG references or copies each


def check_series(series_folder: str) -> None:
    """Raise a one-line `DataError` naming `series_folder`, the tags it lacks and the fix if a DICOM SEG of it
    cannot be written: a slice without one of the REQUIRED tags, or with it empty."""
    missing = sorted({keyword for source in _sources(series_folder) for keyword in REQUIRED
                      if not str(source.get(keyword, "") or "").strip()})
    if missing:
        raise DataError(f"{series_folder}: the DICOM series has no {', '.join(missing)}, which a DICOM SEG must "
                        f"reference; add the tags to its files, or predict without --dicom-seg")


def _sources(series_folder: str) -> list:
    """The headers (pydicom Datasets, without pixels) of the series' files, in file name order, each type-2 patient
    and study attribute it lacks set empty."""
    sources = [pydicom.dcmread(os.path.join(series_folder, h.name), stop_before_pixels=True)
               for h in dicom.read_headers(series_folder)]
    for source in sources:
        for keyword in MAY_BE_EMPTY:
            if keyword not in source:
                setattr(source, keyword, "")
    return sources


def write_dicom_seg(path: str, labels: np.ndarray, affine: np.ndarray, series_folder: str,
                    class_names: Sequence[str]) -> None:
    """Write `labels` (X, Y, Z) uint8, the label map on the grid of the DICOM series in `series_folder` (voxel ->
    RAS mm `affine` (4, 4) as `read_volume` gives it), as a DICOM SEG at `path`, atomically; `class_names` names
    label value 0 (background, no segment) and each foreground label value. The series must pass
    `check_series`."""
    sources = _sources(series_folder)
    frames = np.stack([labels[:, :, _plane_of(source, affine)].T for source in sources])  # (N, Rows, Columns)
    algorithm = hd.AlgorithmIdentificationSequence(name="medseg_dl", family=codes.cid7162.ArtificialIntelligence,
                                                   version=medseg_dl.__version__)
    segments = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for n, name in enumerate(class_names) if n > 0]
    segmentation = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="medseg_dl", manufacturer_model_name="medseg_dl predict",
        software_versions=medseg_dl.__version__, device_serial_number="none")
    with atomic.replacing(path) as temporary:
        segmentation.save_as(temporary)


def _plane_of(source: pydicom.Dataset, affine: np.ndarray) -> int:
    """The z index of the label map plane of one source slice: its ImagePositionPatient (LPS) in voxels."""
    lps = np.asarray(source.ImagePositionPatient, np.float64)
    voxel = np.linalg.inv(affine) @ np.array([-lps[0], -lps[1], lps[2], 1.0])
    return int(round(voxel[2]))
