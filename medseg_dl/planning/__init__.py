"""Self-configuration: the fingerprint of a dataset (fingerprint.py), the rules that derive an experiment
from it (planner.py), and `medseg plan`, which writes it as a commented params file (command.py)."""
