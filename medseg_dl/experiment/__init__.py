"""An experiment on disk: the experiment root, its folds, reports and decision, and opening a model folder of it
(experiment.py); the files of one model folder (model_dir.py); its file lists (filelists.py); checkpoint files as
the evaluator sees them (checkpoints.py); what a resume may change (resume.py)."""
