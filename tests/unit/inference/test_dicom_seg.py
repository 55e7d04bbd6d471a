"""dicom_seg: a SEG of a series without its type-2 patient and study tags is written with them empty; a series
without a tag the SEG must reference is refused with one line naming the folder, the tags and the fix."""
import numpy as np
import pydicom
import pytest

from helpers import write_dicom_series
from medseg_dl.data.io import read_volume
from medseg_dl.errors import DataError
from medseg_dl.inference.dicom_seg import MAY_BE_EMPTY, check_series, write_dicom_seg


def series_without(folder, *keywords, empty=()):
    """A 8 x 9 x 5 CT series in `folder` with a bright box, each of `keywords` deleted from every file and each of
    `empty` set to ""; returns (folder as str, labels (X, Y, Z) uint8 of the box, affine of read_volume)."""
    data = np.zeros((8, 9, 5), np.int16)
    data[2:5, 3:6, 1:4] = 100
    for path in write_dicom_series(folder, data, np.diag([1.0, 1.0, 2.0, 1.0])):
        dataset = pydicom.dcmread(path)
        for keyword in keywords:
            delattr(dataset, keyword)
        for keyword in empty:
            setattr(dataset, keyword, "")
        dataset.save_as(path)
    volume = read_volume(str(folder))
    return str(folder), (volume.data > 50).astype(np.uint8), volume.affine


def test_a_series_without_patient_and_study_details_gets_a_seg_with_them_empty(tmp_path):
    folder, labels, affine = series_without(tmp_path / "series", *MAY_BE_EMPTY)
    check_series(folder)
    write_dicom_seg(str(tmp_path / "seg.dcm"), labels, affine, folder, ["background", "box"])
    seg, source = pydicom.dcmread(tmp_path / "seg.dcm"), pydicom.dcmread(tmp_path / "series" / "IM0001.dcm")
    assert all(seg.get(keyword) == "" for keyword in MAY_BE_EMPTY)
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.pixel_array.sum() == labels.sum()  # one frame per slice with the box, the box's voxels


@pytest.mark.parametrize("deleted, emptied", [(("StudyInstanceUID",), ()), (("FrameOfReferenceUID", "Modality"), ()),
                                              ((), ("StudyInstanceUID",))])
def test_a_series_without_a_tag_the_seg_references_is_refused_in_one_line(tmp_path, deleted, emptied):
    folder, _, _ = series_without(tmp_path / "series", *deleted, empty=emptied)
    with pytest.raises(DataError) as error:
        check_series(folder)
    missing = ", ".join(sorted(deleted + emptied))
    assert str(error.value) == (f"{folder}: the DICOM series has no {missing}, which a DICOM SEG must reference; add "
                                f"the tags to its files, or predict without --dicom-seg")
