"""`medseg export`: a TensorFlow SavedModel that segments a whole preprocessed volume, without medseg_dl.

    served = tf.saved_model.load(DIR)
    out = served.serve(image)              # image (X, Y, Z, C) float32 on the model grid, any size
    out["probabilities"]                   # (X, Y, Z, K) float32
    out["labels"]                          # (X, Y, Z) int32: the arg-max (before post-processing)

Inside the graph: the sliding-window grid of windows.py (padding of small volumes, evenly spread
starts in the same float64 arithmetic, the patch positions of `pipeline.sampling.patch_positions`),
Gaussian or constant blending with the per-axis coverages, and the window function of the `Predictor`
(`Predictor.window_function`: one network, or the mean softmax of an ensemble, over the 8 flips with
mirroring TTA), traced from the same code, so the result equals `Predictor.probabilities` (medseg
predict on the model grid) to float32 rounding. The serving signature `serving_default` is the same
function. `assets.extra/recipe.json` holds what makes the input and reads the output: the preprocessing
(`CaseRecipe`: normalisation per channel with its stored CT statistics, target spacing in mm,
reorientation to RAS), the channel and class names, the window settings and the members' checkpoints;
`assets.extra/postprocessing.json` the post-processing decision to apply to the labels
(inference/postprocess.py; `{}` when the experiment has none).
"""
import dataclasses
import json
import os
from typing import Dict, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from medseg_dl import atomic
from medseg_dl.data import preprocess
from medseg_dl.data.cases import stored_recipe
from medseg_dl.inference import windows
from medseg_dl.inference.predict import load_predictor
from medseg_dl.inference.predictor import Predictor
from medseg_dl.inference.trained import TrainedEnsemble
from medseg_dl.pipeline.sampling import patch_positions

ASSETS = "assets.extra"


def window_starts(size: tf.Tensor, window: int, overlap: float) -> tf.Tensor:
    """In-graph `windows.window_starts`: int32 starts (n,) of windows of `window` voxels covering an axis of
    `size` (int32 scalar tensor, >= window), with numpy's float64 linspace arithmetic and round half to even."""
    span = tf.cast(size - window, tf.float64)
    count = tf.cast(tf.math.ceil(span / (window * (1.0 - overlap)) - 1e-9), tf.int32) + 1
    values = tf.range(count, dtype=tf.float64) * (span / tf.cast(tf.maximum(count - 1, 1), tf.float64))
    values = tf.concat([values[:-1], span[None]], 0)  # np.linspace ends exactly at its stop
    return tf.unique(tf.cast(tf.round(values), tf.int32))[0]


def axis_coverage(starts: tf.Tensor, length: tf.Tensor, profile: np.ndarray) -> tf.Tensor:
    """In-graph `WindowGrid.coverage` of one axis: (length,) float32 sum of the 1D `profile` (P,) float32 of
    the windows starting at `starts` (n,) int32, summed in float64 as windows.window_grid does."""
    index = tf.reshape(starts[:, None] + np.arange(len(profile), dtype=np.int32)[None], [-1, 1])
    updates = tf.tile(tf.constant(profile.astype(np.float64)), tf.shape(starts))
    return tf.cast(tf.tensor_scatter_nd_add(tf.zeros([length], tf.float64), index, updates), tf.float32)


def segment_volume(predictor: Predictor, image: tf.Tensor):
    """(probabilities (X, Y, Z, K) float32, labels (X, Y, Z) int32) of an image (X, Y, Z, C) float32 tensor
    (C static), with the window grid, weights and window function of `predictor`, all in TensorFlow ops."""
    patch, num_classes, batch = predictor.patch_size_vox, predictor.num_classes, predictor.batch_size
    num_channels = int(image.shape[-1])
    shape = tf.shape(image)[:3]
    missing = tf.maximum(tf.constant(patch) - shape, 0)
    before = missing // 2
    padded = tf.pad(image, tf.stack([tf.concat([before, [0]], 0), tf.concat([missing - before, [0]], 0)], axis=1))
    padded_shape = tf.shape(padded)[:3]
    axes = [window_starts(padded_shape[a], patch[a], predictor.overlap) for a in range(3)]
    starts = tf.reshape(tf.stack(tf.meshgrid(*axes, indexing="ij"), -1), [-1, 3])
    positions = patch_positions(starts - before, patch, shape)
    weights = tf.constant(windows.importance_map(patch, predictor.blending)[..., None])
    offsets = tf.constant(np.stack(np.meshgrid(*[np.arange(p) for p in patch], indexing="ij"), -1).reshape(-1, 3),
                          tf.int32)
    window_function = predictor.window_function(num_channels)

    def add_batch(begin, sums):
        batch_starts = starts[begin:begin + batch]
        cut = tf.map_fn(lambda s: tf.slice(padded, tf.concat([s, [0]], 0), list(patch) + [num_channels]),
                        batch_starts, fn_output_signature=tf.TensorSpec(list(patch) + [num_channels], tf.float32))
        logits = window_function(cut, positions[begin:begin + batch])
        index = tf.reshape(batch_starts[:, None, :] + offsets[None], [-1, 3])
        return begin + batch, tf.tensor_scatter_nd_add(sums, index, tf.reshape(logits * weights, [-1, num_classes]))

    sums = tf.zeros(tf.concat([padded_shape, [num_classes]], 0))
    _, sums = tf.while_loop(lambda begin, _: begin < tf.shape(starts)[0], add_batch, [tf.constant(0), sums])
    coverage = [tf.slice(axis_coverage(axes[a], padded_shape[a], windows.importance_profile(patch[a],
                                                                                           predictor.blending)),
                         before[a:a + 1], shape[a:a + 1]) for a in range(3)]
    weight_sum = coverage[0][:, None, None] * coverage[1][None, :, None] * coverage[2][None, None, :]
    average = tf.slice(sums, tf.concat([before, [0]], 0), tf.concat([shape, [-1]], 0)) / weight_sum[..., None]
    return tf.nn.softmax(average, axis=-1), tf.argmax(average, axis=-1, output_type=tf.int32)


def export_recipe(ensemble: TrainedEnsemble, predictor: Predictor) -> Dict:
    """The content of assets.extra/recipe.json: the `CaseRecipe` of the ensemble's params (normalisation
    one per channel, with the stored CT statistics), channel and class names, window settings, members."""
    params = ensemble.params
    recipe = dataclasses.asdict(stored_recipe(params))
    channels = list(params.data.channels)
    methods = preprocess.channel_methods(recipe["preprocessing"]["normalization"], len(channels))
    normalization = [
        {"channel": name, "method": method, "ct_stats": recipe["ct_stats"][c] if method == "ct" else None}
        for c, (name, method) in enumerate(zip(channels, methods))]
    class_names = params.data.class_names or [f"class_{k}" for k in range(params.data.num_classes)]
    windows_settings = {"patch_size_vox": list(predictor.patch_size_vox), "overlap": predictor.overlap,
                        "blending": predictor.blending, "batch_size": predictor.batch_size,
                        "tta_mirroring": predictor.tta_mirroring}
    members = [{"model_dir": m.params.experiment.model_dir, "checkpoint": m.checkpoint,
                "step": m.step, "architecture": m.params.model.architecture} for m in ensemble.members]
    return {"recipe": recipe, "normalization_per_channel": normalization, "channels": channels,
            "class_names": list(class_names), "windows": windows_settings,
            "members": members, "input": "image (X, Y, Z, C) float32 on the model grid, preprocessed by the recipe",
            "outputs": {"probabilities": "(X, Y, Z, K) float32", "labels": "(X, Y, Z) int32, before post-processing"}}


def export_savedmodel(predictor: Predictor, num_channels: int, output_dir: str, recipe: Dict,
                      postprocessing: Optional[Dict]) -> str:
    """Write the SavedModel of `predictor` (its networks: keras models) to `output_dir` atomically (a folder
    there is replaced whole), with `recipe` and the `postprocessing` decision (None: `{}`) as JSON assets in
    assets.extra/; the endpoint `serve` takes (X, Y, Z, num_channels) float32. Returns `output_dir`."""
    archive = keras.export.ExportArchive()
    for network in predictor.networks:
        archive.track(network)

    def serve(image):
        probabilities, labels = segment_volume(predictor, image)
        return {"probabilities": probabilities, "labels": labels}

    archive.add_endpoint("serve", serve, input_signature=[tf.TensorSpec([None, None, None, num_channels], tf.float32)])
    with atomic.replacing(output_dir) as folder:
        archive.write_out(folder, verbose=False)
        os.makedirs(os.path.join(folder, ASSETS), exist_ok=True)
        for name, content in (("recipe.json", recipe), ("postprocessing.json", postprocessing or {})):
            with open(os.path.join(folder, ASSETS, name), "w") as f:
                json.dump(content, f, indent=1)
    return output_dir


def run_export(model_dirs: Union[str, Sequence[str]], checkpoint: Union[str, Sequence[str]], output_dir: str,
               folds: Union[None, str, Sequence[int]] = None, overrides: Sequence[str] = ()) -> str:
    """`medseg export`: the SavedModel of one model folder, or of the ensemble of several or of the folds of
    one experiment root (as `medseg predict`: predict.py `load_predictor`), written to `output_dir`
    atomically with its recipe and post-processing decision; returns `output_dir`."""
    predictor, ensemble, decision = load_predictor(model_dirs, checkpoint, folds, overrides)
    return export_savedmodel(predictor, len(ensemble.params.data.channels), output_dir,
                             export_recipe(ensemble, predictor), decision)
