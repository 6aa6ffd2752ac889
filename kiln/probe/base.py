"""The model a probe anneals, and the LR the anneal starts from.

A base is one of:
- an exported stage, `NN_<stage>/final/` (a Hugging Face directory with safetensors),
  or any Hugging Face directory with safetensors weights and a tokenizer.json;
- a checkpoint, `NN_<stage>/checkpoints/step-N/` of `kiln train`: its files are checked
  against their manifest, the weights loaded and exported once to `OUTPUT/base/<digest>/`,
  so the arms start from safetensors like any `[run] init`;
- `base_recipe`: a training recipe run first (up to `base_stage`; finished stages are
  reused, so a rerun trains nothing), whose stage export or checkpoint `base_step` is
  the base.

The LR: Llama 3 anneals from where the base's schedule stood, linearly to 0. kiln reads
it from the base's own record (a checkpoint's resolved stage config and token count; an
export's `recipe_resolved.json` and `kiln_stage.json`) rather than trusting a config
value that may not match the checkpoint; `[probe] lr` overrides it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

from kiln.config import ConfigError, from_dict, read_json
from kiln.formats.checkpoint import (
    CHECKPOINT_META,
    MANIFEST_KEY,
    RESOLVED_RECIPE,
    STAGE_SUMMARY,
    checkpoint_name,
    read_checkpoint_meta,
)
from kiln.formats.hashing import content_sha256
from kiln.training.data import TOKENIZER_FILE
from kiln.training.model import ModelConfig, config_of
from kiln.training.recipe import OptimizerConfig, StageConfig, lr_at

BASE_DIR = "base"  # OUTPUT/base/<digest>/: a checkpoint base, exported
BASE_INFO = "kiln_probe_base.json"  # written last into that export: where it came from, its LR


@dataclass
class Base:
    model_dir: str  # Hugging Face directory (safetensors) every arm starts from
    tokenizer_dir: str  # the directory holding its tokenizer.json
    lr: float  # the LR every anneal starts from
    lr_source: str  # where that LR came from, for the log
    model: ModelConfig  # the base's architecture
    optimizer: OptimizerConfig  # the base run's AdamW settings (defaults when unknown)
    digest: str  # sha256 of the weights and config: part of every arm's key
    described: str  # what the base is, for the log and verdict.json


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CHECKPOINT_META))


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        name.endswith(".safetensors") for name in os.listdir(path))


def describe_base(path: str) -> str:
    """Fails unless `path` is an export or a checkpoint; returns which."""
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: base not found (an exported stage's final/ directory or a checkpoints/step-N "
                          "directory of kiln train)")
    if is_checkpoint(path):
        return "checkpoint"
    if is_export(path):
        return "export"
    raise ConfigError(f"{path}: not a model export (config.json and *.safetensors) nor a kiln checkpoint "
                      f"({CHECKPOINT_META})")


def tokenizer_of(path: str, kind: str, override: str = "") -> str:
    """The tokenizer directory of a base: `override`, else the export's own
    tokenizer.json, else the checkpoint run's `[run] tokenizer`. A base without one fails:
    candidates are tokenized with it, and bits per byte decode with it."""
    if override:
        directory = override if os.path.isdir(override) else os.path.dirname(override)
        where = f"[probe] tokenizer {override}"
    elif kind == "export":
        directory, where = path, f"base {path}"
    else:
        run = (read_checkpoint_meta(path).get("config") or {}).get("run") or {}
        tok = run.get("tokenizer", "")
        directory = tok if os.path.isdir(tok) or not tok else os.path.dirname(tok)
        where = f"base {path} (its run's [run] tokenizer {tok or 'is not set'})"
    if not directory or not os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
        raise ConfigError(f"{where}: no {TOKENIZER_FILE}; a base needs its tokenizer (candidates are tokenized and "
                          "bits per byte decoded with it): export it with [run] tokenizer set, or give [probe] "
                          "tokenizer")
    return directory


def resolve(path: str, out_dir: str, lr: float = 0.0, tokenizer: str = "", log=print) -> Base:
    """The Base at `path` (an export or a checkpoint, see the module docstring)."""
    kind = describe_base(path)
    tokenizer_dir = tokenizer_of(path, kind, tokenizer)
    if kind == "checkpoint":
        return _from_checkpoint(path, out_dir, lr, tokenizer_dir, log)
    return _from_export(path, lr, tokenizer_dir)


def _from_export(path: str, lr: float, tokenizer_dir: str) -> Base:
    from transformers import AutoConfig

    try:
        model = config_of(AutoConfig.from_pretrained(path))
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}/config.json: not a model config of a family kiln trains "
                          f"({str(e).splitlines()[0][:200]})") from e
    stage_root = os.path.dirname(os.path.abspath(path))
    resolved = _read_optional(os.path.join(stage_root, RESOLVED_RECIPE))
    summary = _read_optional(os.path.join(path, STAGE_SUMMARY))
    found = None
    if resolved and summary and "stage" in resolved:
        stage = from_dict(StageConfig, resolved["stage"], f"{stage_root}/{RESOLVED_RECIPE}: stage")
        found = (lr_at(stage, summary["tokens"]),
                 f"{stage.schedule} schedule of stage {stage.name!r} at its end ({summary['tokens']:,} tokens)")
    optimizer = _optimizer(resolved)
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors") or n == "config.json")
    digest = _digest({n: content_sha256(os.path.join(path, n)) for n in files})
    start_lr, source = _start_lr(path, lr, found)
    return Base(model_dir=path, tokenizer_dir=tokenizer_dir, lr=start_lr, lr_source=source, model=model,
                optimizer=optimizer, digest=digest, described=f"export {path}")


def _from_checkpoint(path: str, out_dir: str, lr: float, tokenizer_dir: str, log) -> Base:
    meta = read_checkpoint_meta(path)
    config = meta.get("config") or {}
    if "model" not in config or "stage" not in config:
        raise ConfigError(f"{path}/{CHECKPOINT_META}: no resolved model and stage config; not a kiln train checkpoint")
    model = from_dict(ModelConfig, config["model"], f"{path}: model")
    stage = from_dict(StageConfig, config["stage"], f"{path}: stage")
    where = (f"checkpoint {os.path.basename(path)}: {stage.schedule} schedule of stage {stage.name!r} at "
             f"{meta['tokens']:,} of {stage.tokens:,} tokens")
    found = (lr_at(stage, meta["tokens"]), where)
    start_lr, source = _start_lr(path, lr, found)
    digest = _digest(meta.get(MANIFEST_KEY) or {})
    export = os.path.join(out_dir, BASE_DIR, digest[:16])
    if not os.path.isfile(os.path.join(export, BASE_INFO)):
        _export_checkpoint(path, model, export, tokenizer_dir, log)
    return Base(model_dir=export, tokenizer_dir=tokenizer_dir, lr=start_lr, lr_source=source, model=model,
                optimizer=_optimizer(config), digest=digest, described=f"checkpoint {path}")


def _export_checkpoint(path: str, model_cfg: ModelConfig, export: str, tokenizer_dir: str, log) -> None:
    """Load the checkpoint's model (files checked against the manifest first) and write
    it as a Hugging Face directory, atomically."""
    from kiln.training import checkpoint
    from kiln.training.distributed import World
    from kiln.training.model import CausalLM, build_model, save_hf

    log(f"[probe] exporting the base checkpoint {path} to {export}")
    model = CausalLM(build_model(model_cfg))
    checkpoint.load(path, model, None, World(), expected_model=dataclasses.asdict(model_cfg))
    tmp = f"{export}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model.hf, tmp, tokenizer_dir)
    with open(os.path.join(tmp, BASE_INFO), "w", encoding="utf-8") as f:
        json.dump({"checkpoint": os.path.abspath(path)}, f, indent=2)
    shutil.rmtree(export, ignore_errors=True)
    os.replace(tmp, export)


def train_base_recipe(recipe_path: str, stage_name: str, step: int, log=print, train_options=None) -> str | None:
    """Run `recipe_path` up to `stage_name` (finished stages are reused, an unfinished
    one resumes) and return the path of that stage's export, or of its checkpoint at
    `step`: the base. None if the run was stopped (train_options.stop_after_steps)
    before it got there. Every rank of a torchrun world calls it."""
    from kiln.training import recipe as recipes
    from kiln.training.train import stage_paths, train

    recipe = recipes.load(recipe_path)
    i = stage_index(recipe, stage_name, recipe_path)
    head = dataclasses.replace(recipe, stages=recipe.stages[:i + 1])
    log(f"[probe] base: {recipe_path} up to stage {recipe.stages[i].name!r} (finished stages are reused)")
    summaries = train(head, train_options)
    if len(summaries) <= i:
        return None
    paths = stage_paths(head, i)
    if not step:
        return paths.final
    path = os.path.join(paths.checkpoints, checkpoint_name(step))
    if not is_checkpoint(path):
        kept = sorted(n for n in os.listdir(paths.checkpoints) if n.startswith("step-")) \
            if os.path.isdir(paths.checkpoints) else []
        raise ConfigError(f"{recipe_path}: stage {recipe.stages[i].name!r} has no checkpoint at step {step} "
                          f"(it has {', '.join(kept) or 'none'}): set its checkpoint_every so one lands there, "
                          "and keep_checkpoints = 0")
    return path


def stage_index(recipe, stage_name: str, where: str) -> int:
    names = [s.name for s in recipe.stages]
    if not stage_name:
        return len(names) - 1
    if stage_name not in names:
        raise ConfigError(f"{where}: no stage {stage_name!r} for base_stage (stages: {', '.join(names)})")
    return names.index(stage_name)


def _start_lr(path: str, lr: float, found: tuple[float, str] | None) -> tuple[float, str]:
    if lr > 0:
        return lr, "[probe] lr" + (f" (the base's own: {found[0]:.3g}, {found[1]})" if found else "")
    if found is None:
        raise ConfigError(f"{path}: no record of the LR the base stopped at (not a kiln train export with its "
                          f"{RESOLVED_RECIPE} and {STAGE_SUMMARY}); set [probe] lr")
    if found[0] <= 0:
        raise ConfigError(f"{path}: the base's LR where it stopped is 0 ({found[1]}): its schedule had ended; anneal "
                          "a checkpoint from before the end, or set [probe] lr")
    return found[0], found[1]


def _optimizer(config: dict | None) -> OptimizerConfig:
    if config and "optimizer" in config:
        return from_dict(OptimizerConfig, config["optimizer"], "the base's optimizer config")
    return OptimizerConfig()


def _read_optional(path: str) -> dict | None:
    return read_json(path, "metadata") if os.path.isfile(path) else None


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def recipe_tokenizer(recipe_path: str, override: str = "") -> str:
    """The tokenizer a base_recipe's exports will carry, known before it trains."""
    from kiln.training import recipe as recipes

    if override:
        return tokenizer_of("", "export", override)
    tok = recipes.load(recipe_path).run.tokenizer
    directory = tok if os.path.isdir(tok) or not tok else os.path.dirname(tok)
    if not directory or not os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
        raise ConfigError(f"{recipe_path}: [run] tokenizer {tok or 'is not set'}: a probe's base needs its tokenizer "
                          f"({TOKENIZER_FILE}); set it in the recipe or give [probe] tokenizer")
    return directory

