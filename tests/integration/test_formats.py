"""Every input format end to end: a real case as NIfTI, NRRD, MHA, MHD and an oblique DICOM series (and an MHA image
with an NRRD label) converts to the case of its NIfTI twin, and `medseg predict` writes NRRD for NRRD, MHA for MHA
and MHD, NIfTI for NIfTI and DICOM, each overlaying its input and holding the labels of the NIfTI twin's
prediction, and with `--dicom-seg` a DICOM SEG whose frames hold the labels of their source slices."""
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml

from helpers import HIPPO, synthetic_dataset, tilted_affine, tiny_params, write_dicom_series, write_itk_twin
from medseg_dl.config.params import Params
from medseg_dl.data import store
from medseg_dl.data.convert import convert_dataset
from medseg_dl.data.io import read_volume
from medseg_dl.errors import DataError
from medseg_dl.experiment.experiment import open_model_dir
from medseg_dl.inference.predict import run_prediction
from medseg_dl.training.loop import run_training

CASE = "hippocampus_001"
SUFFIX = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "mhd": ".mhd", "dicom": ""}
WRITTEN = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "mhd": ".mha", "dicom": ".nii.gz"}


@pytest.fixture(scope="module")
def nifti_twins(tmp_path_factory):
    """{'image', 'label'}: paths of a real MR image (uint8) and its labels saved as NIfTI with a tilted affine
    (LPS axis codes, 0.7 x 0.9 x 2.5 mm)."""
    folder = tmp_path_factory.mktemp("twins")
    paths = {}
    for kind, sub in (("image", "images"), ("label", "labels")):
        data = np.asanyarray(nib.load(os.path.join(HIPPO, sub, f"{CASE}.nii.gz")).dataobj)
        paths[kind] = folder / f"{kind}.nii.gz"
        nib.save(nib.Nifti1Image(data, tilted_affine()), str(paths[kind]))
    return paths


def write_as(kind, nifti_path, path):
    """The volume of `nifti_path` written as `kind` (a key of SUFFIX) at `path`; returns `path` (a str). DICOM: a
    folder of a CT series whose tags place it at `tilted_affine()`."""
    path = str(path)
    if kind == "nifti":
        shutil.copy(nifti_path, path)
    elif kind == "dicom":
        write_dicom_series(path, np.asanyarray(nib.load(str(nifti_path)).dataobj), tilted_affine())
    else:
        write_itk_twin(nifti_path, path)
    return path


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    """The model folder of the tiny experiment trained 5 steps on synthetic NIfTI volumes, reorienting to RAS."""
    folder = tmp_path_factory.mktemp("trained")
    values = tiny_params(synthetic_dataset(folder / "data"), folder / "run", training={"steps": 5},
                         preprocessing={"reorient_ras": True})
    (folder / "params.yaml").write_text(yaml.safe_dump(values))
    params, model_dir, _ = open_model_dir(str(folder / "params.yaml"))
    convert_dataset(params)
    run_training(params, model_dir)
    return str(folder / "run")


def test_each_format_converts_to_the_case_of_its_nifti_twin(nifti_twins, tmp_path):
    """One subject folder per format (and 'mixed': an MHA image with an NRRD label), converted with reorientation
    to RAS: image, labels and geometry equal those of the NIfTI subject."""
    source = tmp_path / "source"
    for kind, suffix in SUFFIX.items():
        (source / kind).mkdir(parents=True)
        write_as(kind, nifti_twins["image"], source / kind / ("image_series" if kind == "dicom" else f"image{suffix}"))
        label_kind = "nifti" if kind == "dicom" else kind
        write_as(label_kind, nifti_twins["label"], source / kind / f"label{SUFFIX[label_kind]}")
    (source / "mixed").mkdir()
    write_as("mha", nifti_twins["image"], source / "mixed" / "image.mha")
    write_as("nrrd", nifti_twins["label"], source / "mixed" / "label.nrrd")
    params = Params.from_dict({
        "experiment": {"name": "formats", "model_dir": str(tmp_path / "run")},
        "data": {"source_dir": str(source), "layout": "subject_folders", "subject_glob": "*",
                 "channels": ["image*[!w]"], "label_pattern": "label*[!w]",  # [!w]: not the .raw of an .mhd
                 "num_classes": 3, "workers": 1},
        "preprocessing": {"reorient_ras": True}})
    index = convert_dataset(params)
    assert sorted(index["subjects"]) == sorted([*SUFFIX, "mixed"])
    converted = {k: store.read_arrays(os.path.join(params.data.converted_dir, e["case"]))
                 for k, e in index["subjects"].items()}
    nifti = converted.pop("nifti")
    assert len(np.unique(nifti["label"])) == 3
    for kind, case in converted.items():
        np.testing.assert_array_equal(case["image"], nifti["image"], err_msg=kind)
        np.testing.assert_array_equal(case["label"], nifti["label"], err_msg=kind)
        for key in ("affine", "original_affine"):
            np.testing.assert_allclose(case["meta"][key], nifti["meta"][key], rtol=0, atol=1e-5, err_msg=kind)
    assert nib.aff2axcodes(np.array(nifti["meta"]["affine"])) == ("R", "A", "S")


def test_predict_writes_the_input_format_over_the_input_with_the_labels_of_the_nifti_twin(
        nifti_twins, trained_root, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    paths = {k: write_as(k, nifti_twins["image"], inputs / f"case_{k}{suffix}") for k, suffix in SUFFIX.items()}
    written = run_prediction(trained_root, "latest", [str(inputs)], str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in written) == sorted(f"case_{k}{WRITTEN[k]}" for k in SUFFIX)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.path.basename(p) for p in written)
    labels = {kind: read_volume(tmp_path / "out" / f"case_{kind}{WRITTEN[kind]}") for kind in SUFFIX}
    twin = labels["nifti"].data
    assert all(not np.array_equal(twin, np.flip(twin, axis)) for axis in range(3))  # tells flipped outputs apart
    for kind, predicted in labels.items():
        source = read_volume(paths[kind])
        assert predicted.data.dtype == np.uint8 and predicted.data.shape == source.data.shape, kind
        atol = 1e-6 if kind == "dicom" else 1e-12  # NIfTI keeps the DICOM affine in float32
        np.testing.assert_allclose(predicted.affine, source.affine, rtol=0, atol=atol, err_msg=kind)
        np.testing.assert_array_equal(predicted.data, twin, err_msg=kind)


def test_predict_writes_a_dicom_seg_whose_frames_are_the_labels_of_their_source_slices(
        nifti_twins, trained_root, tmp_path):
    """`--dicom-seg`: each frame of the SEG (read back with pydicom) references a source slice and a segment, and its
    pixels are the predicted label map's voxels of that segment's label on that slice; every slice and label
    present in the label map has its frame."""
    series = tmp_path / "case_dicom"
    sources = write_as("dicom", nifti_twins["image"], series)
    plane_of = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: k
                for k, p in enumerate(sorted(str(f) for f in series.iterdir()))}
    written = run_prediction(trained_root, "latest", [sources], str(tmp_path / "out"), dicom_seg=True)
    assert [os.path.basename(p) for p in written] == ["case_dicom.nii.gz", "case_dicom_seg.dcm"]
    labels = read_volume(written[0]).data
    seg = pydicom.dcmread(written[1])
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(
        next(series.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2]
    pixels = seg.pixel_array.reshape(-1, labels.shape[1], labels.shape[0])
    framed = set()
    for frame, groups in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        source = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        segment = groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        k = plane_of[source]
        np.testing.assert_array_equal(frame, labels[:, :, k].T == segment, err_msg=f"slice {k}, segment {segment}")
        framed.add((k, segment))
    present = {(k, n) for k in range(labels.shape[2]) for n in (1, 2) if (labels[:, :, k] == n).any()}
    assert framed == present and {n for _, n in present} == {1, 2}


def test_predict_refuses_a_series_a_dicom_seg_cannot_reference_before_it_writes_anything(
        nifti_twins, trained_root, tmp_path):
    """`--dicom-seg` with a NIfTI input first and then a series without StudyInstanceUID: one line naming the series,
    and no output at all (the series is checked before any case is predicted)."""
    series = tmp_path / "case_dicom"
    write_as("dicom", nifti_twins["image"], series)
    for path in series.iterdir():
        dataset = pydicom.dcmread(path)
        del dataset.StudyInstanceUID
        dataset.save_as(path)
    with pytest.raises(DataError, match=f"^{series}: the DICOM series has no StudyInstanceUID, which a DICOM SEG"):
        run_prediction(trained_root, "latest", [str(nifti_twins["image"]), str(series)], str(tmp_path / "out"),
                       dicom_seg=True)
    assert not (tmp_path / "out").exists()
