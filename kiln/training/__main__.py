"""`python -m kiln.training RECIPE` / `torchrun ... -m kiln.training RECIPE`: staged pretraining."""

import os
import sys

# Offline by default, as the `kiln` command: nothing downloads at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kiln.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
