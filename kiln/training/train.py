"""Staged pretraining: one linear loop per stage, its state written down.

Each stage of a recipe starts from the previous stage's exported weights (a fresh
optimizer, its own mixture, sequence length, batch size and LR schedule), trains for
its token budget, checkpoints as it goes, optionally averages its last checkpoints,
and exports `NN_<stage>/final/`, a Hugging Face model directory. A relaunch skips
finished stages and resumes an unfinished one from its newest complete checkpoint,
reproducing the uninterrupted run's losses.

    kiln train recipes/tiny_train.toml
    torchrun --standalone --nproc_per_node=2 -m kiln.training recipes/tiny_train.toml
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from kiln.config import ConfigError
from kiln.training import checkpoint
from kiln.training.data import DataConfig, MixtureSampler, TokenSource
from kiln.training.metrics import MetricsLogger, Throughput, bits_per_byte, eta, flops_per_token, peak_flops, peak_memory_gb
from kiln.training.mixture import Mixture, load_mixture
from kiln.training.model import CausalLM, ModelConfig, build_model, num_params, resolve, save_hf, set_rope_theta
from kiln.training.parallelize import World, all_reduce_mean, autocast, barrier, init_distributed, parallelize
from kiln.training.recipe import Recipe, StageConfig, batch_size_at, lr_at

STAGE_DONE = "kiln_stage.json"


def stage_dir(recipe: Recipe, i: int) -> str:
    return os.path.join(recipe.run.output, f"{i + 1:02d}_{recipe.stages[i].name}")


def stage_mixture(recipe: Recipe, stage: StageConfig) -> Mixture:
    where = f"{recipe.path}: [[stage]] {stage.name}"
    if stage.weights:
        return Mixture.from_dict({"mixture": stage.weights}, path=where)
    path = stage.mixture
    if not os.path.isabs(path) and recipe.path and not os.path.exists(path):
        path = os.path.join(os.path.dirname(recipe.path), path)
    return load_mixture(path)


def optimizer_for(model: torch.nn.Module, recipe: Recipe, lr: float, device: torch.device) -> torch.optim.Optimizer:
    # Decay matrices only: norms' gains (and biases, which Llama has none of) stay undecayed.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    opt = recipe.optimizer
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=tuple(opt.betas), eps=opt.eps, fused=device.type == "cuda")


def check_batching(stage: StageConfig, micro: int, world: World, where: str) -> None:
    sizes = [stage.batch_size] + [b for _t, b in stage.batch_ramp]
    for size in sizes:
        if size % (micro * world.size):
            raise ConfigError(f"{where}: batch size {size} is not a multiple of micro_batch_size {micro} x "
                              f"{world.size} rank(s)")


class Validator:
    """Per-domain validation loss and bits per byte on fixed held-out batches."""

    def __init__(self, source: TokenSource, stage: StageConfig, micro: int, world: World, tokenizer_dir: str):
        self.source, self.stage, self.micro, self.world = source, stage, micro, world
        self.tokenizer = None
        path = os.path.join(tokenizer_dir, "tokenizer.json") if tokenizer_dir else ""
        if path and os.path.exists(path):
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(path)
        self._bytes: dict[str, int] = {}
        self.domains = []
        for domain in source.domains:
            try:
                next(iter(self.batches(domain)), None)
                self.domains.append(domain)
            except ConfigError as e:  # too little held-out text for this sequence length
                if world.main:
                    print(f"[{stage.name}] no validation for {domain}: {e}", flush=True)

    def batches(self, domain: str):
        return self.source.val_batches(domain, self.stage.seq_len, self.micro, max_batches=self.stage.eval_batches,
                                       rank=self.world.rank, world_size=self.world.size,
                                       doc_masking=self.stage.doc_masking)

    def bytes_of(self, domain: str) -> int:
        """UTF-8 bytes of the held-out targets, decoded once: what bits per byte divides by."""
        if domain not in self._bytes:
            n = 0
            for b in self.batches(domain):
                for row in b.labels.tolist():
                    n += len(self.tokenizer.decode(row, skip_special_tokens=False).encode("utf-8"))
            self._bytes[domain] = int(all_reduce_mean(float(n), self.world) * self.world.size)
        return self._bytes[domain]

    @torch.no_grad()
    def run(self, model, parallel) -> dict:
        model.eval()
        out = {}
        for domain in self.domains:
            total, count = 0.0, 0
            for b in self.batches(domain):
                b = b.to(self.world.device)
                with autocast(parallel, self.world, model):
                    loss = model(b.input_ids, b.labels, b.position_ids, b.segment_ids)
                total += float(loss) * b.labels.numel()
                count += b.labels.numel()
            if not count:
                continue
            loss = all_reduce_mean(total / count, self.world)
            out[f"val/{domain}/loss"] = loss
            if self.tokenizer is not None:
                tokens = count * self.world.size
                out[f"val/{domain}/bpb"] = bits_per_byte(loss, tokens, self.bytes_of(domain))
        model.train()
        return out


def train(recipe: Recipe, resume: bool = True, stop_after_steps: int = 0) -> list[dict]:
    """Run every stage; returns one summary per stage. `stop_after_steps` (tests) ends
    the run after that many optimizer steps in total, as a kill would."""
    world = init_distributed()
    torch.manual_seed(recipe.run.seed)
    source = TokenSource(recipe.run.shards, recipe.run.val_fraction)
    mcfg = resolve(recipe.model, vocab_size=source.vocab_size, where=f"{recipe.path}: [model]")
    source.check_vocab(mcfg.vocab_size)
    log = MetricsLogger(None, world.main)
    log.print(f"kiln train {recipe.path}: {len(recipe.stages)} stage(s), {world.size} process(es) on {world.device}")
    log.print("resolved model: " + json.dumps(dataclasses.asdict(mcfg)))
    summaries, previous, budget = [], "", [stop_after_steps or None]
    for i, stage in enumerate(recipe.stages):
        out = stage_dir(recipe, i)
        final = os.path.join(out, "final")
        if os.path.exists(os.path.join(final, STAGE_DONE)):
            log.print(f"[{stage.name}] finished earlier: {final}")
            with open(os.path.join(final, STAGE_DONE), encoding="utf-8") as f:
                summaries.append(json.load(f))
            previous = final
            continue
        summary = run_stage(recipe, i, mcfg, source, previous, world, log, resume, budget)
        if summary is None:  # stopped early (stop_after_steps)
            break
        summaries.append(summary)
        previous = final
    log.close()
    return summaries


def run_stage(recipe: Recipe, i: int, mcfg: ModelConfig, source: TokenSource, previous: str, world: World,
              log: MetricsLogger, resume: bool, budget: list[int]) -> dict | None:
    from transformers import AutoModelForCausalLM

    stage = recipe.stages[i]
    out = stage_dir(recipe, i)
    where = f"{recipe.path}: [[stage]] {stage.name}"
    mixture = stage_mixture(recipe, stage)
    source.check_mixture(mixture)
    micro = stage.micro_batch_size or max(1, stage.batch_size // world.size)
    check_batching(stage, micro, world, where)

    if previous:
        hf = AutoModelForCausalLM.from_pretrained(previous, dtype=torch.float32)
    else:
        hf = build_model(mcfg, seed=recipe.run.seed)
    if stage.rope_theta:
        set_rope_theta(hf, stage.rope_theta)
    if stage.seq_len > hf.config.max_position_embeddings:
        hf.config.max_position_embeddings = stage.seq_len
    model = CausalLM(hf).to(world.device)
    parallelize(model, recipe.parallel, world)
    optimizer = optimizer_for(model, recipe, lr_at(stage, 0), world.device)
    data_cfg = DataConfig(shards_dir=recipe.run.shards, seq_len=stage.seq_len, batch_size=micro,
                          seed=recipe.run.seed + 1000 * i, val_fraction=recipe.run.val_fraction,
                          doc_masking=stage.doc_masking)
    sampler = MixtureSampler(source, mixture, data_cfg, world.rank, world.size)
    validator = Validator(source, stage, micro, world, recipe.run.tokenizer)
    ckpt_root = os.path.join(out, "checkpoints")
    resolved = {"model": dataclasses.asdict(mcfg), "stage": dataclasses.asdict(stage),
                "parallel": dataclasses.asdict(recipe.parallel), "optimizer": dataclasses.asdict(recipe.optimizer),
                "run": dataclasses.asdict(recipe.run), "mixture": mixture.weights}
    step, tokens = 0, 0
    if resume and (path := checkpoint.latest(ckpt_root, log.print)):
        meta = checkpoint.load(path, model, optimizer, world, expected_model=dataclasses.asdict(mcfg))
        step, tokens = meta["step"], meta["tokens"]
        sampler.load_state_dict(meta["sampler"])
        log.print(f"[{stage.name}] resumed from {path} (step {step}, {tokens:,} tokens)")
    if world.main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "recipe_resolved.json"), "w", encoding="utf-8") as f:
            json.dump(resolved, f, indent=2)
    metrics = MetricsLogger(os.path.join(out, "metrics.jsonl"), world.main,
                            os.path.join(out, "tensorboard") if recipe.run.tensorboard else "")
    n_params = num_params(hf)
    fpt = flops_per_token(n_params, mcfg.num_layers, mcfg.hidden_size, stage.seq_len)
    meter = Throughput(fpt, peak_flops(world.device), world.size)
    log.print(f"[{stage.name}] {n_params / 1e6:.2f}M non-embedding parameters, {stage.tokens:,} tokens, "
              f"seq_len {stage.seq_len}, mixture {mixture.weights}")

    def save(step: int, tokens: int) -> str:
        meta = {"tokens": tokens, "sampler": sampler.state_dict(), "config": resolved}
        return checkpoint.save(ckpt_root, step, model, optimizer, meta, world, keep=stage.keep_checkpoints)

    t_start, last_saved, losses = time.time(), step, []
    model.train()
    while tokens < stage.tokens:
        if budget[0] is not None and budget[0] <= 0:
            return None
        batch_size = batch_size_at(stage, tokens)
        accum = batch_size // (micro * world.size)
        lr = lr_at(stage, tokens)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=world.device)
        for _ in range(accum):
            b = sampler.next_batch(micro).to(world.device)
            with autocast(recipe.parallel, world, model):
                loss = model(b.input_ids, b.labels, b.position_ids, b.segment_ids)
            (loss / accum).backward()
            loss_sum += loss.detach().float()
        grad_norm = _clip(model, recipe.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_tokens = batch_size * stage.seq_len
        tokens += step_tokens
        meter.add(step_tokens)
        train_loss = all_reduce_mean(float(loss_sum) / accum, world)
        losses.append(train_loss)
        if budget[0] is not None:
            budget[0] -= 1
        record = {"train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                  "train/tokens": tokens, "train/batch_size": batch_size}
        done = tokens >= stage.tokens
        if step % recipe.run.log_every == 0 or done:
            record.update(meter.report())
            record["perf/peak_memory_gb"] = peak_memory_gb(world.device)
            record.update(sampler.metrics())
            log.print(f"[{stage.name}] step {step} tokens {tokens:,}/{stage.tokens:,} loss {train_loss:.4f} "
                      f"lr {lr:.2e} gnorm {grad_norm:.3f} {record['perf/tokens_per_s']:,.0f} tok/s"
                      + (f" mfu {record['perf/mfu']:.1%}" if "perf/mfu" in record else "")
                      + f" eta {eta(time.time() - t_start, tokens, stage.tokens)}")
        if step % stage.eval_every == 0 or done:
            val = validator.run(model, recipe.parallel)
            record.update(val)
            if val:
                log.print(f"[{stage.name}] validation " + " ".join(f"{k.split('/', 1)[1]} {v:.4f}"
                                                                    for k, v in val.items()))
        metrics.log(step, record)
        if step % stage.checkpoint_every == 0 or done:
            save(step, tokens)
            last_saved = step
    if last_saved != step:
        save(step, tokens)
    metrics.close()
    if stage.average_last > 1:
        paths = checkpoint.complete_checkpoints(ckpt_root, log.print)[-stage.average_last:]
        checkpoint.average(paths, model, world)
        log.print(f"[{stage.name}] averaged the last {len(paths)} checkpoints: "
                  + ", ".join(os.path.basename(p) for p in paths))
    final = os.path.join(out, "final")
    summary = {"stage": stage.name, "steps": step, "tokens": tokens, "final_loss": losses[-1] if losses else None,
               "averaged": stage.average_last if stage.average_last > 1 else 0, "final": final}
    if stage.average_last > 1:
        summary.update(validator.run(model, recipe.parallel))
    export(model, final, recipe.run.tokenizer, world, summary)
    log.print(f"[{stage.name}] exported {final}")
    return summary


def _clip(model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor of the global norm
        norm = norm.full_tensor()
    return float(norm)


def export(model, final: str, tokenizer_dir: str, world: World, summary: dict) -> None:
    """The stage's weights as a Hugging Face directory, gathered to rank 0 under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.main:
        hf = model.hf
        if world.distributed and world.size > 1:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_config(model.hf.config, dtype=torch.float32)
            hf.load_state_dict({k.removeprefix("hf."): v for k, v in full.items()})
        save_hf(hf, final, tokenizer_dir)
        with open(os.path.join(final, STAGE_DONE), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    barrier(world)
