"""The Python interpreter each library's benchmark process runs with.

`benchmarks/venvs.sh` makes one virtual environment per library under .venv-bench/, so that a
measured process holds only its own library: in one environment with everything, MONAI imports
TensorFlow whenever it is installed (about 640 MB of peak RSS charged to MONAI) and ITK, which reads
the volumes, imports torch (charged to medseg_dl). Without those environments every library runs with
this interpreter; `isolated` on each line says which was the case.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_OF = {"medseg_dl": "ours", "monai": "peers", "torchio": "peers", "torchio_per_patch": "peers",
           "elasticdeform": "elasticdeform", "nnunetv2": "nnunet"}


def python_for(library):
    """(interpreter path, True when it is the library's own environment) for `library`."""
    path = os.path.join(REPO, ".venv-bench", VENV_OF[library], "bin", "python")
    return (path, True) if os.path.exists(path) else (sys.executable, False)
