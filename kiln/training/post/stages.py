"""Post-training stage kinds of `kiln train`: what each reads, trains and measures.

    kind = "sft"      conversations; loss on assistant tokens only (headers, system and
                      user turns masked, <|eot_id|> trained), packed with no attention
                      across conversations, or one per row (packing = false)
    kind = "reward"   preference pairs; a scalar head on the decoder
                      (AutoModelForSequenceClassification, one label), Bradley-Terry
                      loss -log sigma(r_c - r_r - margin), optional centring
    kind = "dpo"      preference pairs; the reference is the stage's starting weights,
                      its log-probs computed once and cached in NN_<stage>/ref_logps.safetensors;
                      beta, loss sigmoid / ipo / hinge, nll_weight (Llama 3: 0.2),
                      mask_format_tokens (Llama 3: headers and <|eot_id|> out of both responses)

`setup` returns the pieces the stage loop drives: the model, the sampler (next_batch,
state_dict, load_state_dict, metrics), the function from a batch to (loss, metrics), the
validator, and the number of optimizer steps the stage's `epochs` make.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from kiln.config import ConfigError
from kiln.training.distributed import World, all_reduce_mean
from kiln.training.parallelize import ParallelConfig, autocast
from kiln.training.post.data import (ChatTokenizer, PairSampler, SFTSampler, pair_batch, read_pairs, read_sft,
                                     split)

REF_CACHE = "ref_logps.safetensors"
DATA_REPORT = "data_report.json"


@dataclass
class PostStage:
    model: torch.nn.Module
    sampler: object
    forward: object  # batch -> (loss, metrics)
    validator: object  # .run(model, parallel) -> {val/...: value}
    items: int  # training items per epoch (packed sequences or pairs)


def load_start(kind: str, path: str, vocab_size: int):
    """The Hugging Face model a post stage starts from (safetensors only)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a Hugging Face model directory ({str(e).splitlines()[0][:200]})") from e
    heads = [a for a in (config.architectures or []) if a.endswith("ForSequenceClassification")]
    try:
        if kind == "reward":
            if heads and getattr(config, "num_labels", 1) != 1:
                raise ConfigError(f"{path}: a sequence classifier with {config.num_labels} labels; a reward stage needs "
                                  "one score (start it from a causal LM export or a reward export)")
            hf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                                    use_safetensors=True)
        else:
            if heads:
                raise ConfigError(f"{path}: a reward model (sequence classifier); a {kind} stage starts from a "
                                  "causal LM export: set the stage's from")
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except OSError as e:
        raise ConfigError(f"{path}: no safetensors weights ({str(e).splitlines()[0][:200]})") from e
    if hf.config.vocab_size < vocab_size:
        raise ConfigError(f"{path}: its vocabulary has {hf.config.vocab_size} tokens, the tokenizer {vocab_size}: "
                          "the model and the tokenizer do not belong together")
    return hf


def setup(kind: str, cfg, hf, tok: ChatTokenizer, world: World, micro: int, seed: int, root: str, log,
          parallelize_fn) -> PostStage:
    from kiln.training.model import CausalLM
    from kiln.training.post.models import PreferenceLM, RewardModel

    where = f"[[stage]] {cfg.name}"
    if kind == "rloo":
        from kiln.training.post import rloo

        model, sampler, forward, validator, items = rloo.setup(cfg, hf, tok, world, micro, seed, log, parallelize_fn)
        return PostStage(model, sampler, forward, validator, items)
    if not cfg.data:
        raise ConfigError(f"{where}: kind {kind!r} needs data = PATH")
    if kind == "sft":
        examples, train_idx, val_idx = _rows(lambda path: read_sft(path, tok, cfg.seq_len, cfg.overflow), cfg, seed,
                                             root, world, log)
        model = parallelize_fn(CausalLM(hf))
        sampler = SFTSampler([examples[i] for i in train_idx], cfg.seq_len, seed, tok.pad_id, cfg.packing,
                             world.rank, world.size)
        val = SFTValidator([examples[i] for i in val_idx], cfg.seq_len, tok.pad_id, micro, world)
        return PostStage(model, sampler, lambda m, b: (m(b.input_ids, b.labels, b.position_ids, b.segment_ids), {}),
                         val, len(sampler.sequences))
    mask = kind == "dpo" and cfg.mask_format_tokens
    pairs, train_idx, val_idx = _rows(lambda path: read_pairs(path, tok, cfg.seq_len, mask, cfg.overflow), cfg, seed,
                                      root, world, log)
    sampler = PairSampler(pairs, train_idx, seed, tok.pad_id, world.rank, world.size)
    if kind == "reward":
        hf.config.pad_token_id = tok.pad_id  # transformers finds a row's last token by it
        model = parallelize_fn(RewardModel(hf, cfg.center_rewards))
        return PostStage(model, sampler, lambda m, b: m(b["input_ids"], b["lengths"], b["margin"]),
                         PairValidator(pairs, val_idx, tok.pad_id, micro, world, "reward"), len(train_idx))
    model = parallelize_fn(PreferenceLM(hf, cfg.beta, cfg.loss_type, cfg.nll_weight))
    ref = reference_logps(model, pairs, tok.pad_id, micro, world, os.path.join(root, REF_CACHE), cfg.data, log,
                          cfg.name)

    def forward(m, b):
        index = b["index"].cpu()
        return m(b["input_ids"], b["targets"], ref[0][index].to(b["input_ids"].device),
                 ref[1][index].to(b["input_ids"].device))

    return PostStage(model, sampler, forward, PairValidator(pairs, val_idx, tok.pad_id, micro, world, "dpo", ref),
                     len(train_idx))


def _rows(read, cfg, seed: int, root: str, world: World, log) -> tuple[list, np.ndarray, np.ndarray]:
    """The stage's rows and which train and which are held out: a seeded `holdout` share of
    `data`, or, with `val_data`, all of `data` for training and `val_data`'s rows held out
    (appended after them, so one index addresses both)."""
    rows, report = read(cfg.data)
    reports = {"data": report.to_dict()}
    log(f"[{cfg.name}] data {report.describe()}")
    if cfg.val_data:
        held, val_report = read(cfg.val_data)
        reports["val_data"] = val_report.to_dict()
        log(f"[{cfg.name}] val_data {val_report.describe()}")
        train_idx, val_idx = np.arange(len(rows)), np.arange(len(rows), len(rows) + len(held))
        rows = rows + held
    else:
        train_idx, val_idx = split(len(rows), cfg.holdout, seed)
    if world.main:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, DATA_REPORT), "w", encoding="utf-8") as f:
            json.dump(reports, f, indent=2)
    return rows, train_idx, val_idx


# --------------------------------------------------------------------------- the DPO reference


def reference_logps(model, pairs, pad_id: int, micro: int, world: World, path: str, data: str, log, name: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair's chosen and rejected log-probs under the stage's starting weights
    (the frozen reference), computed once before training and cached in `path` under a
    key of the starting weights and the tokenized pairs; a resumed or rerun stage loads
    them instead. Every rank computes every pair (in step, as FSDP2 needs)."""
    from safetensors.torch import load_file, save_file

    key = _ref_key(model, pairs)
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            saved_key = (f.metadata() or {}).get("key")
        if saved_key == key:
            cached = load_file(path)
            log(f"[{name}] reference log-probs of {len(pairs)} pairs read from {path}")
            return cached["chosen"], cached["rejected"]
    log(f"[{name}] reference log-probs of {len(pairs)} pairs ({data}) with the starting weights")
    chosen, rejected = torch.zeros(len(pairs), dtype=torch.float64), torch.zeros(len(pairs), dtype=torch.float64)
    model.eval()
    for start in range(0, len(pairs), micro):
        idx = list(range(start, min(start + micro, len(pairs))))
        b = pair_batch(pairs, idx, pad_id)
        logps = model.sequence_logps(b["input_ids"].to(world.device), b["targets"].to(world.device)).double().cpu()
        chosen[idx], rejected[idx] = logps[:len(idx)], logps[len(idx):]
    model.train()
    if world.main:
        tmp = f"{path}.tmp"
        save_file({"chosen": chosen, "rejected": rejected}, tmp, metadata={"key": key})
        os.replace(tmp, path)
    return chosen, rejected


def _ref_key(model, pairs) -> str:
    h = hashlib.sha256()
    for p in model.hf.state_dict().values():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        h.update(t.detach().float().cpu().numpy().tobytes())
    for pair in pairs:
        h.update(json.dumps([pair.chosen.ids, pair.chosen.labels, pair.rejected.ids, pair.rejected.labels]).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- held-out measures


class SFTValidator:
    """Held-out conversations' loss on their assistant tokens: val/sft/loss."""

    def __init__(self, examples, seq_len: int, pad_id: int, micro: int, world: World):
        self.sampler = SFTSampler(examples, seq_len, 0, pad_id, True) if examples else None
        self.micro, self.world = micro, world

    @torch.no_grad()
    def run(self, model, parallel: ParallelConfig) -> dict:
        if self.sampler is None:
            return {}
        model.eval()
        total, count = 0.0, 0
        for start in range(0, self.sampler.n, self.micro):
            rows = list(range(start, min(start + self.micro, self.sampler.n)))
            b = self.sampler.batch_of(rows).to(self.world.device)
            n = int((b.labels != -100).sum())
            with autocast(parallel, self.world):
                loss = model(b.input_ids, b.labels, b.position_ids, b.segment_ids)
            total += float(loss) * n
            count += n
        model.train()
        return {"val/sft/loss": all_reduce_mean(total / max(count, 1), self.world)}


class PairValidator:
    """Held-out pairs: a reward stage's pairwise accuracy (val/reward/accuracy, the share
    of pairs whose chosen reply scores higher) and margin; a DPO stage's preference
    accuracy (its implicit rewards beta x (log pi - log ref)), margin and loss."""

    def __init__(self, pairs, indices, pad_id: int, micro: int, world: World, kind: str, ref=None):
        self.pairs, self.indices, self.pad_id, self.micro, self.world = pairs, [int(i) for i in indices], pad_id, \
            micro, world
        self.kind, self.ref = kind, ref

    @torch.no_grad()
    def run(self, model, parallel: ParallelConfig) -> dict:
        if not self.indices:
            return {}
        model.eval()
        sums: dict[str, float] = {}
        for start in range(0, len(self.indices), self.micro):
            idx = self.indices[start:start + self.micro]
            b = {k: v.to(self.world.device) for k, v in pair_batch(self.pairs, idx, self.pad_id).items()}
            with autocast(parallel, self.world):
                if self.kind == "reward":
                    loss, metrics = model(b["input_ids"], b["lengths"], b["margin"])
                else:
                    index = torch.tensor(idx)
                    loss, metrics = model(b["input_ids"], b["targets"], self.ref[0][index].to(self.world.device),
                                          self.ref[1][index].to(self.world.device))
            for k, v in {"loss": loss, **metrics}.items():
                if k in ("loss", "accuracy", "margin"):
                    sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
        model.train()
        return {f"val/{self.kind}/{k}": all_reduce_mean(v / len(self.indices), self.world) for k, v in sums.items()}


def steps_for(cfg, items: int) -> int:
    """Optimizer steps of `epochs` passes over `items` training items, batch_size per step."""
    return max(1, math.ceil(cfg.epochs * items / cfg.batch_size))
