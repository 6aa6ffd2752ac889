"""Average exported Hugging Face models, uniformly or with weights.

Llama 3 averages models from experiments with different data or hyperparameters
(and its annealing runs' last checkpoints); "model soups" showed why it works:
fine-tunes of one base stay in one basin, where the mean of the weights is itself a
good model. `kiln.training.checkpoint.average` averages a run's own DCP checkpoints;
this averages finished model directories, which may come from different runs.

Weights are read only from safetensors files, never from pickle (`pytorch_model.bin`),
one tensor at a time from every input, so memory holds the averaged model and one
tensor per input, whatever the number of inputs. The mean is taken in float64 and
rounded once to each tensor's own dtype: the result is the correctly rounded weighted
mean, and averaging identical models gives them back bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

from kiln.config import ConfigError, read_json
from kiln.formats.hashing import content_sha256

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUMMARY_FILE = "kiln_average.json"
SUMMARY_FORMAT = "kiln-average-v1"
# Copied from the first model: its config (the inputs' are checked equal), generation
# defaults and tokenizer.
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")
# config.json keys that record who wrote the file and how, not what the model is.
IGNORED_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype"})


def weight_files(model_dir: str) -> list[str]:
    """The safetensors files of a model directory: `model.safetensors`, or the shards its
    index names."""
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(model_dir, INDEX_FILE)
    if not os.path.isfile(index):
        pickled = os.path.exists(os.path.join(model_dir, "pytorch_model.bin"))
        raise ConfigError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}"
                          + (" (only pytorch_model.bin, which kiln does not unpickle)" if pickled else ""))
    weight_map = read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(f"{index}: no weight_map")
    files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    for path in files:
        if not os.path.isfile(path):
            raise ConfigError(f"{index}: names {os.path.basename(path)}, which is missing")
    return files


def _architecture(model_dir: str) -> dict:
    config = read_json(os.path.join(model_dir, "config.json"), "config.json")
    return {k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS}


def _tensor_headers(model_dir: str, files: list[str]) -> dict[str, tuple[list[int], str]]:
    """{tensor name: (shape, safetensors dtype)} from the files' headers, no tensor read."""
    from safetensors import safe_open

    out: dict[str, tuple[list[int], str]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in out:
                        raise ConfigError(f"{model_dir}: tensor {name} is in two weight files")
                    piece = f.get_slice(name)
                    out[name] = (list(piece.get_shape()), piece.get_dtype())
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged header
            raise ConfigError(f"{path}: unreadable safetensors file: {e}") from e
    return out


def _check_same(first: str, first_value: dict, other: str, other_value: dict, what: str, show=repr) -> None:
    """ConfigError naming `other` and the first key where its `what` differs from `first`'s."""
    for key in sorted(set(first_value) | set(other_value)):
        if key not in other_value:
            raise ConfigError(f"{other}: has no {what} {key} (which {first} has)")
        if key not in first_value:
            raise ConfigError(f"{other}: has {what} {key}, which {first} does not")
        if other_value[key] != first_value[key]:
            raise ConfigError(f"{other}: {what} {key} differs from {first}'s: "
                              f"{show(other_value[key])} vs {show(first_value[key])}")


def _show_header(header: tuple[list[int], str]) -> str:
    shape, dtype = header
    return f"shape {shape} {dtype}"


def normalised_weights(weights: list[float] | None, n: int) -> list[float]:
    """Uniform when None; otherwise positive, finite, one per model, scaled to sum to 1."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ConfigError(f"--weights: {len(weights)} weights for {n} models")
    for w in weights:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise ConfigError(f"--weights: {w!r} is not a positive finite number")
    total = math.fsum(weights)
    return [w / total for w in weights]


def _check_out_dir(out_dir: str, model_dirs: list[str]) -> None:
    out = Path(out_dir).resolve()
    for d in model_dirs:
        if Path(d).resolve().is_relative_to(out):
            raise ConfigError(f"--out {out_dir}: is (or holds) the input {d}; write the average elsewhere")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out_dir}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / SUMMARY_FILE).is_file():
        raise ConfigError(f"--out {out_dir}: not empty and not a previous kiln average (no {SUMMARY_FILE})")


def _average_tensor(name: str, readers: list, weights: list[float], model_dirs: list[str]) -> torch.Tensor:
    tensors = [reader.get_tensor(name) for reader in readers]
    if not tensors[0].is_floating_point():  # integer buffers have no mean: they must agree
        for d, t in zip(model_dirs[1:], tensors[1:]):
            if not torch.equal(t, tensors[0]):
                raise ConfigError(f"{d}: integer tensor {name} differs from {model_dirs[0]}'s; it cannot be averaged")
        return tensors[0].clone()
    total = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for w, t in zip(weights, tensors):
        total += w * t.double()
    return total.to(tensors[0].dtype)


def average_models(model_dirs: list[str], out_dir: str, weights: list[float] | None = None, log=print) -> dict:
    """Write the weighted mean of the models in `model_dirs` to `out_dir`, a Hugging Face
    model directory (config, generation config and tokenizer of the first model,
    `model.safetensors`, and `kiln_average.json`, which is returned).

    The models must have the same config.json (but for who wrote it and its dtype) and
    the same tensor names, shapes and dtypes; any architecture (causal LMs, reward models
    with a `score` head) averages name by name. `out_dir` is written whole under a
    temporary name and renamed at the end; it may replace a previous average only."""
    if len(model_dirs) < 2:
        raise ConfigError(f"averaging needs at least two models, got {len(model_dirs)}")
    weights = normalised_weights(weights, len(model_dirs))
    _check_out_dir(out_dir, model_dirs)
    first = model_dirs[0]
    files = {d: weight_files(d) for d in model_dirs}
    config, headers = _architecture(first), _tensor_headers(first, files[first])
    for d in model_dirs[1:]:
        _check_same(first, config, d, _architecture(d), "config.json key")
        _check_same(first, headers, d, _tensor_headers(d, files[d]), "tensor", show=_show_header)

    summary = {"format": SUMMARY_FORMAT,
               "models": [{"path": d, "weight": w,
                           "weights_sha256": {os.path.basename(f): content_sha256(f) for f in files[d]}}
                          for d, w in zip(model_dirs, weights)],
               "tensors": len(headers),
               "parameters": sum(math.prod(shape) for shape, _dtype in headers.values())}
    log(f"averaging {len(model_dirs)} models into {out_dir}:")
    for d, w in zip(model_dirs, weights):
        log(f"  {w:.4f} x {d}")

    averaged = {}
    with contextlib.ExitStack() as stack:
        readers = _readers(files, stack)
        for name in sorted(headers):
            averaged[name] = _average_tensor(name, [r[name] for r in readers], weights, model_dirs)
    _write(out_dir, first, averaged, summary)
    log(f"wrote {out_dir}: {summary['parameters']:,} parameters in {summary['tensors']} tensors")
    return summary


def _readers(files: dict[str, list[str]], stack: contextlib.ExitStack) -> list[dict]:
    """Per model, {tensor name: the open safetensors file holding it}."""
    from safetensors import safe_open

    readers = []
    for paths in files.values():
        by_name = {}
        for path in paths:
            f = stack.enter_context(safe_open(path, framework="pt"))
            by_name.update(dict.fromkeys(f.keys(), f))
        readers.append(by_name)
    return readers


def _write(out_dir: str, first: str, tensors: dict[str, torch.Tensor], summary: dict) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.parent / f".{out.name}.tmp", out.parent / f".{out.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in COPIED_FILES:
        src = os.path.join(first, name)
        if os.path.isfile(src):
            shutil.copyfile(src, tmp / name)
    save_file(tensors, str(tmp / SINGLE_FILE), metadata={"format": "pt"})  # transformers requires "format"
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    # A previous average is moved aside, not deleted, until the new one is in place.
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
