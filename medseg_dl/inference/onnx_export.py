"""`medseg export --format onnx`: ONNX files that segment a whole preprocessed volume with numpy and
onnxruntime, where neither TensorFlow nor medseg_dl is installed (ONNX Runtime on CPU or GPU, or the
`network.onnx` in OpenVINO or TensorRT).

The folder (replaced whole, atomically):
- `network.onnx`: the `Predictor`'s window logits (`Predictor.window_logits`: one network, or the
  ensemble's log mean probability over its members and, with mirroring TTA, the 8 flips), converted by
  tf2onnx from the same traced code; float32, any batch and window size the network takes.
  Inputs "windows" (N, px, py, pz, C), "positions" (N, 3) float32; output (N, px, py, pz, K) logits.
  With mirroring TTA each member runs once on the 8 flips stacked (`flips_in_one_call`): the graph holds one
  copy of each network, not 8: tf2onnx's optimizer takes many times less (its time grows faster than the
  graph), and the network sees 8N windows per call (onnx_runner.py sends N = windows.batch_size // 8, at least 1).
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
import functools
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
    """Write network.onnx, finish.onnx (with the `postprocessing` decision, None: none), segment.py and
    `metadata` as metadata.json to `output_dir` (replaced whole, atomically); returns `output_dir`."""
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
        _convert(tf.function(functools.partial(predictor.window_logits, flips_in_one_call=True)), network_signature,
                 os.path.join(folder, "network.onnx"))
        _convert(tf.function(finish), finish_signature, os.path.join(folder, "finish.onnx"))
        shutil.copyfile(RUNNER, os.path.join(folder, "segment.py"))
    return output_dir


def _convert(function, signature, path):
    """tf2onnx's conversion of the tf.function `function` traced with `signature` (named inputs) to `path`."""
    tf2onnx.convert.from_function(function, input_signature=signature, opset=OPSET, output_path=path)
