"""The evaluation process: checkpoint watching and folder scoring (watcher.py), the report of one
checkpoint (report.py), and segmentation metrics with voxel spacing (scoring.py)."""
