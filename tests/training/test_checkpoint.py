"""Checkpoints on a tiny model: the file manifest, what a damaged checkpoint does, RNG
state that loads without pickle, and crafted files that must never run.

The kill-and-resume behaviour of the whole trainer (falling back to the previous
checkpoint, metrics.jsonl after a resume) is tested in test_train.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.config import ConfigError
from kiln.training import checkpoint
from kiln.training.distributed import World

MARKER = "kiln_checkpoint.json"


class MakeDirectory:
    """A pickle payload: unpickling it creates a directory (what crafted code could do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save_two(root: Path) -> tuple[Path, Path]:
    model, optimizer = tiny()
    first = checkpoint.save(str(root), 5, model, optimizer, {"tokens": 50}, World())
    second = checkpoint.save(str(root), 10, model, optimizer, {"tokens": 100}, World())
    return Path(first), Path(second)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reseal(ckpt: Path) -> None:
    """Recompute the manifest in the marker from the files as they are now: what a
    checkpoint written with these files would hold."""
    meta = json.loads((ckpt / MARKER).read_text())
    meta["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
                     for p in sorted(ckpt.iterdir()) if p.name != MARKER}
    (ckpt / MARKER).write_text(json.dumps(meta))


def test_a_checkpoint_lists_every_file_with_its_size_and_sha256(tmp_path):
    _, ckpt = save_two(tmp_path)
    meta = json.loads((ckpt / MARKER).read_text())
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", MARKER, "rng-rank0.pt"]
    assert meta["files"] == {name: {"bytes": (ckpt / name).stat().st_size, "sha256": sha256(ckpt / name)}
                             for name in (".metadata", "__0_0.distcp", "rng-rank0.pt")}
    assert (meta["step"], meta["tokens"], meta["world_size"]) == (10, 100, 1)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {  # what is done to one file of the newest checkpoint, and how its first bad file is reported
    "truncated distcp": ("__0_0.distcp", truncate, "__0_0.distcp is {size} bytes, the manifest says {listed}"),
    "deleted distcp": ("__0_0.distcp", Path.unlink, "__0_0.distcp is missing"),
    "truncated rng": ("rng-rank0.pt", truncate, "rng-rank0.pt is {size} bytes, the manifest says {listed}"),
    "flipped byte": ("__0_0.distcp", flip_last_byte, "__0_0.distcp does not match its sha256 in the manifest"),
}


def damage_file(ckpt: Path, damage: str) -> str:
    """Apply `damage` to the checkpoint; returns the problem it must be reported with."""
    name, act, problem = DAMAGES[damage]
    listed = (ckpt / name).stat().st_size  # what the manifest lists (see the first test)
    act(ckpt / name)
    size = (ckpt / name).stat().st_size if (ckpt / name).exists() else None
    return problem.format(size=size, listed=listed)


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_skipped_with_its_first_bad_file(tmp_path, damage):
    first, second = save_two(tmp_path)
    problem = damage_file(second, damage)
    logged = []
    assert checkpoint.latest(str(tmp_path), logged.append) == str(first)
    assert logged == [f"warning: {second}: damaged checkpoint ({problem}), skipped"]
    model, optimizer = tiny()
    with pytest.raises(ConfigError, match=re.escape(f"{second}: damaged checkpoint ({problem})") + "$"):
        checkpoint.load(str(second), model, optimizer, World())
    if damage != "flipped byte":  # a size differs: seen without reading the files
        logged.clear()
        assert checkpoint.complete_checkpoints(str(tmp_path), logged.append) == [str(first)]
        assert logged == [f"warning: {second}: damaged checkpoint ({problem}), skipped"]


def test_a_checkpoint_without_a_manifest_is_not_loaded(tmp_path):
    first, second = save_two(tmp_path)
    meta = json.loads((second / MARKER).read_text())
    del meta["files"]
    (second / MARKER).write_text(json.dumps(meta))
    logged = []
    assert checkpoint.latest(str(tmp_path), logged.append) == str(first)
    assert logged == [f"warning: {second}: no file manifest in {MARKER} (written before kiln checked its "
                      "checkpoints), skipped"]


def test_rng_state_is_saved_as_tensors_and_restored_exactly(tmp_path):
    model, optimizer = tiny()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(2)  # a cached Gaussian in numpy's state, too
    ckpt = checkpoint.save(str(tmp_path), 1, model, optimizer, {"tokens": 1}, World())
    expected = random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    stored = torch.load(os.path.join(ckpt, "rng-rank0.pt"), weights_only=True)  # no pickle of arbitrary objects
    assert sorted(stored) == ["cuda", "format", "numpy", "python", "torch"]
    checkpoint.load(ckpt, model, optimizer, World())
    assert (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist()) == expected


def test_a_crafted_rng_file_is_refused_without_running_it(tmp_path):
    _, second = save_two(tmp_path)
    ran = tmp_path / "payload-ran"
    torch.save(MakeDirectory(ran), second / "rng-rank0.pt")
    reseal(second)  # a valid manifest: the crafted file reaches the load
    model, optimizer = tiny()
    message = (f"{second / 'rng-rank0.pt'}: not a kiln RNG state (tensors and plain data only; "
               "torch.load with weights_only=True refused it)")
    with pytest.raises(ConfigError, match=re.escape(message) + "$"):
        checkpoint.load(str(second), model, optimizer, World())
    assert not ran.exists()


def test_a_metadata_file_changed_after_the_save_is_never_unpickled(tmp_path):
    first, second = save_two(tmp_path)
    ran = tmp_path / "payload-ran"
    listed = (second / ".metadata").stat().st_size
    (second / ".metadata").write_bytes(pickle.dumps(MakeDirectory(ran)))
    size = (second / ".metadata").stat().st_size
    logged = []
    assert checkpoint.latest(str(tmp_path), logged.append) == str(first)
    assert logged == [f"warning: {second}: damaged checkpoint (.metadata is {size} bytes, the manifest says "
                      f"{listed}), skipped"]
    model, optimizer = tiny()
    with pytest.raises(ConfigError, match=re.escape(f"{second}: damaged checkpoint (.metadata is {size} bytes")):
        checkpoint.load(str(second), model, optimizer, World())
    with pytest.raises(ConfigError, match=re.escape(f"{second}: damaged checkpoint (.metadata is {size} bytes")):
        checkpoint.average([str(first), str(second)], model, World())
    assert not ran.exists()
