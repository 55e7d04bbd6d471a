"""Experiment parameters: the schema of every key (schema.py), the validated YAML `Params` (params.py),
and the Markdown reference generated from the schema (reference.py)."""
