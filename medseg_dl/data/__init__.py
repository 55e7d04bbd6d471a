"""Datasets: reading volumes (io.py), finding and splitting subjects (subjects.py), one subject -> one
preprocessed `Case` (cases.py, preprocess.py), and conversion to TFRecords (convert.py; the record format
in tfrecords.py, the dataset.json index in index.py)."""
