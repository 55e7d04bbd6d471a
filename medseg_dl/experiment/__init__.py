"""The model folder of one experiment: its file names and life cycle (model_dir.py), and checkpoint
files as the evaluator sees them (checkpoints.py)."""
