"""medseg_dl: patch-based segmentation of 3D medical images with TensorFlow 2."""
from medseg_dl.errors import MedsegError

__version__ = "0.1.0"
__all__ = ["MedsegError", "__version__"]
