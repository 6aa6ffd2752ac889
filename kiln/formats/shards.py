"""Token shards and availability.json (DESIGN.md contract 3): the one definition that
the tokenize stage writes and the trainer and the mixer read.

A domain's shards live in `SHARDS/<domain>/` (the domain's name percent-encoded):
`part-NNNNN.bin` holds little-endian uint16 (or uint32) token ids, every document
followed by EOS, and `part-NNNNN.json` its index (format, tokenizer hash, vocabulary
size, EOS id, dtype, domain, token and document counts, document offsets and ids).
`SHARDS/availability.json` sums tokens and documents per domain: the mixer's input.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import numpy as np

from kiln.config import ConfigError, read_json

SHARD_FORMAT, AVAILABILITY_FORMAT = "kiln-tokens-v1", "kiln-availability-v1"
AVAILABILITY_FILE = "availability.json"
UINT16_MAX_ID = 2**16 - 1


def domain_dirname(domain: str) -> str:
    """A domain's directory under shards_dir: the name percent-encoded, so any value
    (with '/', or '..') is one directory and distinct domains stay distinct."""
    name = quote(domain, safe="")
    # quote leaves '.' alone; a leading one would make '.', '..' or a hidden directory.
    if name.startswith("."):
        name = "%2E" + name[1:]
    return name


def shard_name(partition: int) -> str:
    return f"part-{partition:05d}"


class ShardWriter:
    """One domain's shard of one partition: tokens stream into a temporary file,
    document offsets and ids stay in memory (a few ints per document) for the index."""

    def __init__(self, shards_dir: str, domain: str, partition: int, attempt: int, header: dict):
        self.dir = os.path.join(shards_dir, domain_dirname(domain))
        os.makedirs(self.dir, exist_ok=True)
        self.name = shard_name(partition)
        # Hidden and per attempt: a retried or speculative attempt never writes into
        # another's file, and readers skip names starting with '.'.
        self.tmp = os.path.join(self.dir, f".{self.name}.attempt-{attempt}")
        self.file = open(self.tmp + ".bin", "wb")
        self.index = {**header, "domain": domain, "tokens_file": f"{self.name}.bin"}
        self.offsets = [0]
        self.doc_ids: list[str] = []

    def add(self, doc_ids: list[str], lengths: list[int], tokens: np.ndarray) -> None:
        tokens.tofile(self.file)
        for doc_id, n in zip(doc_ids, lengths):
            self.doc_ids.append(doc_id)
            self.offsets.append(self.offsets[-1] + n)

    def commit(self) -> None:
        """Tokens first, then the index: a reader that finds an index finds its whole
        .bin, and a rerun of the task replaces both."""
        self.file.close()
        index = {**self.index, "num_tokens": self.offsets[-1], "num_docs": len(self.doc_ids),
                 "doc_offsets": self.offsets, "doc_ids": self.doc_ids}
        with open(self.tmp + ".json", "w", encoding="utf-8") as f:
            json.dump(index, f)
        os.replace(self.tmp + ".bin", os.path.join(self.dir, self.name + ".bin"))
        os.replace(self.tmp + ".json", os.path.join(self.dir, self.name + ".json"))

    def abort(self) -> None:
        self.file.close()
        for suffix in (".bin", ".json"):
            if os.path.exists(self.tmp + suffix):
                os.remove(self.tmp + suffix)


def numpy_dtype(dtype: str) -> np.dtype:
    # Explicitly little-endian: the contract's byte order, whatever the machine's.
    return np.dtype(dtype).newbyteorder("<")


class ShardError(RuntimeError):
    """A token shard that does not match its index or the stage's counts."""


def read_index(index_path: str) -> dict:
    index = read_json(index_path, "shard index")
    if index.get("format") != SHARD_FORMAT:
        raise ConfigError(f"{index_path}: not a {SHARD_FORMAT} shard index")
    return index


def tokens_path(index_path: str, index: dict) -> str:
    return os.path.join(os.path.dirname(index_path), index.get("tokens_file") or
                        os.path.basename(index_path).removesuffix(".json") + ".bin")


def check_size(index_path: str, index: dict) -> None:
    path = tokens_path(index_path, index)
    expected = index["num_tokens"] * np.dtype(index["dtype"]).itemsize
    actual = os.path.getsize(path) if os.path.exists(path) else None
    if actual != expected:
        raise ShardError(f"{path}: {'missing' if actual is None else f'{actual} bytes'}, "
                         f"its index says {index['num_tokens']} {index['dtype']} tokens ({expected} bytes)")


def load_shard(index_path: str) -> tuple[np.memmap, dict]:
    """The shard's tokens, memory-mapped read-only, and its index."""
    index = read_index(index_path)
    check_size(index_path, index)
    tokens = np.memmap(tokens_path(index_path, index), dtype=numpy_dtype(index["dtype"]), mode="r",
                       shape=(index["num_tokens"],))
    return tokens, index


def iter_documents(index_path: str) -> Iterator[np.ndarray]:
    """Each document's token ids, without the EOS that ends it (views into the map)."""
    tokens, index = load_shard(index_path)
    offsets = index["doc_offsets"]
    for start, end in zip(offsets[:-1], offsets[1:]):
        yield tokens[start:end - 1]


def shard_indexes(shards_dir: str, domain: str | None = None) -> list[str]:
    """Index files under `shards_dir` (of one domain, if given), sorted."""
    pattern = f"{domain_dirname(domain) if domain is not None else '*'}/part-*.json"
    return sorted(str(p) for p in Path(shards_dir).glob(pattern))


def write_availability(shards_dir: str, availability: dict) -> None:
    """availability.json, replaced atomically: a reader never sees half a file."""
    os.makedirs(shards_dir, exist_ok=True)
    tmp = os.path.join(shards_dir, f".{AVAILABILITY_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": AVAILABILITY_FORMAT, **availability}, f, indent=2)
    os.replace(tmp, os.path.join(shards_dir, AVAILABILITY_FILE))


@dataclass
class Availability:
    tokens: dict[str, int]  # domain -> tokens available, in the file's order
    path: str = ""  # the file it was read from, for error messages; "" if built

    @property
    def domains(self) -> list[str]:
        return list(self.tokens)

    @property
    def total(self) -> int:
        return sum(self.tokens.values())

    def natural(self, domains: list[str] | None = None) -> np.ndarray:
        """p_d = tokens_d / total, in `domains` order (default: the file's)."""
        counts = np.array([self.tokens[d] for d in (domains or self.domains)], dtype=np.float64)
        return counts / counts.sum()

    def describe(self) -> str:
        return self.path or "availability"


def load_availability(source: str | os.PathLike | dict | Availability) -> Availability:
    """Read availability.json (or accept an already-parsed dict / Availability)."""
    if isinstance(source, Availability):
        return source
    path = ""
    if isinstance(source, dict):
        data = source
    else:
        path = str(source)
        if not Path(path).exists():
            raise ConfigError(f"{path}: availability file does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from e
    where = path or "availability"
    if not isinstance(data, dict) or data.get("format") != AVAILABILITY_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{where}: format is {got!r}, expected {AVAILABILITY_FORMAT!r} "
                          "(written by `kiln curate tokenize`)")
    domains = data.get("domains")
    if not isinstance(domains, dict) or not domains:
        raise ConfigError(f"{where}: no domains listed")
    tokens: dict[str, int] = {}
    for name, entry in domains.items():
        n = entry.get("tokens") if isinstance(entry, dict) else None
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"{where}: domain {name!r} has tokens = {n!r}, not a count")
        tokens[str(name)] = n
    if sum(tokens.values()) == 0:
        raise ConfigError(f"{where}: every domain has 0 tokens")
    return Availability(tokens=tokens, path=path)
