"""A probe's candidates, made ready for the arms: each becomes one domain the arm's
blend draws from.

- `domain = "math"`: a domain of the probe's shards (its training documents, read from
  a stream position of its own, so the default mix's use of the same domain is untouched);
- `shards = "DIR"`: a token shards directory (`kiln curate tokenize`), added to the run as
  one extra domain; its tokenizer must be the base's (the hash in every index);
- `documents = PATH`: JSONL or Parquet with a text column, or a kiln stage directory
  (its kept docs/) or a stage's dropped/ output, tokenized with the base's tokenizer by
  the curation pipeline itself (its reader, which counts bad lines by reason, then the
  tokenize stage) on a local Spark session, into `OUTPUT/candidates/<name>-<hash>/`.
  The hash covers the files' contents, the tokenizer and the text column: a rerun, or
  another probe with the same data, reuses the shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

from kiln.config import ConfigError
from kiln.formats.hashing import content_sha256
from kiln.formats.shards import AVAILABILITY_FILE, read_index, shard_indexes
from kiln.probe.config import CandidateConfig

CANDIDATES_DIR = "candidates"
EXTRA_PREFIX = "candidate:"  # the domain name an extra shards directory gets in an arm's run


@dataclass
class Candidate:
    name: str
    domain: str  # the domain the arm's blend draws from
    extra: dict[str, str]  # {domain: shards directory} added to the arm's run ({} for a domain of the shards)
    key: str  # identity of its data (part of the arm's key)
    described: str


def shards_digest(shards_dir: str) -> str:
    """Identity of a shards directory from its indexes (tokenizer, documents, ids and
    offsets of every shard) and its token files' sizes; cheap on any size."""
    h = hashlib.sha256()
    for path in shard_indexes(shards_dir):
        rel = os.path.relpath(path, shards_dir)
        index = read_index(path)
        h.update(rel.encode())
        h.update(content_sha256(path).encode())
        h.update(str(os.path.getsize(os.path.join(os.path.dirname(path), index["tokens_file"]))).encode())
    return h.hexdigest()


def prepare(cfg: CandidateConfig, shards_domains: list[str], tokenizer_dir: str, tokenizer_hash: str,
            out_dir: str, log=print) -> Candidate:
    """The candidate's domain and data identity; tokenizes documents when needed (the
    only step that starts Spark)."""
    if cfg.domain:
        if cfg.domain not in shards_domains:
            raise ConfigError(f"[[candidate]] {cfg.name}: domain {cfg.domain!r} is not in the probe's shards "
                              f"(domains: {', '.join(shards_domains)})")
        return Candidate(cfg.name, cfg.domain, {}, f"domain:{cfg.domain}", f"domain {cfg.domain!r} of the shards")
    shards = cfg.shards or tokenize_documents(cfg, tokenizer_dir, out_dir, log)
    _check_tokenizer(shards, tokenizer_hash, cfg.name)
    domain = EXTRA_PREFIX + cfg.name
    described = f"shards {cfg.shards}" if cfg.shards else f"documents {', '.join(cfg.documents)}"
    return Candidate(cfg.name, domain, {domain: shards}, f"shards:{shards_digest(shards)}", described)


def _check_tokenizer(shards: str, tokenizer_hash: str, name: str) -> None:
    indexes = shard_indexes(shards) if os.path.isdir(shards) else []
    if not indexes:
        raise ConfigError(f"[[candidate]] {name}: {shards}: no token shards (<domain>/part-NNNNN.json)")
    for path in indexes:
        found = read_index(path).get("tokenizer_hash")
        if found != tokenizer_hash:
            raise ConfigError(f"[[candidate]] {name}: {path}: tokenized with tokenizer {str(found)[:16]}..., the "
                              f"base's is {tokenizer_hash[:16]}...: re-tokenize it with the base's tokenizer, or "
                              "give its documents instead")


def check_tokens(name: str, train_tokens: int, needed: int, max_epochs: float) -> float:
    """Epochs of the candidate an arm reads; fails when more than max_epochs."""
    if train_tokens <= 0:
        raise ConfigError(f"[[candidate]] {name}: no training tokens (after the held-out split)")
    epochs = needed / train_tokens
    if epochs > max_epochs:
        allow = math.ceil(epochs * 10) / 10
        raise ConfigError(f"[[candidate]] {name}: {train_tokens:,} training tokens, but an arm draws about "
                          f"{needed:,} from it ({epochs:.2f} epochs); give more data or fewer [probe] tokens, or allow "
                          f"the repetition with max_epochs = {allow}")
    return epochs


# --------------------------------------------------------------------------- documents


def _inputs(documents: list[str], name: str) -> list[str]:
    """The files to read: a kiln stage directory stands for its kept docs/."""
    from kiln.curation import paths

    for p in documents:
        if not paths.exists(p):
            raise ConfigError(f"[[candidate]] {name}: documents {p} not found")
    files = paths.document_files(documents)
    if not files:
        raise ConfigError(f"[[candidate]] {name}: no files under {', '.join(documents)}")
    return files


def tokenize_documents(cfg: CandidateConfig, tokenizer_dir: str, out_dir: str, log=print) -> str:
    """Shards of the candidate's documents (cached by content hash); returns their directory."""
    from kiln.curation.tokenizer import load_tokenizer

    files = _inputs(cfg.documents, cfg.name)
    info = load_tokenizer(tokenizer_dir, log=lambda m: None)
    key = hashlib.sha256(json.dumps({"files": sorted(content_sha256(f) for f in files), "tokenizer": info.hash,
                                     "text_column": cfg.text_column}).encode()).hexdigest()[:16]
    root = os.path.join(out_dir, CANDIDATES_DIR, f"{cfg.name}-{key}")
    shards = os.path.join(root, "02_tokenize", "shards")
    if os.path.isfile(os.path.join(root, "02_tokenize", "stats.json")) and os.path.isfile(
            os.path.join(shards, AVAILABILITY_FILE)):
        log(f"[probe] candidate {cfg.name}: reusing its shards {shards}")
        return shards
    from kiln.curation import pipeline
    from kiln.curation.spark import get_spark

    recipe = pipeline.parse_recipe({
        "pipeline": {"input": files, "output": root, "stages": ["extract", "tokenize"], "overwrite": True},
        "read": {"text_column": cfg.text_column},
        "tokenize": {"tokenizer": tokenizer_dir, "default_domain": cfg.name},
    }, where=f"[[candidate]] {cfg.name}")
    from pyspark.sql import SparkSession

    planned = pipeline.plan(recipe)
    log(f"[probe] candidate {cfg.name}: tokenizing {len(files)} file(s) with the base's tokenizer into {root}")
    started = SparkSession.getActiveSession() is None
    spark = get_spark("kiln-probe")
    try:
        stats = pipeline.run(spark, recipe, planned=planned, log=log)
    finally:
        if started:  # the JVM would otherwise hold its memory through every arm's training
            spark.stop()
    if stats[-1].kept == 0:
        raise ConfigError(f"[[candidate]] {cfg.name}: no document of {', '.join(cfg.documents)} survived reading "
                          f"and tokenizing (dropped: {stats[0].dropped or stats[-1].dropped})")
    return shards
