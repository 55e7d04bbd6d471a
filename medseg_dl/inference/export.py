"""`medseg export`: a TensorFlow SavedModel that segments a whole preprocessed volume, without medseg_dl.

    served = tf.saved_model.load(DIR)
    out = served.serve(image, spacing_mm)  # image (X, Y, Z, C) float32 on the model grid, any size;
                                           # spacing_mm (3,) float32: its voxel size in mm
    out["probabilities"]                   # (X, Y, Z, K) float32: softmax per class, or sigmoid per region
    out["labels"]                          # (X, Y, Z) int32: the arg-max or the regions painted, post-processed

Inside the graph: the sliding-window grid of windows.py (padding of small volumes, evenly spread
starts in the same float64 arithmetic, the patch positions of `pipeline.sampling.patch_positions`),
Gaussian or constant blending with the per-axis coverages, and the window function of the `Predictor`
(`Predictor.window_function`: one network, or the mean probabilities of an ensemble, over the 8 flips
with mirroring TTA), traced from the same code, so the result equals `Predictor.probabilities` (medseg
predict on the model grid) to float32 rounding. The labels are the arg-max (or, with data.regions, the
regions painted: `Targets.labels_in_graph`) after the experiment's post-processing decision
(inference/postprocess.py), traced into the graph by postprocess_graph.py with the thresholds in mm^3 of
`spacing_mm`, so they equal `medseg predict`'s where the model grid is the original grid (predict
post-processes on the original grid); without a decision, the plain arg-max or painting.
The serving signature `serving_default` is the same function. metadata.json, beside the SavedModel (and
beside every ONNX export, onnx_export.py), holds what makes the input and reads the output: the preprocessing
(`CaseRecipe`: normalisation per channel with its stored CT statistics, target spacing in mm, reorientation to
RAS), the channel and class names, the targets (`Targets.to_dict`: classes, regions and their paint order,
ignore label), the window settings, the members' checkpoints, the inputs and outputs
(`network_data_format`, as a MONAI bundle names them) and the post-processing decision applied to the labels
(`{}` when the experiment has none).
"""
import contextlib
import dataclasses
import importlib.metadata
import json
import os
from typing import Dict, Iterator, Optional, Sequence, Union

import keras
import tensorflow as tf

from medseg_dl.data import preprocess
from medseg_dl.data.cases import stored_recipe
from medseg_dl.data.targets import Targets
from medseg_dl.errors import import_extra
from medseg_dl.inference import EXPORT_FORMATS, postprocess, postprocess_graph
from medseg_dl.inference.predict import load_predictor
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.trained import TrainedEnsemble
from medseg_dl.runtime import atomic

METADATA = "metadata.json"


def segment_volume(predictor: Predictor, image: tf.Tensor):
    """(probabilities (X, Y, Z, K) float32, labels (X, Y, Z) int32) of an image (X, Y, Z, C) float32 tensor
    (C static), in one pass over the windows, with the grid, weights, window function, targets (softmax and
    arg-max, or sigmoid and painted regions) and accumulation of `predictor`, all in TensorFlow ops
    (`Predictor.in_graph`)."""
    targets = predictor.targets
    return predictor.in_graph(image, lambda average: (targets.probabilities_in_graph(average),
                                                      tf.cast(targets.labels_in_graph(average), tf.int32)))


def export_metadata(ensemble: TrainedEnsemble, predictor: Predictor, postprocessing: Optional[Dict],
                    export_format: str) -> Dict:
    """The content of metadata.json, beside every export (in the spirit of a MONAI bundle's metadata.json):
    the format and versions; `network_data_format` (the inputs and outputs of `serve` or of the ONNX runner's
    `segment`: type, channels, dtype, meaning); the `CaseRecipe` of the ensemble's params and the normalisation
    per channel (with the stored CT statistics); channel and class names, targets, window settings, members;
    and the post-processing decision applied to the labels (`{}`: none)."""
    params = ensemble.params
    recipe = dataclasses.asdict(stored_recipe(params))
    channels = list(params.data.channels)
    methods = preprocess.channel_methods(recipe["preprocessing"]["normalization"], len(channels))
    normalization = [
        {"channel": name, "method": method, "ct_stats": recipe["ct_stats"][c] if method == "ct" else None}
        for c, (name, method) in enumerate(zip(channels, methods))]
    windows_settings = {"patch_size_vox": list(predictor.patch_size_vox), "overlap": predictor.overlap,
                        "blending": predictor.blending, "batch_size": predictor.batch_size,
                        "tta_mirroring": predictor.tta_mirroring}
    members = [{"model_dir": m.params.experiment.model_dir, "checkpoint": m.checkpoint,
                "step": m.step, "architecture": m.params.model.architecture} for m in ensemble.members]
    return {"format": export_format, "versions": _versions(export_format), "task": "segmentation",
            "network_data_format": _data_format(predictor.targets, channels),
            "recipe": recipe, "normalization_per_channel": normalization, "channels": channels,
            "class_names": list(predictor.targets.class_names), "targets": predictor.targets.to_dict(),
            "windows": windows_settings, "members": members, "postprocessing": postprocessing or {}}


def _data_format(targets: Targets, channels: Sequence[str]) -> Dict:
    """metadata.json's network_data_format: the inputs and outputs of an export, for a reader of the file."""
    probabilities, labels = (("a sigmoid per region of targets.regions", "the regions painted in order")
                             if targets.uses_regions else ("the softmax over the classes", "the arg-max"))
    outputs = [r.name for r in targets.regions] if targets.uses_regions else list(targets.class_names)
    return {"inputs": {"image": {"type": "image", "format": "magnitude", "dtype": "float32",
                                 "num_channels": len(channels), "spatial_shape": ["X", "Y", "Z"],
                                 "channel_def": {str(c): name for c, name in enumerate(channels)},
                                 "description": "(X, Y, Z, C) float32 of any size on the model grid, "
                                                "preprocessed by the recipe"},
                       "spacing_mm": {"dtype": "float32", "shape": [3],
                                      "description": "the voxel size in mm of the image (for the mm^3 thresholds)"}},
            "outputs": {"probabilities": {"type": "probabilities", "dtype": "float32", "num_channels": len(outputs),
                                          "channel_def": {str(k): name for k, name in enumerate(outputs)},
                                          "description": f"(X, Y, Z, K) float32, {probabilities}"},
                        "labels": {"type": "image", "format": "labels", "dtype": "int32",
                                   "label_def": {str(v): name for v, name in enumerate(targets.class_names)},
                                   "description": f"(X, Y, Z) int32, {labels} after the post-processing "
                                                  f"of `postprocessing`"}}}


def _versions(export_format: str) -> Dict[str, str]:
    """The versions of what wrote an export of `export_format` (and of what reads it)."""
    versions = {"medseg_dl": importlib.metadata.version("medseg_dl"), "tensorflow": tf.__version__,
                "keras": keras.__version__}
    if export_format == "onnx":
        versions.update({name: importlib.metadata.version(name) for name in ("tf2onnx", "onnx")})
    return versions


def export_savedmodel(predictor: Predictor, num_channels: int, output_dir: str, metadata: Dict,
                      postprocessing: Optional[Dict]) -> str:
    """Write the SavedModel of `predictor` (its networks: keras models) to `output_dir` atomically (a folder
    there is replaced whole), with `metadata` as metadata.json beside it; the endpoint `serve` takes an image
    (X, Y, Z, num_channels) float32 and its spacing_mm (3,) float32, and returns the labels post-processed by
    the `postprocessing` decision (None: none). Returns `output_dir`."""
    archive = keras.export.ExportArchive()
    for network in predictor.networks:
        archive.track(network)

    def serve(image, spacing_mm):
        probabilities, labels = segment_volume(predictor, image)
        return {"probabilities": probabilities,
                "labels": postprocess_graph.apply(labels, postprocessing or postprocess.NOTHING, spacing_mm,
                                                  predictor.targets)}

    archive.add_endpoint("serve", serve, input_signature=[tf.TensorSpec([None, None, None, num_channels], tf.float32),
                                                          tf.TensorSpec([3], tf.float32)])
    with exported_folder(output_dir, "the SavedModel", metadata) as folder:
        archive.write_out(folder, verbose=False)
    return output_dir


@contextlib.contextmanager
def exported_folder(output_dir: str, what: str, metadata: Dict) -> Iterator[str]:
    """Yield a temporary folder to write an export into; on leaving the block it holds metadata.json too and
    replaces `output_dir` whole (nothing is replaced on an error; a full disk is one line naming the folder)."""
    with atomic.disk_full_reported(output_dir, what, "export again (the folder is replaced whole or not at "
                                   "all)"), atomic.replacing(output_dir) as folder:
        yield folder
        with open(os.path.join(folder, METADATA), "w") as f:
            json.dump(metadata, f, indent=1)


def run_export(model_dirs: Union[str, Sequence[str]], checkpoint: Union[str, Sequence[str]], output_dir: str,
               folds: Union[None, str, Sequence[int]] = None, overrides: Sequence[str] = (),
               export_format: str = "savedmodel") -> str:
    """`medseg export`: the SavedModel (`export_format` "savedmodel") or the ONNX files and runner ("onnx",
    onnx_export.py) of one model folder, or of the ensemble of several or of the folds of one experiment root
    (as `medseg predict`: predict.py `load_predictor`), written to `output_dir` atomically with metadata.json
    (its recipe and post-processing decision); returns `output_dir`."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export_format = {export_format!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    write = (import_extra("medseg_dl.inference.onnx_export", "onnx", "medseg export --format onnx").export_onnx
             if export_format == "onnx" else export_savedmodel)  # tf2onnx: imported only to export ONNX
    predictor, ensemble, decision = load_predictor(model_dirs, checkpoint, folds, overrides)
    metadata = export_metadata(ensemble, predictor, decision, export_format)
    return write(predictor, len(ensemble.params.data.channels), output_dir, metadata, decision)
