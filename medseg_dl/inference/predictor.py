"""Whole-volume prediction by sliding windows (used by evaluation, predict and export).

    predictor = Predictor.from_params(network, params)          # or a sequence of networks (an ensemble)
    probabilities = predictor.probabilities(image)   # (X, Y, Z, K) float32
    labels = predictor.labels(image)                 # (X, Y, Z) uint8
    logits = predictor.logits(image)                 # (X, Y, Z, K) float32: blended, before softmax or sigmoid
    for begin_vox, block in predictor.slabs(image, "probabilities", axis=2):   # the same, slab by slab
        ...

A network is any callable taking {"image": (N, px, py, pz, C) float32, "position": (N, 3) float32}
(the window positions of `pipeline.sampling.patch_positions`) and returning logits (N, px, py, pz, K); it
is called with training=False when it accepts that argument. What the K outputs stand for is the
predictor's `Targets` (data/targets.py): one softmax over the labels, or one sigmoid per region. Windows
are batched through the window function (`Predictor.window_function`), one tf.function per channel
count, traced once whatever the volume shape; the SavedModel export (export.py) traces the same
function. The window logits are blended with Gaussian or constant weights (windows.py) and the
probabilities are the softmax (labels) or the sigmoid per region (regions) of the weighted average, as
in nnU-Net (once per voxel, not once per window); the labels are its arg-max, or the regions painted
(`Targets.labels_in_graph`). The window logits are the network's logits for one network without
mirroring; otherwise they are averaged as probabilities over the members of the ensemble and, with
mirroring test-time augmentation, over the 8 flips of each window (every (member, flip) weighs the
same): log(mean softmax) for labels; for regions the log-odds of the mean sigmoid, log(mean sigmoid(x))
- log(mean sigmoid(-x)) (the complement averaged as such, so that it keeps its precision near 1). Either
way a window predicted alone gets exactly the averaged probabilities. A flipped window is given its
position mirrored on the flipped axes, as in training.

Recombination (windows.py) runs on the host with a CPU, and in TensorFlow ops on the accelerator when
a GPU is visible (`recombination="auto"`), so that the volume stays on the device; both give the
same result to float32 rounding. On the host, windows are visited row by row along one axis and each
slab is finished as soon as no later window touches it (`windows.recombined_slabs`), so the live sums
span one window along that axis: `slabs` yields the finished slabs, and `labels` or a caller that
streams (predict.py) never holds K values per voxel of the volume. With `accumulation="float16"`
(probabilities and labels), each window's logits are weighted by each window's share of the weight at
each voxel (so the sums are the averages: no tiny Gaussian corner weights to underflow) and, for labels,
first shifted per voxel by their maximum over the classes (the same amount for every class at a voxel, so
the softmax and arg-max of the average are unchanged; a sigmoid is not shift-invariant, so region logits
are not shifted), then summed in float16: half the memory of float32, probabilities within about 1e-3
(9e-4 with regions, 1.2e-3 with labels on two BraTS test subjects) and a few labels in a million different
(3 of 2.6 M on the hippocampus demo's validation cases; 35 and 27 of 17.9 M on the BraTS subjects;
benchmarks/accumulation.py); the default is float32, exact. The logits output is always summed in
float32, unshifted.
"""
import functools
import inspect
import itertools
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from medseg_dl.config import schema
from medseg_dl.config.params import Params
from medseg_dl.data.targets import Targets
from medseg_dl.errors import DataError, OutOfMemoryError, ParamsError
from medseg_dl.inference import graph_windows, windows
from medseg_dl.pipeline.sampling import mirror_positions

# the 8 flips as lists of the batch axes reversed: 1, 2, 3 are spatial x, y, z
MIRROR_AXES = [list(axes) for n in range(4) for axes in itertools.combinations((1, 2, 3), n)]
TINY_PROBABILITY = 1e-30  # floor before the log of flip-averaged probabilities
OUTPUT_DTYPES = {"probabilities": np.float32, "labels": np.uint8, "logits": np.float32}
ACCUMULATIONS = {"float16": tf.float16, "float32": tf.float32}
RECOMBINATIONS = ("auto", "host", "device")


def output_transform(targets: Targets, output: str) -> Optional[graph_windows.Transform]:
    """The per-voxel transform of the blended logits (..., K) float32 that gives `output`: "probabilities"
    (..., K) float32 (`Targets.probabilities_in_graph`: softmax, or sigmoid per region), "labels" (...) uint8
    (`Targets.labels_in_graph`: arg-max, or the regions painted), or None for "logits" (the average itself)."""
    transforms = {"probabilities": targets.probabilities_in_graph, "labels": targets.labels_in_graph, "logits": None}
    if output not in transforms:
        raise ValueError(f"output = {output!r}; expected one of {', '.join(transforms)}")
    return transforms[output]


@functools.lru_cache(maxsize=None)
def finisher(targets: Targets, output: str, accumulation: str) -> Callable[..., tf.Tensor]:
    """`windows.make_finisher` of `output_transform(targets, output)` for sums in `accumulation` ("float32" or
    "float16"); one per (targets, output, accumulation) in the process, so each block shape compiles once."""
    return windows.make_finisher(output_transform(targets, output), ACCUMULATIONS[accumulation])


def accepts_training(network: Callable) -> bool:
    """True when `network` can be called with a `training=` keyword."""
    try:
        parameters = inspect.signature(network).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "training" or p.kind == p.VAR_KEYWORD for p in parameters)


class Predictor:
    """Sliding-window prediction of whole volumes with one network or an ensemble; caches its window
    function (a tf.function) per channel count.

    network_or_networks: one network, or a non-empty sequence of networks (an ensemble: the mean of
    their probabilities; M members cost M x the network calls); patch_size_vox: window (3,) in voxels;
    targets: what the network's K = `targets.outputs` logits stand for (labels or regions, data/targets.py);
    overlap: fraction in [0, 1); blending: "gaussian" or "constant"; batch_size: windows per network call;
    tta_mirroring: average the probabilities over all 8 flips of each window (8x the network calls);
    recombination: "host" (numpy, threads), "device" (TensorFlow ops, on the accelerator) or "auto" (device
    when a GPU is visible, else host).
    """

    def __init__(self, network_or_networks: Union[Callable, Sequence[Callable]], patch_size_vox: Sequence[int],
                 targets: Targets, overlap: float = 0.5, blending: str = "gaussian", batch_size: int = 4,
                 tta_mirroring: bool = False, recombination: str = "auto", accumulation: str = "float32"):
        self.networks = _as_networks(network_or_networks)
        self.patch_size_vox = tuple(schema.check_argument("patch_size_vox", [int(p) for p in patch_size_vox],
                                                          "sampling.patch_size"))
        if not isinstance(targets, Targets):
            raise ValueError(f"targets = {targets!r}; expected a Targets (data/targets.py Targets.from_params)")
        self.targets = targets
        self.overlap = schema.check_argument("overlap", float(overlap), "evaluation.overlap")
        self.blending = schema.check_argument("blending", blending, "evaluation.blending")
        self.batch_size = schema.check_argument("batch_size", int(batch_size), "evaluation.batch_size")
        self.tta_mirroring = bool(tta_mirroring)
        self.accumulation = schema.check_argument("accumulation", accumulation, "evaluation.accumulation")
        if recombination not in RECOMBINATIONS:
            raise ValueError(f"recombination = {recombination!r}; expected one of {', '.join(RECOMBINATIONS)}")
        self.on_device = recombination == "device" or (recombination == "auto" and
                                                       bool(tf.config.list_logical_devices("GPU")))
        self._in_graph_functions = {}
        self._training_kwargs = [{"training": False} if accepts_training(n) else {} for n in self.networks]
        self._window_functions = {}

    @classmethod
    def from_params(cls, network_or_networks: Union[Callable, Sequence[Callable]], params: Params) -> "Predictor":
        """Window from sampling.patch_size, the targets from the data section (labels or regions), the rest from
        the evaluation section."""
        evaluation = params.evaluation
        return cls(network_or_networks, params.sampling.patch_size, Targets.from_params(params.data),
                   overlap=evaluation.overlap, blending=evaluation.blending, batch_size=evaluation.batch_size,
                   tta_mirroring=evaluation.tta_mirroring, accumulation=evaluation.accumulation)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Probabilities (X, Y, Z, K) float32 numpy of an image (X, Y, Z, C) float32: per class (softmax) or per
        region (sigmoid)."""
        return self._whole_volume(image, "probabilities")

    def labels(self, image: np.ndarray, progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
        """Label map (X, Y, Z) uint8 numpy of an image (X, Y, Z, C) float32: the most probable class, or the
        regions painted (`Targets.labels_of`); progress: called with (windows done, windows in total)."""
        return self._whole_volume(image, "labels", progress)

    def logits(self, image: np.ndarray) -> np.ndarray:
        """The weighted average of the window logits (X, Y, Z, K) float32 numpy of an image (X, Y, Z, C)
        float32, before the softmax or sigmoid (what MONAI's and TorchIO's aggregators return)."""
        return self._whole_volume(image, "logits")

    def slabs(self, image: np.ndarray, output: str, axis: int = 2,
              progress: Optional[Callable[[int, int], None]] = None,
              out: Optional[np.ndarray] = None) -> Iterator[Tuple[int, np.ndarray]]:
        """The `output` ("probabilities", "labels" or "logits") of an image (X, Y, Z, C) float32, slab by slab
        along `axis`: yields (begin_vox, block) in increasing begin, block = the output of the voxels
        [begin_vox, begin_vox + n) along `axis` (all of the other axes; labels uint8, else (.., K) float32).
        On the host the blocks are finished as the windows advance; on the device the volume is one block.
        progress: called with (windows done, windows in total); out: the whole output (X, Y, Z[, K]) of the
        output's dtype, or None: each block is finished into its part of `out` (and yielded as that view), else
        into a new array."""
        image = _check_image(image)
        try:
            yield from self._slabs_checked(image, output, axis, progress, out)
        except (tf.errors.ResourceExhaustedError, MemoryError):  # predicting writes no file: memory, not disk
            kind = "regions" if self.targets.uses_regions else "classes"
            raise OutOfMemoryError(f"out of memory (GPU or host) while segmenting a volume of "
                                   f"{' x '.join(map(str, image.shape[:3]))} voxels into {self.targets.outputs} "
                                   f"{kind}; lower evaluation.batch_size, or set evaluation.device: cpu") from None

    def _whole_volume(self, image, output, progress=None):
        """The whole `output` of `image`, its slabs along x (contiguous in C order: the live sums, their shift
        and the finished blocks are whole memory ranges) finished straight into the result."""
        image = _check_image(image)
        out = self._empty_output(image.shape[:3], output)
        for _ in self.slabs(image, output, 0, progress, out):
            pass
        return out

    def _slabs_checked(self, image, output, axis, progress, out):
        if self.on_device:
            volume = self._in_graph_function(image.shape[3], output)(tf.constant(image)).numpy()
            if out is not None:
                out[...] = volume
            yield 0, volume if out is None else out
            return
        grid = windows.window_grid(image.shape[:3], self.patch_size_vox, self.overlap, self.blending)
        accumulation = "float32" if output == "logits" else self.accumulation
        half = accumulation == "float16"
        function = self._weighted_window_function(image.shape[3]) if half else self.window_function(image.shape[3])
        finish = finisher(self.targets, output, accumulation)
        for begin, sums, coverages in windows.recombined_slabs(function, image, grid, self.batch_size,
                                                               self.targets.outputs, axis,
                                                               np.float16 if half else np.float32, half, progress):
            if out is None:
                block = self._empty_output(sums.shape[:3], output)
            else:
                block = out[(slice(None),) * axis + (slice(begin, begin + sums.shape[axis]),)]
            yield begin, windows.finish_block(finish, sums, coverages, block)

    def _empty_output(self, shape_vox, output):
        """An uninitialised `output` array for voxels of `shape_vox` (3,): (.., K) float32, or labels (..) uint8."""
        return np.empty(tuple(shape_vox) + (() if output == "labels" else (self.targets.outputs,)),
                        OUTPUT_DTYPES[output])

    def _weighted_window_function(self, num_channels):
        """The tf.function (windows, positions, normalized profiles (N, px), (N, py), (N, pz)) -> (N, px, py, pz,
        K) float16 window logits (for labels minus their maximum over the classes at each voxel; region logits
        as they are) times the window's share of the weight at each voxel (`windows.normalized_profiles`;
        cached per channel count)."""
        key = ("weighted", num_channels)
        if key not in self._window_functions:
            window_function = self.window_function(num_channels)

            def weighted(cut, positions, profile_x, profile_y, profile_z):
                logits = window_function(cut, positions)
                if self.max_shift:
                    logits = logits - tf.reduce_max(logits, axis=-1, keepdims=True)
                share = profile_x[:, :, None, None] * profile_y[:, None, :, None] * profile_z[:, None, None, :]
                return tf.cast(logits * share[..., None], tf.float16)

            signature = [tf.TensorSpec((None,) + self.patch_size_vox + (num_channels,), tf.float32),
                         tf.TensorSpec((None, 3), tf.float32)]
            signature += [tf.TensorSpec((None, p), tf.float32) for p in self.patch_size_vox]
            self._window_functions[key] = tf.function(weighted, input_signature=signature)
        return self._window_functions[key]

    def _in_graph_function(self, num_channels, output):
        """The tf.function image (X, Y, Z, C) -> `output` of the whole volume in TensorFlow ops, slab by slab
        (graph_windows.py; cached)."""
        if (num_channels, output) not in self._in_graph_functions:
            def predict(image):
                return self.in_graph(image, output_transform(self.targets, output))

            signature = [tf.TensorSpec([None, None, None, num_channels], tf.float32)]
            self._in_graph_functions[num_channels, output] = tf.function(predict, input_signature=signature)
        return self._in_graph_functions[num_channels, output]

    def in_graph(self, image: tf.Tensor, transform=None):
        """`transform` (per voxel over the last axis; a tuple or dict of them; None: the blended logits, summed
        in float32) of the weighted average over an image (X, Y, Z, C) float32 tensor (C static), in
        TensorFlow ops (graph_windows.py), with this predictor's window settings and accumulation: the device
        path and the SavedModel export. With float16 accumulation and labels the transform sees the average
        less a per-voxel constant (`max_shift`): give transforms of the targets (`output_transform`)."""
        return graph_windows.recombine_in_graph(self.window_function(int(image.shape[-1])), image,
                                                self.patch_size_vox, self.overlap, self.blending, self.batch_size,
                                                self.targets.outputs, transform,
                                                "float32" if transform is None else self.accumulation, self.max_shift)

    @property
    def max_shift(self) -> bool:
        """Whether float16 accumulation shifts each window's logits by their maximum over K at each voxel: for
        labels (softmax and arg-max ignore it), not for regions (a sigmoid does not)."""
        return not self.targets.uses_regions

    def window_function(self, num_channels: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
        """`window_logits` as a tf.function of windows of the patch size and C = `num_channels` channels
        (traced once, cached)."""
        if num_channels not in self._window_functions:
            signature = [tf.TensorSpec((None,) + self.patch_size_vox + (num_channels,), tf.float32),
                         tf.TensorSpec((None, 3), tf.float32)]
            self._window_functions[num_channels] = tf.function(self.window_logits, input_signature=signature)
        return self._window_functions[num_channels]

    def window_logits(self, windows: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
        """Window logits (N, px, py, pz, K) float32 of windows (N, px, py, pz, C) float32 at positions (N, 3)
        float32: the network's logits for one network without mirroring (`averages` false), else, over the 8
        flips (with mirroring) and the members, log(mean softmax) for labels or log(mean sigmoid(x)) -
        log(mean sigmoid(-x)) per region: `log_mean` of the flipped-back `probability_sum` of each flip."""
        if not self.averages:
            return self._logits(0, windows, positions)
        total = 0.0
        for axes in self.flips:
            flipped = tf.constant([axis in axes for axis in (1, 2, 3)])
            total += tf.reverse(self.probability_sum(tf.reverse(windows, axes), mirror_positions(positions, flipped)),
                                axes)
        return self.log_mean(total)

    @property
    def averages(self) -> bool:
        """Whether the window logits average probabilities (several members, or mirroring TTA)."""
        return len(self.networks) > 1 or self.tta_mirroring

    @property
    def flips(self) -> list:
        """The flips averaged: the batch axes (subsets of 1, 2, 3) of the 8 mirrorings, or only none."""
        return MIRROR_AXES if self.tta_mirroring else [[]]

    def probability_sum(self, windows: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
        """The sum over the members of their probabilities on windows (N, px, py, pz, C) float32 as given, at
        positions (N, 3) float32: of the softmax (N, px, py, pz, K) float32, or per region (N, px, py, pz, K, 2)
        float32 of the sigmoid of its logit and of its negation. The ONNX export's network.onnx."""
        total = 0.0
        for member in range(len(self.networks)):
            logits = self._logits(member, windows, positions)
            if self.targets.uses_regions:
                total += tf.stack([tf.sigmoid(logits), tf.sigmoid(-logits)], axis=-1)
            else:
                total += tf.nn.softmax(logits, axis=-1)
        return total

    def log_mean(self, total: tf.Tensor) -> tf.Tensor:
        """Window logits (N, px, py, pz, K) float32 of the `probability_sum`s (their shape) of every flip summed:
        the log of their mean over the members and flips (floored at TINY_PROBABILITY), per region the difference
        of its two logs. The ONNX export's combine.onnx."""
        log_mean = tf.math.log(tf.maximum(total / (len(self.networks) * len(self.flips)), TINY_PROBABILITY))
        return log_mean[..., 0] - log_mean[..., 1] if self.targets.uses_regions else log_mean

    def _logits(self, member, windows, positions):
        logits = self.networks[member]({"image": windows, "position": positions}, **self._training_kwargs[member])
        expected = tuple(windows.shape[1:4]) + (self.targets.outputs,)
        if not logits.shape[1:].is_compatible_with(expected):
            source = "data.regions" if self.targets.uses_regions else "data.num_classes"
            raise ParamsError(f"the network returns logits of shape {tuple(logits.shape[1:])} per window, expected "
                              f"{expected} (sampling.patch_size + one output per {source}); use a window the "
                              f"network accepts and the classes or regions it was built with")
        return tf.cast(logits, tf.float32)


def _as_networks(network_or_networks):
    """The networks as a tuple: one callable, or a non-empty sequence of callables (`ParamsError` otherwise)."""
    if callable(network_or_networks):
        return (network_or_networks,)
    networks = tuple(network_or_networks) if isinstance(network_or_networks, Sequence) else ()
    if not networks or not all(callable(n) for n in networks):
        raise ParamsError(f"the Predictor needs one network or a non-empty sequence of networks (callables), "
                          f"got {network_or_networks!r}")
    return networks


def _check_image(image):
    """The image as a C-contiguous (X, Y, Z, C) float32 array (a copy only when it is not one already: a
    Fortran-ordered volume, as nibabel reads it, would make every window a transposing copy, 7x slower)."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    if image.ndim != 4:
        raise DataError(f"the image to predict has shape {image.shape}; expected (X, Y, Z, C) channels-last "
                        f"(add a trailing channel axis to a single-channel volume)")
    return image
