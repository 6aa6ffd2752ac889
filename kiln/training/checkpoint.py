"""Training checkpoints (DESIGN.md contract 8, names in kiln.formats.checkpoint) with
torch.distributed.checkpoint.

A checkpoint is a directory `step-00000120/` holding the DCP shards of the model and
optimizer (each rank writes its own part; any world size can load them), one
`rng-rank<r>.pt` per rank, and `kiln_checkpoint.json`: step, tokens seen, the
scheduler's and the data sampler's state, and the resolved config. It is written
under a hidden temporary name and renamed once every rank has finished, so a
directory named `step-*` with its marker file is always complete; `latest()` skips
anything else with a warning and resumes from the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import warnings

import numpy as np
import torch

from kiln.config import ConfigError
from kiln.formats.checkpoint import CHECKPOINT_META, CHECKPOINT_PREFIX, checkpoint_name, read_checkpoint_meta
from kiln.training.distributed import World, barrier


@contextlib.contextmanager
def _quiet():
    """A single process saves and loads without a process group on purpose; DCP warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)



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
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{world.rank}.pt"))
    barrier(world)
    if world.main:
        with open(os.path.join(tmp, CHECKPOINT_META), "w", encoding="utf-8") as f:
            json.dump({"step": step, "world_size": world.size, **meta}, f, indent=2, default=str)
        os.rename(tmp, final)
        if keep:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def complete_checkpoints(root: str, log=_log) -> list[str]:
    """Complete checkpoints under `root`, oldest first; partial ones are reported."""
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
        if not os.path.exists(os.path.join(path, CHECKPOINT_META)) or not os.path.exists(os.path.join(path, ".metadata")):
            log(f"warning: {path}: incomplete checkpoint (no {CHECKPOINT_META} or DCP .metadata), skipped")
            continue
        try:
            with open(os.path.join(path, CHECKPOINT_META), encoding="utf-8") as f:
                json.load(f)
        except ValueError:
            log(f"warning: {path}: unreadable {CHECKPOINT_META}, skipped")
            continue
        out.append(path)
    return out


def latest(root: str, log=_log) -> str | None:
    found = complete_checkpoints(root, log)
    return found[-1] if found else None


def load(path: str, model, optimizer, world: World, expected_model: dict | None = None) -> dict:
    """Restore model and optimizer (and this rank's RNG) from `path`; returns the meta.
    A checkpoint of another model shape fails here, naming the first differing field."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    meta = read_checkpoint_meta(path)
    saved_model = (meta.get("config") or {}).get("model")
    if expected_model is not None and saved_model is not None:
        for key, value in expected_model.items():
            if key in ("preset",):
                continue
            if saved_model.get(key) != value:
                raise ConfigError(f"{path}: checkpoint of another model shape: {key} = {saved_model.get(key)!r}, "
                                  f"the recipe's model has {value!r}")
    state = _model_and_optim_state(model, optimizer)
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=path)
    except Exception as e:  # noqa: BLE001 - DCP raises several kinds for a mismatched or damaged checkpoint
        raise ConfigError(f"{path}: cannot load checkpoint: {str(e).splitlines()[0][:300]}") from e
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    rng_file = os.path.join(path, f"rng-rank{world.rank}.pt")
    if os.path.exists(rng_file) and meta.get("world_size") == world.size:
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def average(paths: list[str], model, world: World) -> None:
    """Load the uniform average of the model weights in `paths` into `model` (Llama 3's
    annealing ends with an average of its last checkpoints; Polyak averaging)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    total = None
    for path in paths:
        state = {"model": get_model_state_dict(model)}
        with _quiet():
            dcp.load(state, checkpoint_id=path)
        weights = state["model"]
        if total is None:
            total = {k: v.detach().clone().float() for k, v in weights.items()}
        else:
            for k, v in weights.items():
                total[k] += v.float()
    current = get_model_state_dict(model)
    averaged = {k: (total[k] / len(paths)).to(current[k].dtype) for k in current}
    set_model_state_dict(model, averaged)
