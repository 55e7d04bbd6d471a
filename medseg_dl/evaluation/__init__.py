"""The evaluation process: checkpoint watching and folder scoring (watcher.py), one evaluation of cases by a
predictor, one case at a time (evaluate.py, cases.py), its report (report.py), and segmentation metrics with
voxel spacing (scoring.py)."""
