"""`torchrun --nproc_per_node=N -m kiln.probe PROBE.toml`: the arms with FSDP2 on N ranks."""

import sys

from kiln.probe.cli import main

if __name__ == "__main__":
    sys.exit(main())
