"""Train an experiment: `python train.py --params params/hippocampus.yaml` (same as `medseg train`)."""
import sys

from medseg_dl.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
