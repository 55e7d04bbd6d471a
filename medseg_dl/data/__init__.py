"""Datasets: reading volumes (io.py), finding and splitting subjects (subjects.py), one subject -> one
preprocessed `Case` (cases.py, preprocess.py), and conversion to case folders (convert.py; the chunked
case format in store.py, the dataset.json index in index.py)."""
