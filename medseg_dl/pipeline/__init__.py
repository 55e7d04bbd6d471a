"""tf.data input pipelines: patch sampling (sampling.py), augmentation (augment.py), datasets (inputs.py)."""
