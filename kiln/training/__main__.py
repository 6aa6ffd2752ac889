"""`python -m kiln.training RECIPE` / `torchrun ... -m kiln.training RECIPE`: staged pretraining."""

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
