"""`medseg predict`: segment unlabelled images with a trained model, or an ensemble of several.

Each input goes through the model's own preprocessing (reorientation, resampling, normalisation
with the statistics stored in `dataset.json`), is segmented by sliding window (one network, or the
mean probabilities of the ensemble's members), and the probabilities (per class, or per region with
data.regions) are mapped back (trilinearly) onto the input's original voxel grid before the arg-max or
the painting of the regions (`Targets.labels_of_probabilities`), so the saved label map has exactly the input's
shape and affine (and a NIfTI input's header), in the input's format: NRRD for NRRD, MHA for MHA and MHD, NIfTI
for NIfTI and DICOM series (data.io `output_suffix`). The post-processing decision of the experiment
(`Experiment.decision_path`, `<model_dir>/postprocessing.json`; inference/postprocess.py) is applied last, as in
nnU-Net: to that final label map on the original grid, with the original voxel spacing (its thresholds are in mm^3).
`--save-probabilities uint8|float16` also writes the mapped-back probabilities (K = the classes, or the
regions; before the arg-max or painting, so before post-processing), streamed to disk slab by slab
(probability_files.py). `--dicom-seg` also writes a DICOM SEG for each DICOM series input (dicom_seg.py).

Memory: the case on the model grid (its image), its labels on the original grid (uint8), and the slabs
in flight: the predictor's live sums (one window thick along the slab axis; float32, or float16 with
evaluation.accumulation) and, when
the grids differ, the model planes that the next original slices sample (original_grid.py); never a
volume of K values per voxel, on either grid. Progress per case and per window (progress.py).
"""
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np

from medseg_dl.config.params import Params
from medseg_dl.data import dicom
from medseg_dl.data.cases import Case, stored_recipe, subject_case
from medseg_dl.data.io import output_suffix, spacing_from_affine, write_volume
from medseg_dl.data.subjects import Subject, folder_channels, is_volume_path, match_one, strip_suffix
from medseg_dl.errors import DataError, import_extra
from medseg_dl.inference import postprocess
from medseg_dl.inference.original_grid import model_axis_of, original_slabs, same_grid
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.probability_files import ProbabilityWriter
from medseg_dl.inference.progress import Progress
from medseg_dl.inference.trained import TrainedEnsemble, load_ensemble, resolve_members
from medseg_dl.runtime import atomic
from medseg_dl.runtime.devices import configure_devices


def input_subjects(paths: List[str], data_params: Mapping) -> List[Subject]:
    """Subjects to predict: volume files (one channel each, or one 4D file with all channels), or
    folders: a subject folder (layout subject_folders), a DICOM series (dicom.is_series_folder: whatever its
    files are named) or a folder of volume files."""
    subjects = []
    for path in map(os.path.abspath, paths):
        if not os.path.exists(path):
            raise DataError(f"{path}: input not found; give image files or folders")
        if os.path.isdir(path) and data_params["layout"] == "subject_folders":
            channels = folder_channels(path, data_params["channels"])
            if channels is None:
                raise DataError(f"{path}: no file for each channel pattern {list(data_params['channels'])}")
            mask = match_one(path, data_params["mask_pattern"], "mask") if data_params["mask_pattern"] else None
            subjects.append(Subject(os.path.basename(path), channels, mask=mask))
        elif os.path.isdir(path) and not dicom.is_series_folder(path):
            subjects.extend(Subject(strip_suffix(n), [os.path.join(path, n)])
                            for n in sorted(os.listdir(path)) if is_volume_path(os.path.join(path, n)))
        else:
            subjects.append(Subject(strip_suffix(os.path.basename(path)), [path]))
    if not subjects:
        raise DataError(f"{paths}: no images found to predict")
    return subjects


def segment_case(predictor: Predictor, case: Case, decision: Optional[Dict] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 probabilities: Optional[ProbabilityWriter] = None) -> np.ndarray:
    """Labels (X, Y, Z) uint8 of one case on its original grid: the predictor's labels (arg-max, or regions
    painted), from its probabilities mapped back slab by slab when the model grid differs (original_grid.py,
    `Targets.labels_of_probabilities`), then the post-processing `decision` (None: none) applied to those labels with
    the original spacing. The one path from a case to its segmentation (predict and evaluation). progress:
    called with (windows done, windows in total); probabilities: a writer that receives the probabilities
    (X, Y, n, K) float32 on the original grid, slab by slab along z."""
    original_shape = tuple(case.original_shape)
    same = same_grid(case.image.shape[:3], case.affine, original_shape, case.original_affine)
    if same and probabilities is None:
        labels = predictor.labels(case.image, progress)
    else:
        axis = 2 if same else model_axis_of(case.affine, case.original_affine)
        slabs = predictor.slabs(case.image, "probabilities", axis, progress)
        if not same:
            slabs = original_slabs(slabs, case.image.shape[:3], case.affine, original_shape, case.original_affine)
        labels = np.empty(original_shape, np.uint8)
        for z_begin, block in slabs:
            labels[:, :, z_begin:z_begin + block.shape[2]] = predictor.targets.labels_of_probabilities(block)
            if probabilities is not None:
                probabilities.write(z_begin, block)
    if decision is not None:
        labels = postprocess.apply(labels, decision, spacing_from_affine(case.original_affine), predictor.targets)
    return labels


def reference_header(reference_path: str) -> Optional[nib.Nifti1Header]:
    """The NIfTI header of a NIfTI reference file (its fields are kept in the outputs), else None."""
    return nib.load(reference_path).header.copy() if reference_path.endswith((".nii", ".nii.gz")) else None


def save_like(path: str, labels: np.ndarray, reference_path: str, affine: np.ndarray) -> None:
    """Save `labels` (X, Y, Z) uint8 at `path` (its suffix: `output_suffix` of the reference) with the reference's
    affine and, for NIfTI references, its header (with the shape and data type of `labels`)."""
    header = reference_header(reference_path)
    if header is not None:
        header.set_data_shape(labels.shape)
        header.set_slope_inter(1, 0)
    write_volume(path, labels, affine, header)


def load_predictor(model_dirs: Union[str, Sequence[str]], checkpoint: Union[str, Sequence[str]],
                   folds: Union[None, str, Sequence[int]] = None, overrides: Sequence[str] = ()
                   ) -> Tuple[Predictor, TrainedEnsemble, Optional[Dict]]:
    """(the Predictor, the loaded ensemble, the post-processing decision or None) of `--model-dir D [D ...]
    [--folds ...] [--checkpoint ...]` (trained.py `resolve_members`, `load_ensemble`), with the devices of
    the first member's evaluation section; overrides apply to every member's params."""
    folders, decider = resolve_members([model_dirs] if isinstance(model_dirs, str) else model_dirs, folds)
    member_params = [Params.load(f.params_path, overrides) for f in folders]
    configure_devices(member_params[0].evaluation, "evaluation")
    ensemble = load_ensemble(folders, checkpoint, member_params)
    decision = postprocess.read_decision(decider.decision_path if decider else None)
    if decision is not None:
        steps = {k: decision[k] for k in postprocess.NOTHING}
        print(f"post-processing ({decider.decision_path}): {steps}", flush=True)
    return Predictor.from_params(ensemble.networks, ensemble.params), ensemble, decision


def run_prediction(model_dirs: Union[str, Sequence[str]], checkpoint: Union[str, Sequence[str]], inputs: List[str],
                   output_dir: str, overrides: Sequence[str] = (), folds: Union[None, str, Sequence[int]] = None,
                   save_probabilities: Optional[str] = None, dicom_seg: bool = False) -> List[str]:
    """`medseg predict`: segment every input with the network of one model folder, or the ensemble of several
    (`model_dirs`) or of the folds of one experiment root (`folds`: "all" or fold numbers; trained.py
    `resolve_members`), each at `checkpoint` (auto, best, latest, or one of these or a path per folder), and save
    `<output_dir>/<subject>.nii.gz|.nrrd|.mha` (uint8 labels, in the input's format: data.io `output_suffix`) on
    each input's own grid, post-processed by the decision of the (root) model folder when it has one; with
    `save_probabilities` ("uint8" or "float16") also the probabilities (X, Y, Z, K: classes or regions) of
    probability_files.py (NIfTI or .npy, whatever the input's format); with `dicom_seg`, for each DICOM series input
    also `<subject>_seg.dcm`, a DICOM SEG of its labels (dicom_seg.py). Returns the written paths. overrides:
    `section.key=value` applied to every folder's params (e.g. evaluation.*); the window and evaluation
    settings are the first member's. An `output_dir` that is a file is a `DataError`, raised before any work."""
    if os.path.isfile(output_dir):
        raise DataError(f"{output_dir}: the output is a file; give a folder for the label maps")
    seg_module = import_extra("medseg_dl.inference.dicom_seg", "dicom", "medseg predict --dicom-seg"
                              ) if dicom_seg else None  # highdicom: imported only here
    predictor, ensemble, decision = load_predictor(model_dirs, checkpoint, folds, overrides)
    recipe = stored_recipe(ensemble.params)
    subjects = input_subjects(inputs, ensemble.params.data)
    for subject in subjects if seg_module else ():
        if os.path.isdir(subject.channels[0]):
            seg_module.check_series(subject.channels[0])  # before any case is predicted
    with atomic.disk_full_reported(output_dir, "the label maps", "predict again (each file is written whole or "
                                   "not at all)"):
        return _predict_subjects(predictor, decision, recipe, subjects, output_dir, save_probabilities,
                                 seg_module.write_dicom_seg if seg_module else None)


def _predict_subjects(predictor, decision, recipe, subjects, output_dir, save_probabilities, seg_writer=None):
    """`run_prediction`'s loop: segment and save each subject, one at a time (and with `seg_writer`,
    dicom_seg.write_dicom_seg, a DICOM SEG of each DICOM series); returns the written paths."""
    os.makedirs(output_dir, exist_ok=True)
    written = []
    progress = Progress("predict", len(subjects))
    for subject in subjects:
        progress.start_case(subject.id)
        case = subject_case(subject, recipe)
        writer = None
        if save_probabilities:
            writer = ProbabilityWriter(os.path.join(output_dir, subject.id),
                                       tuple(case.original_shape) + (predictor.targets.outputs,), case.original_affine,
                                       save_probabilities, reference_header(subject.channels[0]))
        try:
            labels = segment_case(predictor, case, decision, progress.windows, writer)
        except BaseException:
            if writer is not None:
                writer.abandon()
            raise
        paths = [os.path.join(output_dir, subject.id + output_suffix(subject.channels[0]))]
        save_like(paths[0], labels, subject.channels[0], case.original_affine)
        if seg_writer is not None and os.path.isdir(subject.channels[0]):
            paths.append(os.path.join(output_dir, f"{subject.id}_seg.dcm"))
            seg_writer(paths[-1], labels, case.original_affine, subject.channels[0], predictor.targets.class_names)
        del case, labels  # before the next case is read
        written += paths + ([writer.close()] if writer is not None else [])
        progress.end_case()
        print(f"{subject.id}: {', '.join(paths)}", flush=True)
    return written
