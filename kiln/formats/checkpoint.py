"""Checkpoints and exports (DESIGN.md contract 8): the names a training run writes, and
the readers of its small metadata files, for whoever picks a run up (a resumed stage,
the next stage, `kiln mix run`, an annealing probe).

    <output>/NN_<stage>/
        checkpoints/step-00000120/   DCP shards of model and optimizer, rng-rank<r>.pt,
                                     kiln_checkpoint.json (step, tokens, scheduler, sampler, resolved config)
        final/                       a Hugging Face model directory (safetensors, config, tokenizer)
        final/kiln_stage.json        the stage's summary, written last: the stage is finished
        metrics.jsonl                one record per step (train/..., perf/..., val/...)
        recipe_resolved.json         the resolved recipe
"""

from __future__ import annotations

import os

from kiln.config import read_json

CHECKPOINTS_DIR, FINAL_DIR = "checkpoints", "final"
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_META = "kiln_checkpoint.json"  # written last into a checkpoint: it marks it complete
STAGE_SUMMARY = "kiln_stage.json"  # written last into final/: it marks the stage finished
METRICS_FILE, RESOLVED_RECIPE = "metrics.jsonl", "recipe_resolved.json"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def read_checkpoint_meta(checkpoint_dir: str) -> dict:
    """A checkpoint's kiln_checkpoint.json: step, world size, tokens, scheduler and sampler state, config."""
    return read_json(os.path.join(checkpoint_dir, CHECKPOINT_META), "checkpoint metadata")


def read_stage_summary(final_dir: str) -> dict:
    """An exported stage's kiln_stage.json: stage, steps, tokens, final loss, ..."""
    return read_json(os.path.join(final_dir, STAGE_SUMMARY), "stage summary")
