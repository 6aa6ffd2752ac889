"""The runs table (DESIGN.md contract 5): one row per proxy run, CSV or Parquet.

kiln's proxies write `run`, one weight column per domain (`w_<domain>`), the
validation loss per domain (`val_<domain>`) and their mean (`val_mean`), bits per
byte (`bpb_<domain>`), `train_loss`, `params`, `tokens` and `seed`. The mixer reads
any table of this shape, choosing weight and metric columns by glob
(kiln.mixing.table), so these names are kiln's own convention, not a requirement.
"""

WEIGHT_PREFIX = "w_"  # weight columns: w_<domain>
VALIDATION_PREFIX = "val_"  # validation loss columns: val_<domain>, and val_mean
BPB_PREFIX = "bpb_"  # bits-per-byte columns: bpb_<domain>
# Weights written by an optimizer and rounded (a runs table, a mixture file) sum to 1
# within this; a looser tolerance would let a hand-edited file that forgot a domain through.
SUM_TOLERANCE = 1e-6
