"""Training checkpoints (DESIGN.md contract 8, names in kiln.formats.checkpoint) with
torch.distributed.checkpoint.

A checkpoint is a directory `step-00000120/` holding the DCP shards of the model and
optimizer (each rank writes its own part; any world size can load them), one
`rng-rank<r>.pt` per rank, and `kiln_checkpoint.json`: step, tokens seen, the
scheduler's and the data sampler's state, the resolved config, and a manifest of every
other file's size and sha256. It is written under a hidden temporary name and renamed
once every rank has finished, so a directory named `step-*` with its marker file is
complete as written.

Files can still change afterwards (a disk fills, a copy is cut short, someone edits
one), and two of them are read with pickle by whoever loads them: DCP's `.metadata`
always, and a `.pt` file unless it is loaded with `weights_only`. So nothing here
hands a checkpoint to DCP before its files match the manifest, and the RNG files hold
tensors and plain numbers only, read with `weights_only=True`. `complete_checkpoints`
compares sizes (a stat per file); `latest` and every load also compare the sha256 of
each file. A checkpoint that fails is reported with its first bad file and skipped,
and a resume uses the newest one that passes. (The manifest finds damage, not a
forger: whoever can rewrite the files can rewrite the manifest.)
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import sys
import warnings

import numpy as np
import torch

from kiln.config import ConfigError
from kiln.formats.checkpoint import (CHECKPOINT_META, CHECKPOINT_PREFIX, DCP_METADATA, MANIFEST_KEY,
                                    checkpoint_manifest, checkpoint_name, manifest_problem, read_checkpoint_meta,
                                    rng_file)
from kiln.training.distributed import World, barrier

RNG_FORMAT = "kiln-rng-v1"


@contextlib.contextmanager
def _quiet():
    """A single process saves and loads without a process group on purpose; DCP warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _model_and_optim_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save(root: str, step: int, model, optimizer, meta: dict, world: World, keep: int = 0) -> str:
    """Write checkpoint `step` under `root`; returns its path. `meta` must be JSON data."""
    import torch.distributed.checkpoint as dcp

    final = os.path.join(root, checkpoint_name(step))
    tmp = os.path.join(root, f".{checkpoint_name(step)}.tmp")
    if world.main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        os.makedirs(tmp)
    barrier(world)
    with _quiet():
        dcp.save(_model_and_optim_state(model, optimizer), checkpoint_id=tmp)
    torch.save(rng_state(), os.path.join(tmp, rng_file(world.rank)))
    barrier(world)
    if world.main:
        marker = {"step": step, "world_size": world.size, **meta, MANIFEST_KEY: checkpoint_manifest(tmp)}
        with open(os.path.join(tmp, CHECKPOINT_META), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2, default=str)
        os.rename(tmp, final)
        if keep:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def complete_checkpoints(root: str, log=_log) -> list[str]:
    """Complete checkpoints under `root`, oldest first: with their marker, and every file
    the manifest lists present at its size. Partial and damaged ones are reported."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(f".{CHECKPOINT_PREFIX}") and name.endswith(".tmp"):
            log(f"warning: {path}: partial checkpoint (interrupted while writing), skipped")
            continue
        if not name.startswith(CHECKPOINT_PREFIX) or not os.path.isdir(path):
            continue
        if not os.path.exists(os.path.join(path, CHECKPOINT_META)) or not os.path.exists(os.path.join(path, DCP_METADATA)):
            log(f"warning: {path}: incomplete checkpoint (no {CHECKPOINT_META} or DCP {DCP_METADATA}), skipped")
            continue
        try:
            meta = read_checkpoint_meta(path)
        except ConfigError:
            log(f"warning: {path}: unreadable {CHECKPOINT_META}, skipped")
            continue
        problem = _check_files(path, meta, hashes=False)
        if problem:
            log(f"warning: {path}: {problem}, skipped")
            continue
        out.append(path)
    return out


def latest(root: str, log=_log) -> str | None:
    """The newest complete checkpoint whose files also match the manifest's sha256; a
    newer one that does not is reported and passed over."""
    for path in reversed(complete_checkpoints(root, log)):
        problem = _check_files(path, read_checkpoint_meta(path), hashes=True)
        if not problem:
            return path
        log(f"warning: {path}: {problem}, skipped")
    return None


def _check_files(path: str, meta: dict, hashes: bool) -> str | None:
    """Why the checkpoint at `path` must not be loaded, or None."""
    manifest = meta.get(MANIFEST_KEY)
    if manifest is None:
        return f"no file manifest in {CHECKPOINT_META} (written before kiln checked its checkpoints)"
    if not isinstance(manifest, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in manifest.values()):
        return f"unreadable file manifest in {CHECKPOINT_META}"
    problem = manifest_problem(path, manifest, hashes=hashes)
    return f"damaged checkpoint ({problem})" if problem else None


def _verified(path: str) -> dict:
    """The checkpoint's metadata, once every file matches the manifest: the one way in to
    DCP, which unpickles `.metadata`."""
    meta = read_checkpoint_meta(path)
    problem = _check_files(path, meta, hashes=True)
    if problem:
        raise ConfigError(f"{path}: {problem}")
    return meta


def _dcp_load(state: dict, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet():
            dcp.load(state, checkpoint_id=path)
    # DCP raises several kinds for a mismatched checkpoint; CheckpointException, which
    # carries each rank's failure, derives from BaseException, not Exception.
    except (Exception, CheckpointException) as e:
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        raise ConfigError(f"{path}: cannot load checkpoint: {_first_line(cause)}") from e


def load(path: str, model, optimizer, world: World, expected_model: dict | None = None) -> dict:
    """Restore model and optimizer (and this rank's RNG) from `path`; returns the meta.
    A checkpoint whose files do not match its manifest, or of another model shape, fails
    here (naming the first bad file, or the first differing field) before DCP reads it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    meta = _verified(path)
    saved_model = (meta.get("config") or {}).get("model")
    if expected_model is not None and saved_model is not None:
        for key, value in expected_model.items():
            # A checkpoint from before a field existed (family, head_dim, ...) lacks it;
            # DCP's load still refuses tensors of another shape.
            if key in ("preset",) or key not in saved_model:
                continue
            if saved_model.get(key) != value:
                raise ConfigError(f"{path}: checkpoint of another model shape: {key} = {saved_model.get(key)!r}, "
                                  f"the recipe's model has {value!r}")
    rng = None
    if meta.get("world_size") == world.size and os.path.exists(os.path.join(path, rng_file(world.rank))):
        rng = read_rng_state(os.path.join(path, rng_file(world.rank)))
    state = _model_and_optim_state(model, optimizer)
    _dcp_load(state, path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    if rng is not None:
        set_rng_state(rng)
    return meta


def rng_state() -> dict:
    """This process's random states (Python's, numpy's, torch's CPU and CUDA) as tensors
    and plain numbers, which torch.load(weights_only=True) reads back without pickle's
    arbitrary objects."""
    version, words, gauss_next = random.getstate()
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {"format": RNG_FORMAT,
            "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
            "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []}


def read_rng_state(path: str) -> dict:
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: not a kiln RNG state (tensors and plain data only; torch.load with "
                          "weights_only=True refused it)") from e
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ... for a damaged file
        raise ConfigError(f"{path}: unreadable RNG state: {_first_line(e)}") from e
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        raise ConfigError(f"{path}: not a {RNG_FORMAT} RNG state")
    return state


def set_rng_state(state: dict) -> None:
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    np.random.set_state((numpy_state["kind"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def average(paths: list[str], model, world: World) -> None:
    """Load the uniform average of the model weights in `paths` into `model` (Llama 3's
    annealing ends with an average of its last checkpoints; Polyak averaging)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    for path in paths:
        _verified(path)
    total = None
    for path in paths:
        state = {"model": get_model_state_dict(model)}
        _dcp_load(state, path)
        weights = state["model"]
        if total is None:
            total = {k: v.detach().clone().float() for k, v in weights.items()}
        else:
            for k, v in weights.items():
                total[k] += v.float()
    current = get_model_state_dict(model)
    averaged = {k: (total[k] / len(paths)).to(current[k].dtype) for k in current}
    set_model_state_dict(model, averaged)
