"""Whole-volume prediction by sliding windows (used by evaluation, predict and export).

    predictor = Predictor.from_params(network, params)          # or a sequence of networks (an ensemble)
    probabilities = predictor.probabilities(image)   # (X, Y, Z, K) float32
    labels = predictor.labels(image)                 # (X, Y, Z) uint8
    logits = predictor.logits(image)                 # (X, Y, Z, K) float32: blended, no softmax
    for begin_vox, block in predictor.slabs(image, "probabilities", axis=2):   # the same, slab by slab
        ...

A network is any callable taking {"image": (N, px, py, pz, C) float32, "position": (N, 3) float32}
(the window positions of `pipeline.sampling.patch_positions`) and returning logits (N, px, py, pz, K); it
is called with training=False when it accepts that argument. Windows are batched through the window
function (`Predictor.window_function`), one tf.function per channel count, traced once whatever the
volume shape; the SavedModel export (export.py) traces the same function. The window logits are
blended with Gaussian or constant weights (windows.py) and the softmax of the
weighted average is the probability, as in nnU-Net (the softmax runs once per voxel, not once per
window). The window logits are the network's logits for one network without mirroring; otherwise
log(mean of the softmax probabilities) over the members of the ensemble and, with mirroring
test-time augmentation, over the 8 flips of each window (every (member, flip) weighs the same), so a
window predicted alone gets exactly the averaged probabilities. A flipped window is given its
position mirrored on the flipped axes, as in training.

Recombination (windows.py) runs on the host with a CPU, and in TensorFlow ops on the accelerator when
a GPU is visible (`recombination="auto"`), so that the volume stays on the device; both give the
same result to float32 rounding. On the host, windows are visited row by row along one axis and each
slab is finished as soon as no later window touches it (`windows.recombined_slabs`), so the live sums
span one window along that axis: `slabs` yields the finished slabs, and `labels` or a caller that
streams (predict.py) never holds K values per voxel of the volume. With `accumulation="float16"`
(probabilities and labels), each window's logits are shifted per voxel by their maximum over the
classes (the same amount for every class at a voxel, so the softmax and arg-max of the average are
unchanged) and weighted by each window's share of the weight at each voxel (so the sums are the
averages: no tiny Gaussian corner weights to underflow), then summed in float16: half the memory of
float32, probabilities within 1e-3 and, measured on the hippocampus demo's validation cases, 3 labels
of 2.6 M different (benchmarks/accumulation.py); the default is float32, exact. The logits output is
always summed in float32, unshifted.
"""
import inspect
import itertools
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from medseg_dl.config import schema
from medseg_dl.config.params import Params
from medseg_dl.errors import DataError, OutOfMemoryError, ParamsError
from medseg_dl.inference import graph_windows, windows
from medseg_dl.pipeline.sampling import mirror_positions

# the 8 flips as lists of the batch axes reversed: 1, 2, 3 are spatial x, y, z
MIRROR_AXES = [list(axes) for n in range(4) for axes in itertools.combinations((1, 2, 3), n)]
TINY_PROBABILITY = 1e-30  # floor before the log of flip-averaged probabilities
TRANSFORMS = {"probabilities": lambda average: tf.nn.softmax(average, axis=-1),  # per voxel, of the average
              "labels": lambda average: tf.cast(tf.argmax(average, axis=-1), tf.uint8),  # num_classes <= 256
              "logits": lambda average: average}
OUTPUT_DTYPES = {"probabilities": np.float32, "labels": np.uint8, "logits": np.float32}
ACCUMULATIONS = {"float16": tf.float16, "float32": tf.float32}
FINISHERS = {(output, name): windows.make_finisher(transform, dtype)
             for output, transform in TRANSFORMS.items() for name, dtype in ACCUMULATIONS.items()}
RECOMBINATIONS = ("auto", "host", "device")


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
    their softmax probabilities; M members cost M x the network calls); patch_size_vox: window (3,) in
    voxels; num_classes: K; overlap: fraction in [0, 1); blending: "gaussian" or "constant"; batch_size:
    windows per network call; tta_mirroring: average the probabilities over all 8 flips of each window
    (8x the network calls); recombination: "host" (numpy, threads), "device" (TensorFlow ops, on the
    accelerator) or "auto" (device when a GPU is visible, else host).
    """

    def __init__(self, network_or_networks: Union[Callable, Sequence[Callable]], patch_size_vox: Sequence[int],
                 num_classes: int, overlap: float = 0.5, blending: str = "gaussian", batch_size: int = 4,
                 tta_mirroring: bool = False, recombination: str = "auto", accumulation: str = "float32"):
        self.networks = _as_networks(network_or_networks)
        self.patch_size_vox = tuple(schema.check("sampling.patch_size", [int(p) for p in patch_size_vox]))
        self.num_classes = schema.check("data.num_classes", int(num_classes))
        self.overlap = schema.check("evaluation.overlap", float(overlap))
        self.blending = schema.check("evaluation.blending", blending)
        self.batch_size = schema.check("evaluation.batch_size", int(batch_size))
        self.tta_mirroring = bool(tta_mirroring)
        self.accumulation = schema.check("evaluation.accumulation", accumulation)
        if recombination not in RECOMBINATIONS:
            raise ParamsError(f"recombination = {recombination!r}; expected one of {', '.join(RECOMBINATIONS)}")
        self.on_device = recombination == "device" or (recombination == "auto" and
                                                       bool(tf.config.list_logical_devices("GPU")))
        self._in_graph_functions = {}
        self._training_kwargs = [{"training": False} if accepts_training(n) else {} for n in self.networks]
        self._window_functions = {}

    @classmethod
    def from_params(cls, network_or_networks: Union[Callable, Sequence[Callable]], params: Params) -> "Predictor":
        """Window from sampling.patch_size, K from data.num_classes, the rest from the evaluation section."""
        evaluation = params.evaluation
        return cls(network_or_networks, params.sampling.patch_size, params.data.num_classes,
                   overlap=evaluation.overlap, blending=evaluation.blending, batch_size=evaluation.batch_size,
                   tta_mirroring=evaluation.tta_mirroring, accumulation=evaluation.accumulation)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities (X, Y, Z, K) float32 numpy of an image (X, Y, Z, C) float32."""
        return self._whole_volume(image, "probabilities")

    def labels(self, image: np.ndarray, progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
        """Most probable class (X, Y, Z) uint8 numpy of an image (X, Y, Z, C) float32; progress: called with
        (windows done, windows in total)."""
        return self._whole_volume(image, "labels", progress)

    def logits(self, image: np.ndarray) -> np.ndarray:
        """The weighted average of the window logits (X, Y, Z, K) float32 numpy of an image (X, Y, Z, C)
        float32, before the softmax (what MONAI's and TorchIO's aggregators return)."""
        return self._whole_volume(image, "logits")

    def slabs(self, image: np.ndarray, output: str, axis: int = 2,
              progress: Optional[Callable[[int, int], None]] = None) -> Iterator[Tuple[int, np.ndarray]]:
        """The `output` ("probabilities", "labels" or "logits") of an image (X, Y, Z, C) float32, slab by slab
        along `axis`: yields (begin_vox, block) in increasing begin, block = the output of the voxels
        [begin_vox, begin_vox + n) along `axis` (all of the other axes; labels uint8, else (.., K) float32).
        On the host the blocks are finished as the windows advance; on the device the volume is one block.
        progress: called with (windows done, windows in total)."""
        image = _check_image(image)
        try:
            yield from self._slabs_checked(image, output, axis, progress)
        except (tf.errors.ResourceExhaustedError, MemoryError):  # predicting writes no file: memory, not disk
            raise OutOfMemoryError(f"out of memory (GPU or host) while segmenting a volume of "
                                   f"{' x '.join(map(str, image.shape[:3]))} voxels into {self.num_classes} classes; "
                                   f"lower evaluation.batch_size, or set evaluation.device: cpu") from None

    def _whole_volume(self, image, output, progress=None):
        image = _check_image(image)
        out = np.empty(image.shape[:3] + (() if output == "labels" else (self.num_classes,)), OUTPUT_DTYPES[output])
        for begin, block in self.slabs(image, output, 2, progress):
            out[:, :, begin:begin + block.shape[2]] = block
        return out

    def _slabs_checked(self, image, output, axis, progress):
        if self.on_device:
            yield 0, self._in_graph_function(image.shape[3], output)(tf.constant(image)).numpy()
            return
        grid = windows.window_grid(image.shape[:3], self.patch_size_vox, self.overlap, self.blending)
        accumulation = "float32" if output == "logits" else self.accumulation
        half = accumulation == "float16"
        function = self._weighted_window_function(image.shape[3]) if half else self.window_function(image.shape[3])
        finish = FINISHERS[output, accumulation]
        for begin, sums, coverages in windows.recombined_slabs(function, image, grid, self.batch_size, self.num_classes,
                                                               axis, np.float16 if half else np.float32, half,
                                                               progress):
            out = np.empty(sums.shape[:3] + (() if output == "labels" else (self.num_classes,)),
                           OUTPUT_DTYPES[output])
            yield begin, windows.finish_block(finish, sums, coverages, out)

    def _weighted_window_function(self, num_channels):
        """The tf.function (windows, positions, normalized profiles (N, px), (N, py), (N, pz)) -> (N, px, py, pz,
        K) float16 window logits minus their maximum over the classes at each voxel, times the window's share
        of the weight at each voxel (`windows.normalized_profiles`; cached per channel count)."""
        key = ("weighted", num_channels)
        if key not in self._window_functions:
            window_function = self.window_function(num_channels)

            def weighted(cut, positions, profile_x, profile_y, profile_z):
                logits = window_function(cut, positions)
                shifted = logits - tf.reduce_max(logits, axis=-1, keepdims=True)
                share = profile_x[:, :, None, None] * profile_y[:, None, :, None] * profile_z[:, None, None, :]
                return tf.cast(shifted * share[..., None], tf.float16)

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
                return self.in_graph(image, None if output == "logits" else TRANSFORMS[output])

            signature = [tf.TensorSpec([None, None, None, num_channels], tf.float32)]
            self._in_graph_functions[num_channels, output] = tf.function(predict, input_signature=signature)
        return self._in_graph_functions[num_channels, output]

    def in_graph(self, image: tf.Tensor, transform=None):
        """`transform` (per voxel over the last axis; a tuple or dict of them; None: the blended logits, summed
        in float32) of the weighted average over an image (X, Y, Z, C) float32 tensor (C static), in
        TensorFlow ops (graph_windows.py), with this predictor's window settings and accumulation: the device
        path and the SavedModel export."""
        return graph_windows.recombine_in_graph(self.window_function(int(image.shape[-1])), image,
                                                self.patch_size_vox, self.overlap, self.blending, self.batch_size,
                                                self.num_classes, transform,
                                                "float32" if transform is None else self.accumulation)

    def window_function(self, num_channels: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
        """The tf.function (windows (N, px, py, pz, C) float32, positions (N, 3) float32) -> window logits
        (N, px, py, pz, K) float32, for C = `num_channels` (traced once, cached): the network's logits for
        one network without mirroring, else log(mean softmax) over the members (and the 8 flips)."""
        if num_channels not in self._window_functions:
            signature = [tf.TensorSpec((None,) + self.patch_size_vox + (num_channels,), tf.float32),
                         tf.TensorSpec((None, 3), tf.float32)]
            self._window_functions[num_channels] = tf.function(self._window_logits, input_signature=signature)
        return self._window_functions[num_channels]

    def _window_logits(self, windows, positions):
        if len(self.networks) == 1 and not self.tta_mirroring:
            return self._logits(0, windows, positions)
        flips = MIRROR_AXES if self.tta_mirroring else [[]]
        total = 0.0
        for member in range(len(self.networks)):
            for axes in flips:
                total += self._flipped_probabilities(member, axes, windows, positions)
        return tf.math.log(tf.maximum(total / (len(self.networks) * len(flips)), TINY_PROBABILITY))

    def _flipped_probabilities(self, member, axes, windows, positions):
        """Softmax (N, px, py, pz, K) of member `member` on `windows` (N, px, py, pz, C) flipped on the batch
        `axes` (a subset of 1, 2, 3) with `positions` (N, 3) mirrored there, flipped back."""
        flips = tf.constant([axis in axes for axis in (1, 2, 3)])
        flipped_logits = self._logits(member, tf.reverse(windows, axes), mirror_positions(positions, flips))
        return tf.reverse(tf.nn.softmax(flipped_logits, axis=-1), axes)

    def _logits(self, member, windows, positions):
        logits = self.networks[member]({"image": windows, "position": positions}, **self._training_kwargs[member])
        expected = tuple(windows.shape[1:4]) + (self.num_classes,)
        if not logits.shape[1:].is_compatible_with(expected):
            raise ParamsError(f"the network returns logits of shape {tuple(logits.shape[1:])} per window, expected "
                              f"{expected} (sampling.patch_size + data.num_classes); use a window the network "
                              f"accepts and the num_classes it was built with")
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
