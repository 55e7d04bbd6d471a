"""Whole-volume prediction: the sliding-window grid, weights and recombination (windows.py), the
`Predictor` (predictor.py), a trained network loaded from a model folder (trained.py), and
`medseg predict` (predict.py)."""

# the choices of the command line, named here so that `medseg --help` knows them without loading TensorFlow
EXPORT_FORMATS = ("savedmodel", "onnx")  # medseg export --format (export.py)
PROBABILITY_DTYPES = ("uint8", "float16")  # medseg predict --save-probabilities (probability_files.py)
