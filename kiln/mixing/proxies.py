"""Training the planned proxy runs: `kiln mix run PLAN.csv`.

Each row of a design plan (`run`, `w_<domain>` columns) becomes one small training
run of kiln's trainer on the token shards, with that mixture: same tiny model, same
token budget, same seed, so the runs differ only in their data. After each run the
runs table (DESIGN.md contract 5) is rewritten with one row per finished run: the
weight columns, the final validation loss per domain (`val_<domain>`) and their mean
(`val_mean`), bits per byte where a tokenizer is known, the model's parameters, the
tokens and the seed. A relaunch skips runs whose stage finished (the trainer's own
resume also picks up a run that was cut short).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import polars as pl

from kiln.config import ConfigError
from kiln.formats.runs import WEIGHT_PREFIX
from kiln.mixing.table import read_table
from kiln.training.model import ModelConfig
from kiln.training.parallelize import ParallelConfig
from kiln.training.recipe import OptimizerConfig, Recipe, RunConfig, StageConfig


@dataclass
class ProxyConfig:
    shards: str = ""  # token shards (kiln curate tokenize) with availability.json
    output: str = ""  # one directory per run, and runs.csv
    tokenizer: str = ""  # tokenizer directory, for bits per byte (optional)
    preset: str = "debug"  # proxy model size (kiln.training.presets.PRESETS)
    tokens: int = 100_000  # training tokens per proxy run
    seq_len: int = 128  # tokens per sequence
    batch_size: int = 8  # sequences per step
    lr: float = 3e-3  # peak learning rate (cosine, 5 % warmup)
    seed: int = 0  # model init and data order, the same for every run
    val_fraction: float = 0.02  # held-out share of each domain for the per-domain validation losses


def plan_weights(plan: pl.DataFrame, where: str) -> list[str]:
    domains = [c.removeprefix(WEIGHT_PREFIX) for c in plan.columns if c.startswith(WEIGHT_PREFIX)]
    if "run" not in plan.columns or not domains:
        raise ConfigError(f"{where}: a runs plan needs a 'run' column and w_<domain> weight columns "
                          f"(kiln mix design writes one); columns: {', '.join(plan.columns)}")
    return domains


def proxy_recipe(cfg: ProxyConfig, run_id: str, weights: dict[str, float]) -> Recipe:
    steps = max(1, cfg.tokens // (cfg.batch_size * cfg.seq_len))
    stage = StageConfig(name="proxy", weights=weights, tokens=cfg.tokens, seq_len=cfg.seq_len,
                        batch_size=cfg.batch_size, lr=cfg.lr, schedule="cosine", warmup=0.05,
                        checkpoint_every=max(1, steps // 2), eval_every=steps + 1, keep_checkpoints=1)
    run = RunConfig(output=os.path.join(cfg.output, run_id), shards=cfg.shards, tokenizer=cfg.tokenizer,
                    seed=cfg.seed, val_fraction=cfg.val_fraction, log_every=max(1, steps // 4))
    return Recipe(run=run, model=ModelConfig(preset=cfg.preset), parallel=ParallelConfig(),
                  optimizer=OptimizerConfig(), stages=[stage], path=f"proxy {run_id}")


def final_metrics(metrics_path: str) -> dict:
    """The last record of a proxy's metrics log that holds validation losses."""
    last = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if any(k.startswith("val/") for k in record):
                last = record
    return last


def run_plan(plan_path: str, cfg: ProxyConfig, log=None) -> pl.DataFrame:
    """Train every run of the plan that has not finished; returns (and writes) runs.csv."""
    from kiln.training.model import build_model, num_params, resolve
    from kiln.training.train import stage_paths, train

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if not cfg.shards or not cfg.output:
        raise ConfigError("kiln mix run: --shards and --output are required")
    plan = read_table(plan_path)  # kiln mix design writes CSV or Parquet
    domains = plan_weights(plan, plan_path)
    rows = []
    params = None
    for i, row in enumerate(plan.iter_rows(named=True)):
        run_id = str(row["run"])
        weights = {d: float(row[WEIGHT_PREFIX + d]) for d in domains if float(row[WEIGHT_PREFIX + d]) > 0}
        total = sum(weights.values())
        weights = {d: w / total for d, w in weights.items()}  # a CSV's rounding must not fail the sum check
        recipe = proxy_recipe(cfg, run_id, weights)
        paths = stage_paths(recipe, 0)  # a proxy recipe has one stage
        done = os.path.exists(paths.done)
        log(f"[mix run] {i + 1}/{plan.height} {run_id}: " + ("finished earlier" if done else
            "training " + ", ".join(f"{d} {w:.3f}" for d, w in weights.items())))
        if not done:
            train(recipe)
        metrics = final_metrics(paths.metrics)
        if params is None:
            from kiln.training.data import TokenSource

            vocab = TokenSource(cfg.shards, cfg.val_fraction).vocab_size
            params = num_params(build_model(resolve(ModelConfig(preset=cfg.preset), vocab_size=vocab),
                                            device="meta"), exclude_embeddings=False)
        out = {"run": run_id, **{WEIGHT_PREFIX + d: float(row[WEIGHT_PREFIX + d]) for d in domains}}
        losses = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("val/") and k.endswith("/loss")}
        for d in sorted(losses):
            out[f"val_{d}"] = losses[d]
        out["val_mean"] = sum(losses.values()) / len(losses) if losses else float("nan")
        for k, v in sorted(metrics.items()):
            if k.startswith("val/") and k.endswith("/bpb"):
                out[f"bpb_{k.split('/')[1]}"] = v
        out.update({"train_loss": metrics.get("train/loss"), "params": params, "tokens": metrics.get("train/tokens"),
                    "seed": cfg.seed})
        rows.append(out)
        table = pl.DataFrame(rows)
        os.makedirs(cfg.output, exist_ok=True)
        table.write_csv(os.path.join(cfg.output, "runs.csv"))
    log(f"[mix run] wrote {os.path.join(cfg.output, 'runs.csv')} ({len(rows)} runs)")
    return pl.DataFrame(rows)
