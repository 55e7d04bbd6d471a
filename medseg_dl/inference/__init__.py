"""Whole-volume prediction: the sliding-window grid, weights and recombination (windows.py), the
`Predictor` (predictor.py), a trained network loaded from a model folder (trained.py), and
`medseg predict` (predict.py)."""
