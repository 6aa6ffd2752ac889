"""Checkpoints and exports (DESIGN.md contract 8): the names a training run writes, and
the readers of its small metadata files, for whoever picks a run up (a resumed stage,
the next stage, `kiln mix run`, an annealing probe).

    <output>/NN_<stage>/
        checkpoints/step-00000120/   DCP shards of model and optimizer (.metadata, *.distcp), rng-rank<r>.pt,
                                     kiln_checkpoint.json (step, tokens, scheduler, sampler, resolved config,
                                     and the manifest: every other file's size and sha256)
        final/                       a Hugging Face model directory (safetensors, config, tokenizer)
        final/kiln_stage.json        the stage's summary, written last: the stage is finished
        metrics.jsonl                one record per step (train/..., perf/..., val/...)
        recipe_resolved.json         the resolved recipe
"""

from __future__ import annotations

import os

from kiln.config import read_json
from kiln.formats.hashing import content_sha256

CHECKPOINTS_DIR, FINAL_DIR = "checkpoints", "final"
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_META = "kiln_checkpoint.json"  # written last into a checkpoint: it marks it complete
MANIFEST_KEY = "files"  # in CHECKPOINT_META: {relative path: {"bytes": size, "sha256": hex}} of every other file
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index, which DCP reads with pickle
STAGE_SUMMARY = "kiln_stage.json"  # written last into final/: it marks the stage finished
METRICS_FILE, RESOLVED_RECIPE = "metrics.jsonl", "recipe_resolved.json"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def rng_file(rank: int) -> str:
    """A rank's random number generator states: tensors and plain numbers, read with
    torch.load(weights_only=True)."""
    return f"rng-rank{rank}.pt"


def checkpoint_manifest(checkpoint_dir: str) -> dict:
    """Every file under `checkpoint_dir` but the marker, with its size and sha256: what
    the marker records when the checkpoint is complete."""
    files = {}
    for parent, _dirs, names in os.walk(checkpoint_dir):
        for name in names:
            path = os.path.join(parent, name)
            rel = os.path.relpath(path, checkpoint_dir)
            if rel != CHECKPOINT_META:
                files[rel] = {"bytes": os.path.getsize(path), "sha256": content_sha256(path)}
    return dict(sorted(files.items()))


def manifest_problem(checkpoint_dir: str, manifest: dict, hashes: bool = True) -> str | None:
    """The first file of `manifest` that `checkpoint_dir` does not hold as listed (missing,
    another size, or, with `hashes`, other bytes), described; None if all match. Sizes
    are checked for every file before any is read: a truncated file is found at the cost
    of a stat. Files the manifest does not list are never read by DCP, so they are not
    checked."""
    for rel, entry in manifest.items():
        path = os.path.join(checkpoint_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            return f"{rel} is {size} bytes, the manifest says {entry['bytes']}"
    if hashes:
        for rel, entry in manifest.items():
            if content_sha256(os.path.join(checkpoint_dir, rel)) != entry["sha256"]:
                return f"{rel} does not match its sha256 in the manifest"
    return None


def read_checkpoint_meta(checkpoint_dir: str) -> dict:
    """A checkpoint's kiln_checkpoint.json: step, world size, tokens, scheduler and sampler state, config."""
    return read_json(os.path.join(checkpoint_dir, CHECKPOINT_META), "checkpoint metadata")


def read_stage_summary(final_dir: str) -> dict:
    """An exported stage's kiln_stage.json: stage, steps, tokens, final loss, ..."""
    return read_json(os.path.join(final_dir, STAGE_SUMMARY), "stage summary")
