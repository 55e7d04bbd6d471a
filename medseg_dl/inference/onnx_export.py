"""`medseg export --format onnx`: ONNX files that segment a whole preprocessed volume with numpy and
onnxruntime, where neither TensorFlow nor medseg_dl is installed (ONNX Runtime on CPU or GPU, or the
`network.onnx` in OpenVINO or TensorRT).

The folder (replaced whole, atomically):
- `network.onnx`: for one network without mirroring TTA its logits (`Predictor.window_logits`); else the sum
  of the members' probabilities on the windows as given (`Predictor.probability_sum`: softmax (N, px, py, pz, K),
  or per region the sigmoid of the logit and of its negation (N, px, py, pz, K, 2)), which the runner calls once
  per flip on the flipped windows, so the graph holds each network once, not 8 times (tf2onnx's optimizer takes
  more than linearly longer with the graph). Converted by tf2onnx from the same traced code; float32, any batch
  and window size the network takes. Inputs "windows" (N, px, py, pz, C), "positions" (N, 3) float32.
- `combine.onnx` (only with mirroring TTA or several members): the flipped-back sums of every flip added, "total",
  -> window logits (N, px, py, pz, K) float32, the log mean probability (`Predictor.log_mean`).
- `finish.onnx`: average logits (X, Y, Z, K) float32 and spacing_mm (3,) float32 -> probabilities (X, Y, Z, K)
  float32 (softmax, or sigmoid per region) and labels (X, Y, Z) int32, in this order (arg-max or regions
  painted, then the experiment's post-processing decision: postprocess_graph.py, 26-connected components
  equal to scipy's).
- `segment.py`: onnx_runner.py, the sliding window in numpy (grid, positions and weights of windows.py).
- metadata.json (export.py `export_metadata`).

The whole sliding window is not in the ONNX graph: tf2onnx cannot convert the SavedModel's `serve`
(its convolution kernels are read inside a while loop, whose shapes it cannot infer), and a numpy loop over
the windows costs nothing beside the network. The runner sums in float32, so its probabilities equal the
Predictor's with evaluation.accumulation float32 to float32 rounding of the two runtimes' convolutions
(the test: 1e-4), and its labels equal them.
"""
import os
import shutil
from typing import Dict, Optional

import tensorflow as tf
import tf2onnx

from medseg_dl.inference import postprocess, postprocess_graph
from medseg_dl.inference.export import exported_folder
from medseg_dl.inference.predictor import Predictor

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onnx_runner.py")  # copied, not imported
OPSET = 17  # ONNX Runtime >= 1.14, TensorRT >= 8.6, OpenVINO >= 2023.0


def export_onnx(predictor: Predictor, num_channels: int, output_dir: str, metadata: Dict,
                postprocessing: Optional[Dict]) -> str:
    """Write network.onnx, combine.onnx (where the predictor averages), finish.onnx (with the `postprocessing`
    decision, None: none), segment.py and `metadata` as metadata.json to `output_dir` (replaced whole,
    atomically); returns `output_dir`."""
    network_signature = [tf.TensorSpec([None, None, None, None, num_channels], tf.float32, name="windows"),
                         tf.TensorSpec([None, 3], tf.float32, name="positions")]
    targets = predictor.targets

    def finish(average, spacing_mm):
        labels = tf.cast(targets.labels_in_graph(average), tf.int32)
        labels = postprocess_graph.apply(labels, postprocessing or postprocess.NOTHING, spacing_mm, targets)
        return targets.probabilities_in_graph(average), labels

    finish_signature = [tf.TensorSpec([None, None, None, targets.outputs], tf.float32, name="average"),
                        tf.TensorSpec([3], tf.float32, name="spacing_mm")]
    with exported_folder(output_dir, "the ONNX export", metadata) as folder:
        os.makedirs(folder)
        if predictor.averages:
            total = [None, None, None, None, targets.outputs] + ([2] if targets.uses_regions else [])
            _convert(tf.function(predictor.probability_sum), network_signature, os.path.join(folder, "network.onnx"))
            _convert(tf.function(predictor.log_mean), [tf.TensorSpec(total, tf.float32, name="total")],
                     os.path.join(folder, "combine.onnx"))
        else:
            _convert(tf.function(predictor.window_logits), network_signature, os.path.join(folder, "network.onnx"))
        _convert(tf.function(finish), finish_signature, os.path.join(folder, "finish.onnx"))
        shutil.copyfile(RUNNER, os.path.join(folder, "segment.py"))
    return output_dir


def _convert(function, signature, path):
    """tf2onnx's conversion of the tf.function `function` traced with `signature` (named inputs) to `path`."""
    tf2onnx.convert.from_function(function, input_signature=signature, opset=OPSET, output_path=path)
