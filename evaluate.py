"""Evaluate checkpoints as they appear: `python evaluate.py --params <model_dir>/params.yaml`
(same as `medseg evaluate`)."""
import sys

from medseg_dl.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
