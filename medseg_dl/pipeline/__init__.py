"""The training input pipeline in tf.data: patch centres and positions (sampling.py), spatial and
intensity augmentation (spatial.py, intensity.py, random draws in streams.py), datasets (inputs.py);
spatial.py's rotation and elastic field applied to a whole volume (whole_volume.py)."""
