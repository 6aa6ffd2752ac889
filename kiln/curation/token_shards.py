"""The tokenize stage: token shards per domain (DESIGN.md contract 3, kiln.formats.shards).

Each Spark partition writes its own flat token file per domain,
`SHARDS/<domain>/part-<partition:05d>.bin`, beside its index `part-<partition:05d>.json`.
After the write, the driver checks every shard against its index and the stage's
token count, and writes `SHARDS/availability.json`, the tokens per domain that the
mixer reads.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from kiln.config import ConfigError
from kiln.curation.spark import load_once, ship
from kiln.curation.stage import Stage, one_thread_per_core, output_schema, set_columns, text_bytes
from kiln.curation.tokenizer import load_tokenizer
from kiln.formats import schema
from kiln.formats.shards import (AVAILABILITY_FILE, SHARD_FORMAT, ShardError, ShardWriter, check_size,
                                 domain_dirname, numpy_dtype, read_index, shard_indexes, write_availability)
from kiln.formats.stats import StageStats

# Characters given to one encode call at most, besides `batch_size` documents: the
# Encoding objects of a chunk are held at once, and documents may be megabytes.
ENCODE_CHARS = 8_000_000


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class TokenizeConfig:
    tokenizer: str = ""  # tokenizer.json, or a directory holding one (what train_tokenizer wrote)
    shards_dir: str = ""  # where shards and availability.json go (local or shared filesystem); emptied at start
    domain_column: str = "domain"  # shards are grouped by this column; without it every document is default_domain
    default_domain: str = "general"  # domain of documents whose domain is missing or empty
    max_doc_chars: int = 1_000_000  # longer documents are dropped as doc_too_long; 0 = no limit
    batch_size: int = 256  # documents per encode call (bounds the encodings held at once)
    eos_token: str = ""  # document separator; empty = the tokenizer_config.json's eos_token, else <|endoftext|>


class TokenizeStage(Stage):
    """Tokenize kept documents into shards per domain.

    Shards are written by the executors themselves, with plain file operations, into
    `shards_dir`: on a cluster that must be a filesystem every executor and the driver
    mount at the same path (NFS, Lustre, a FUSE-mounted bucket); an object-store URL is
    refused. The rows pass through with `n_tokens` and `shard` added.
    """

    name = "tokenize"

    def __init__(self, cfg: TokenizeConfig | None = None):
        self.cfg = cfg or TokenizeConfig()
        if not self.cfg.shards_dir:
            raise ConfigError("tokenize: shards_dir is required (where the token shards are written)")
        if "://" in self.cfg.shards_dir and not self.cfg.shards_dir.startswith("file://"):
            raise ConfigError(f"{self.cfg.shards_dir}: shards are written with local file operations by each "
                              "executor; give a local or shared-filesystem path")
        self.shards_dir = os.path.abspath(self.cfg.shards_dir.removeprefix("file://"))
        if not self.cfg.default_domain:
            raise ConfigError("tokenize: default_domain must not be empty (it names a shard directory)")
        if self.cfg.batch_size < 1:
            raise ConfigError(f"tokenize: batch_size must be at least 1, got {self.cfg.batch_size}")
        self.info = load_tokenizer(self.cfg.tokenizer, self.cfg.eos_token)
        self._shipped_name = self.info.path

    def settings(self) -> dict:
        return {**asdict(self.cfg), "tokenizer_hash": self.info.hash, "dtype": self.info.dtype}

    def outputs_intact(self) -> bool:
        try:
            with open(os.path.join(self.shards_dir, AVAILABILITY_FILE), encoding="utf-8") as f:
                availability = json.load(f)
            return availability.get("tokenizer_hash") == self.info.hash and all(
                os.path.exists(os.path.join(self.shards_dir, index))
                for d in availability["domains"].values() for index in d["shards"])
        except (OSError, ValueError, KeyError):
            return False

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(schema.N_TOKENS, pa.int64()), pa.field(schema.SHARD, pa.string())]

    def metrics(self) -> dict:
        from pyspark.sql import functions as F

        return {"tokens": F.coalesce(F.sum(schema.N_TOKENS), F.lit(0))}

    def prepare(self, spark, df) -> None:
        names = df.columns if hasattr(df, "columns") else df.arrow_schema.names
        missing = [c for c in (schema.ID, schema.TEXT) if c not in names]
        if missing:
            raise ConfigError(f"tokenize: input has no {missing[0]!r} column (columns: {', '.join(names)})")
        if self.cfg.domain_column not in names:
            _log(f"[tokenize] input has no {self.cfg.domain_column!r} column: every document goes to "
                 f"domain {self.cfg.default_domain!r}")
        _clear_shards_dir(self.shards_dir)
        self._shipped_name = ship(spark, self.info.path, key=self.info.hash[:16])

    def process_partition(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext
        from tokenizers import Tokenizer

        task = TaskContext.get()
        partition, attempt = (task.partitionId(), task.attemptNumber()) if task else (0, 0)
        one_thread_per_core()
        tokenizer = load_once(self._shipped_name, Tokenizer.from_file)
        header = {"format": SHARD_FORMAT, "tokenizer_hash": self.info.hash, "vocab_size": self.info.vocab_size,
                  "eos_id": self.info.eos_id, "dtype": self.info.dtype}
        writers: dict[str, ShardWriter] = {}

        def writer(domain: str) -> ShardWriter:
            if domain not in writers:
                writers[domain] = ShardWriter(self.shards_dir, domain, partition, attempt, header)
            return writers[domain]

        try:
            for batch in batches:
                yield self._process(batch, tokenizer, writer)
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        # An empty partition (or one whose documents were all dropped) writes nothing.
        for w in writers.values():
            w.commit()

    def _process(self, batch: pa.RecordBatch, tokenizer, writer) -> pa.RecordBatch:
        texts = batch.column(schema.TEXT).to_pylist()
        ids = batch.column(schema.ID).to_pylist()
        has_domain = self.cfg.domain_column in batch.schema.names
        domains = [str(d) if d is not None and str(d) != "" else self.cfg.default_domain
                   for d in (batch.column(self.cfg.domain_column).to_pylist() if has_domain else [None] * len(ids))]
        reasons: list[str | None] = []
        for text in texts:
            if text is None or not text.strip():
                reasons.append("empty_document")
            elif self.cfg.max_doc_chars and len(text) > self.cfg.max_doc_chars:
                reasons.append("doc_too_long")
            else:
                reasons.append(None)
        n_tokens: list[int | None] = [None] * len(ids)
        shards: list[str | None] = [None] * len(ids)
        kept = [i for i, r in enumerate(reasons) if r is None]
        for chunk in _chunks(kept, texts, self.cfg.batch_size):
            # encode_batch_fast: the ids of encode_batch without computing character offsets.
            encodings = tokenizer.encode_batch_fast([texts[i] for i in chunk], add_special_tokens=False)
            by_domain: dict[str, list[tuple[int, list[int]]]] = {}
            for i, enc in zip(chunk, encodings):
                by_domain.setdefault(domains[i], []).append((i, enc.ids))
            for domain, docs in by_domain.items():
                w = writer(domain)
                flat: list[int] = []
                for _, token_ids in docs:
                    flat.extend(token_ids)
                    flat.append(self.info.eos_id)
                lengths = [len(token_ids) + 1 for _, token_ids in docs]
                w.add([ids[i] for i, _ in docs], lengths, np.array(flat, dtype=numpy_dtype(self.info.dtype)))
                shard = f"{domain_dirname(domain)}/{w.name}.bin"
                for (i, _), n in zip(docs, lengths):
                    n_tokens[i], shards[i] = n, shard
        return set_columns(batch, output_schema(self, batch.schema), {
            schema.N_TOKENS: n_tokens, schema.SHARD: shards, schema.DROP_REASON: reasons,
            schema.IN_BYTES: text_bytes(texts),
        })

    def finish(self, stats: StageStats) -> None:
        """Check every shard against its index and the stage's own token count, then
        write availability.json. A lost, partial or foreign shard fails the stage here,
        before stats.json marks it complete."""
        expected_tokens = stats.extra["metrics"]["tokens"]
        domains: dict[str, dict] = {}
        for index_path in shard_indexes(self.shards_dir):
            index = read_index(index_path)
            if index["tokenizer_hash"] != self.info.hash:
                raise ShardError(f"{index_path}: written with tokenizer {index['tokenizer_hash'][:16]}, "
                                 f"not this run's {self.info.hash[:16]}")
            check_size(index_path, index)
            d = domains.setdefault(index["domain"], {"tokens": 0, "documents": 0, "shards": []})
            d["tokens"] += index["num_tokens"]
            d["documents"] += index["num_docs"]
            d["shards"].append(os.path.relpath(index_path, self.shards_dir))
        total_tokens = sum(d["tokens"] for d in domains.values())
        total_docs = sum(d["documents"] for d in domains.values())
        if total_tokens != expected_tokens or total_docs != stats.kept:
            raise ShardError(f"{self.shards_dir}: shards hold {total_tokens} tokens of {total_docs} documents, "
                             f"the stage counted {expected_tokens} tokens of {stats.kept} kept documents")
        _remove_attempt_leftovers(self.shards_dir)
        write_availability(self.shards_dir, {
            "tokenizer_hash": self.info.hash, "vocab_size": self.info.vocab_size, "eos_id": self.info.eos_id,
            "dtype": self.info.dtype, "tokenizer": self.info.path, "domains": dict(sorted(domains.items())),
            "total_tokens": total_tokens, "total_documents": total_docs,
        })
        stats.extra["availability"] = {name: {"tokens": d["tokens"], "documents": d["documents"],
                                              "shards": len(d["shards"])} for name, d in sorted(domains.items())}


def _chunks(rows: list[int], texts: list[str], max_docs: int) -> Iterator[list[int]]:
    chunk: list[int] = []
    chars = 0
    for i in rows:
        if chunk and (len(chunk) >= max_docs or chars + len(texts[i]) > ENCODE_CHARS):
            yield chunk
            chunk, chars = [], 0
        chunk.append(i)
        chars += len(texts[i])
    if chunk:
        yield chunk


def _is_shard_file(name: str) -> bool:
    return name.startswith("part-") and name.endswith((".bin", ".json"))


def _clear_shards_dir(shards_dir: str) -> None:
    """Empty `shards_dir` before a run: a rerun with fewer partitions must not leave
    an earlier run's part-00007 to be counted. Only a directory that holds nothing but
    kiln shards is removed, so a mistyped path cannot delete unrelated files."""
    root = Path(shards_dir)
    if not root.exists():
        return
    if not root.is_dir():
        raise ConfigError(f"{shards_dir}: shards_dir exists and is not a directory")
    for entry in root.iterdir():
        if entry.is_file() and entry.name in (AVAILABILITY_FILE, f".{AVAILABILITY_FILE}.tmp"):
            continue
        if entry.is_dir() and all(f.is_file() and (_is_shard_file(f.name) or f.name.startswith(".part-"))
                                  for f in entry.iterdir()):
            continue
        raise ConfigError(f"{shards_dir}: holds {entry.name!r}, which is not a kiln token shard; "
                          "refusing to empty it (choose an empty or new shards_dir)")
    shutil.rmtree(root)


def _remove_attempt_leftovers(shards_dir: str) -> None:
    # Temporary files of task attempts that failed (their task succeeded on a retry).
    for leftover in Path(shards_dir).glob("*/.part-*.attempt-*"):
        leftover.unlink()
