"""The training process: the step loop with checkpoints and faults (loop.py), what it reports
(reporting.py), and the tf.distribute strategy (distribute.py)."""
