"""Segment a preprocessed volume with an ONNX export of `medseg export --format onnx`, with numpy and
onnxruntime only (no TensorFlow, no medseg_dl: the export folder holds a copy of this file as segment.py).

    from segment import OnnxSegmenter                   # or: python segment.py EXPORT image.npy out.npz [spacing]
    segmenter = OnnxSegmenter(EXPORT)
    probabilities, labels = segmenter.segment(image, spacing_mm)
    # image (X, Y, Z, C) float32 on the model grid, preprocessed as metadata.json says; spacing_mm (3,)
    # probabilities (X, Y, Z, K) float32: softmax per class, or sigmoid per region
    # labels (X, Y, Z) int32: the arg-max or the regions painted, post-processed by the experiment's decision

The export folder (onnx_export.py): `network.onnx` (windows (N, px, py, pz, C) float32, positions (N, 3) float32 ->
the window logits (N, px, py, pz, K) float32 of one network without mirroring TTA, else the sum of the members'
probabilities on the windows as given), `combine.onnx` where the export averages (the sums over the flips ->
window logits, the log mean probability), `finish.onnx` (average logits (X, Y, Z, K) float32, spacing_mm (3,)
float32 -> probabilities, labels: `Targets.probabilities_in_graph`, `Targets.labels_in_graph` and the
post-processing of postprocess_graph.py) and metadata.json (the window settings used here, the preprocessing, the
inputs and outputs). All are converted by tf2onnx from the Predictor's own code.

Here: the sliding window of windows.py in numpy. A volume smaller than the window along an axis is zero-padded
symmetrically; window starts along an axis of (padded) size S for a window P are round(linspace(0, S - P, n))
with n = ceil((S - P) / (P (1 - overlap))) + 1; the position of a window is its middle (start - padding before +
(P - 1) / 2) over max(shape - 1, 1) per axis, clipped to [0, 1]; the weights are the outer product of one
profile per axis (Gaussian with sigma P / 8, or constant; max 1, at least 1e-3); the weighted logits are summed
in float32 and divided by the weight sum. tests/unit/inference/test_onnx_runner.py checks each rule against
windows.py. With mirroring TTA each batch of windows runs through network.onnx once per flip (the Predictor's
8 flips in its order: the windows flipped, their positions mirrored to 1 - p on the flipped axes, the output
flipped back and summed in float32). Memory: the padded volume, its sums (X, Y, Z, K) float32, one batch of
windows, and the outputs.
"""
import itertools
import json
import math
import os
import sys
from typing import Sequence, Tuple

import numpy as np
import onnxruntime

MIN_WEIGHT = 1e-3
MIRROR_AXES = [axes for n in range(4) for axes in itertools.combinations((1, 2, 3), n)]  # Predictor's order


def window_starts(size_vox: int, window_vox: int, overlap: float) -> np.ndarray:
    """Start indices (n,) int64 of windows of `window_vox` covering an axis of `size_vox` >= window."""
    step_vox = window_vox * (1.0 - overlap)
    num = int(math.ceil((size_vox - window_vox) / step_vox - 1e-9)) + 1
    return np.unique(np.round(np.linspace(0, size_vox - window_vox, num)).astype(np.int64))


def profile(length_vox: int, blending: str) -> np.ndarray:
    """1D window weights (length,) float32: Gaussian (sigma = length / 8) or constant, max 1, >= MIN_WEIGHT."""
    if blending == "constant":
        return np.ones(length_vox, np.float32)
    offset_vox = np.arange(length_vox) - (length_vox - 1) / 2.0
    weights = np.exp(-0.5 * (offset_vox / (length_vox / 8.0)) ** 2)
    return np.maximum(weights / weights.max(), MIN_WEIGHT).astype(np.float32)


def grid(shape_vox: Sequence[int], patch_size_vox: Sequence[int], overlap: float, blending: str):
    """(padding (3, 2) int64, starts (W, 3) int64 in the padded volume, positions (W, 3) float32, coverages: per
    axis the (padded length,) float32 sum of the profiles of the windows) of a volume of `shape_vox` (3,)."""
    shape = np.asarray(shape_vox, np.int64)
    missing = np.maximum(np.asarray(patch_size_vox) - shape, 0)
    padding = np.stack([missing // 2, missing - missing // 2], axis=1)
    axis_starts, coverages = [], []
    for size, patch in zip(shape + missing, patch_size_vox):
        starts = window_starts(int(size), int(patch), overlap)
        coverage = np.zeros(size, np.float64)
        for start in starts:
            coverage[start:start + patch] += profile(int(patch), blending)
        axis_starts.append(starts)
        coverages.append(coverage.astype(np.float32))
    starts = np.stack(np.meshgrid(*axis_starts, indexing="ij"), -1).reshape(-1, 3)
    middles = (starts - padding[:, 0]).astype(np.float32) + np.float32([(p - 1) / 2 for p in patch_size_vox])
    positions = np.clip(middles / np.maximum(shape.astype(np.float32) - 1.0, 1.0), 0.0, 1.0)
    return padding, starts, positions.astype(np.float32), coverages


class OnnxSegmenter:
    """The exported segmentation of one folder (`network.onnx`, `combine.onnx` if any, `finish.onnx`,
    metadata.json); onnxruntime's CPU provider unless `providers` names others (e.g.
    ["CUDAExecutionProvider", "CPUExecutionProvider"])."""

    def __init__(self, folder: str, providers: Sequence[str] = ("CPUExecutionProvider",)):
        with open(os.path.join(folder, "metadata.json")) as f:
            self.metadata = json.load(f)
        windows = self.metadata["windows"]
        self.patch_size_vox = tuple(windows["patch_size_vox"])
        self.overlap, self.blending, self.batch_size = windows["overlap"], windows["blending"], windows["batch_size"]
        self.flips = MIRROR_AXES if windows["tta_mirroring"] else [()]
        session = lambda name: onnxruntime.InferenceSession(os.path.join(folder, name), providers=list(providers))
        self.network, self.finish = session("network.onnx"), session("finish.onnx")
        self.combine = session("combine.onnx") if os.path.isfile(os.path.join(folder, "combine.onnx")) else None

    def window_logits(self, windows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Window logits (N, px, py, pz, K) float32 of windows (N, px, py, pz, C) float32 at positions (N, 3)
        float32: network.onnx's own, or combine.onnx's of the sum over the flips of network.onnx's output on the
        windows flipped (positions mirrored: 1 - p on the flipped axes), flipped back."""
        if self.combine is None:
            return self.network.run(None, {"windows": windows, "positions": positions})[0]
        total = 0.0
        for axes in self.flips:
            mirrored, columns = positions.copy(), [axis - 1 for axis in axes]
            mirrored[:, columns] = 1.0 - mirrored[:, columns]
            flipped = np.ascontiguousarray(np.flip(windows, axes))
            total = total + np.flip(self.network.run(None, {"windows": flipped, "positions": mirrored})[0], axes)
        return self.combine.run(None, {"total": np.ascontiguousarray(total, np.float32)})[0]

    def average_logits(self, image: np.ndarray) -> np.ndarray:
        """The weighted average (X, Y, Z, K) float32 of the window logits over `image` (X, Y, Z, C) float32."""
        image = np.ascontiguousarray(image, np.float32)
        padding, starts, positions, coverages = grid(image.shape[:3], self.patch_size_vox, self.overlap,
                                                     self.blending)
        padded = np.pad(image, np.concatenate([padding, [[0, 0]]])) if padding.any() else image
        weights = (profile(self.patch_size_vox[0], self.blending)[:, None, None]
                   * profile(self.patch_size_vox[1], self.blending)[None, :, None]
                   * profile(self.patch_size_vox[2], self.blending)[None, None, :])[..., None]
        sums = None
        px, py, pz = self.patch_size_vox
        for begin in range(0, len(starts), self.batch_size):
            batch = starts[begin:begin + self.batch_size]
            windows = np.stack([padded[x:x + px, y:y + py, z:z + pz] for x, y, z in batch])
            logits = self.window_logits(windows, positions[begin:begin + len(batch)])
            if sums is None:
                sums = np.zeros(padded.shape[:3] + logits.shape[-1:], np.float32)
            for (x, y, z), window_logits in zip(batch, logits):
                sums[x:x + px, y:y + py, z:z + pz] += window_logits * weights
        region = tuple(slice(b, b + s) for b, s in zip(padding[:, 0], image.shape[:3]))
        cx, cy, cz = (c[r] for c, r in zip(coverages, region))
        return sums[region] / (cx[:, None, None] * cy[None, :, None] * cz[None, None, :])[..., None]

    def segment(self, image: np.ndarray, spacing_mm: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
        """(probabilities (X, Y, Z, K) float32, labels (X, Y, Z) int32) of `image` (X, Y, Z, C) float32 with its
        voxel size `spacing_mm` (3,) (the post-processing's thresholds are in mm^3)."""
        probabilities, labels = self.finish.run(None, {"average": self.average_logits(image),
                                                       "spacing_mm": np.asarray(spacing_mm, np.float32)})
        return probabilities, labels


def main(argv: Sequence[str]) -> None:
    """python segment.py EXPORT image.npy out.npz [sx sy sz]: probabilities and labels of a .npy image."""
    if len(argv) not in (3, 6):
        raise SystemExit("usage: python segment.py EXPORT_FOLDER image.npy out.npz [spacing_x spacing_y spacing_z]")
    spacing_mm = [float(v) for v in argv[3:]] or [1.0, 1.0, 1.0]
    probabilities, labels = OnnxSegmenter(argv[0]).segment(np.load(argv[1]), spacing_mm)
    np.savez(argv[2], probabilities=probabilities, labels=labels)


if __name__ == "__main__":
    main(sys.argv[1:])
