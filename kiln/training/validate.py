"""Validation during training: per-domain loss and bits per byte on fixed held-out batches.

The held-out documents are each domain's validation split (kiln.training.data); every
pass reads the same first `eval_batches` batches of each, so values are comparable
across steps and stages. Bits per byte needs the tokenizer: it divides the summed loss
by the UTF-8 bytes of the decoded targets, which makes runs with different tokenizers
comparable.
"""

from __future__ import annotations

import os

import torch

from kiln.config import ConfigError
from kiln.training.data import TokenSource
from kiln.training.distributed import World, all_reduce_mean
from kiln.training.metrics import bits_per_byte
from kiln.training.parallelize import ParallelConfig, autocast
from kiln.training.recipe import StageConfig


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
    def run(self, model, parallel: ParallelConfig) -> dict:
        """`val/<domain>/loss` (and `val/<domain>/bpb` with a tokenizer), averaged over ranks."""
        model.eval()
        out = {}
        for domain in self.domains:
            total, count = 0.0, 0
            for b in self.batches(domain):
                b = b.to(self.world.device)
                with autocast(parallel, self.world):
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
