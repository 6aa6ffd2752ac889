"""Tokenizer training and token shards per domain (DESIGN.md contract 3).

`train_tokenizer` trains a byte-level BPE on a bounded sample of text on the driver
and saves it so both `tokenizers` and transformers' `AutoTokenizer` load it offline.
`TokenizeStage` writes the corpus as flat token files, one per domain and Spark
partition: `SHARDS/<domain>/part-<partition:05d>.bin` (little-endian uint16, or
uint32 when an id does not fit, every document followed by EOS) beside an index
`part-<partition:05d>.json` (tokenizer hash, dtype, document offsets and ids, token
count). After the write, the driver checks every shard against its index and the
stage's token count, and writes `SHARDS/availability.json`, the tokens per domain
that the mixer reads. `read_index`, `load_shard`, `iter_documents` and
`shard_indexes` are the trainer's side of the contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import quote

import numpy as np
import pyarrow as pa

from kiln.config import ConfigError
from kiln.curation import paths, schema
from kiln.curation.spark import ship_file
from kiln.curation.stage import Stage, one_thread_per_core, output_schema, set_columns, text_bytes
from kiln.curation.stats import StageStats

EOS_TOKEN, PAD_TOKEN, BOS_TOKEN = "<|endoftext|>", "<|pad|>", "<|begin_of_text|>"
# EOS first, so that it gets id 0; the header and end-of-turn tokens are reserved now
# for post-training's chat format, because adding tokens later changes the vocabulary.
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, BOS_TOKEN, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

TOKENIZER_FILE, AVAILABILITY_FILE = "tokenizer.json", "availability.json"
SHARD_FORMAT, AVAILABILITY_FORMAT = "kiln-tokens-v1", "kiln-availability-v1"
UINT16_MAX_ID = 2**16 - 1
# Characters given to one encode call at most, besides `batch_size` documents: the
# Encoding objects of a chunk are held at once, and documents may be megabytes.
ENCODE_CHARS = 8_000_000


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Training


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 8192, min_frequency: int = 2,
                    special_tokens: list[str] = SPECIAL_TOKENS, log=_log) -> dict:
    """Train a byte-level BPE on `texts` and save it in `out_dir` (tokenizer.json and
    tokenizer_config.json): `tokenizers.Tokenizer.from_file(out_dir/tokenizer.json)`
    and `AutoTokenizer.from_pretrained(out_dir)` both load it offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if EOS_TOKEN not in special_tokens:
        raise ConfigError(f"special tokens {special_tokens}: {EOS_TOKEN!r} is missing (it separates documents)")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ConfigError(f"vocab_size {vocab_size}: below the {len(alphabet)} byte symbols "
                          f"plus {len(special_tokens)} special tokens")
    t0 = time.time()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Every byte starts in the vocabulary, so text the sample never showed (another
    # script, an emoji) still encodes, as bytes, instead of becoming an unknown token.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), initial_alphabet=alphabet,
                                  show_progress=False)
    seen = {"documents": 0, "chars": 0}

    def counted(stream: Iterable[str]) -> Iterator[str]:
        for text in stream:
            seen["documents"] += 1
            seen["chars"] += len(text)
            yield text

    tokenizer.train_from_iterator(counted(texts), trainer)
    if not seen["documents"]:
        raise ConfigError("tokenizer training: no text given")

    present = set(special_tokens)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN if PAD_TOKEN in present else None,
        bos_token=BOS_TOKEN if BOS_TOKEN in present else None,
        extra_special_tokens=[t for t in special_tokens if t not in (EOS_TOKEN, PAD_TOKEN, BOS_TOKEN)],
    )
    os.makedirs(out_dir, exist_ok=True)
    # save_pretrained writes tokenizer.json itself (with a no-op post-processor that
    # transformers adds), so the hash that shards record is taken from its file.
    hf.save_pretrained(out_dir)
    path = os.path.join(out_dir, TOKENIZER_FILE)
    info = {"path": path, "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
            "hash": file_sha256(path), "seconds": round(time.time() - t0, 2), **seen}
    if info["vocab_size"] < vocab_size:
        log(f"tokenizer: the sample supports only {info['vocab_size']} tokens of the {vocab_size} asked for "
            f"(no pair left occurring {min_frequency}+ times)")
    log(f"tokenizer: {info['vocab_size']} tokens from {seen['documents']} texts ({seen['chars']} chars) "
        f"in {info['seconds']:.1f}s -> {path}")
    return info


def iter_texts(inputs: list[str], text_column: str = "text", max_chars: int = 0) -> Iterator[str]:
    """Texts from Parquet files, JSONL(.gz/.zst) files or kiln stage directories (their
    docs/); rows without text are skipped. With `max_chars` > 0 the stream stops after
    that many characters, the last text cut to fit: a tokenizer is trained on the
    driver, in one process, from a bounded sample of the corpus, not all of it."""
    seen = 0
    for path in paths.document_files(inputs):
        for text in _file_texts(path, text_column):
            if not isinstance(text, str) or not text.strip():
                continue
            if max_chars and seen + len(text) >= max_chars:
                yield text[:max_chars - seen]
                return
            seen += len(text)
            yield text


def _file_texts(path: str, text_column: str) -> Iterator:
    fmt = paths.detect_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with paths.open_binary(path) as f:
            parquet = pq.ParquetFile(f)
            if text_column not in parquet.schema_arrow.names:
                raise ConfigError(f"{path}: no column {text_column!r} "
                                  f"(columns: {', '.join(parquet.schema_arrow.names)})")
            # Row group by row group: a sample must not read a whole large file first.
            for batch in parquet.iter_batches(columns=[text_column]):
                yield from batch.column(0).to_pylist()
    elif fmt == "jsonl":
        import orjson

        from kiln.curation.labelled import jsonl_rows

        for _where, row in jsonl_rows(path, orjson):
            yield row.get(text_column)
    else:
        raise ConfigError(f"{path}: WARC holds HTML, not text; extract it first (kiln curate) and train on that")


# ---------------------------------------------------------------------------
# A tokenizer file and what shards need to know of it


@dataclass
class TokenizerInfo:
    path: str  # the tokenizer.json
    hash: str  # sha256 of its bytes: shards record it, so a trainer can refuse a mismatched tokenizer
    vocab_size: int  # with added (special) tokens
    eos_id: int  # the token appended after every document
    dtype: str  # "uint16" when every id fits, else "uint32"
    eos_token: str = EOS_TOKEN
    _tokenizer: object = field(default=None, repr=False, compare=False)

    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer`, loaded on first use (it is not pickled with the info)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(self.path)
        return self._tokenizer

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(path: str, eos_token: str = "", log=_log) -> TokenizerInfo:
    """`path` is a tokenizer.json or a directory holding one. The EOS token is
    `eos_token`, else the eos_token of a tokenizer_config.json beside the file, else
    <|endoftext|>."""
    from tokenizers import Tokenizer

    if not path:
        raise ConfigError("tokenize: no tokenizer given (a tokenizer.json, or the directory train_tokenizer wrote)")
    file = Path(path) / TOKENIZER_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for unparsable files
        raise ConfigError(f"{file}: not a tokenizers tokenizer.json ({str(e).splitlines()[0][:200]})") from e
    eos_token = eos_token or _configured_eos(file.parent / "tokenizer_config.json") or EOS_TOKEN
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise ConfigError(f"{file}: no end-of-sequence token {eos_token!r} in the vocabulary "
                          "(documents in a shard are separated by it)")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    # The largest id decides, not the count: ids need not be contiguous.
    max_id = max(tokenizer.get_vocab(with_added_tokens=True).values())
    dtype = "uint16" if max_id <= UINT16_MAX_ID else "uint32"
    if dtype == "uint32":
        log(f"{file}: token ids go up to {max_id}, past uint16's {UINT16_MAX_ID}; "
            "token shards are written as uint32 (4 bytes a token)")
    return TokenizerInfo(path=str(file.resolve()), hash=file_sha256(str(file)), vocab_size=vocab_size,
                         eos_id=eos_id, dtype=dtype, eos_token=eos_token, _tokenizer=tokenizer)


def _configured_eos(config_path: Path) -> str:
    if not config_path.is_file():
        return ""
    try:
        eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"{config_path}: not a JSON object: {e}") from e
    # Older transformers wrote special tokens as {"content": ..., "lstrip": ...}.
    return eos.get("content", "") if isinstance(eos, dict) else (eos or "")


# One Tokenizer per Python worker process, keyed by the shipped file's name (which
# holds the tokenizer's hash, so a reused worker never serves an earlier tokenizer).
_TOKENIZERS: dict[str, object] = {}


def worker_tokenizer(filename: str):
    if filename not in _TOKENIZERS:
        from pyspark import SparkFiles
        from tokenizers import Tokenizer

        local = filename if os.path.isabs(filename) and os.path.exists(filename) else SparkFiles.get(filename)
        _TOKENIZERS[filename] = Tokenizer.from_file(local)
    return _TOKENIZERS[filename]


# ---------------------------------------------------------------------------
# The stage


@dataclass
class TokenizeConfig:
    tokenizer: str = ""  # tokenizer.json, or a directory holding one (what train_tokenizer wrote)
    shards_dir: str = ""  # where shards and availability.json go (local or shared filesystem); emptied at start
    domain_column: str = "domain"  # shards are grouped by this column; without it every document is default_domain
    default_domain: str = "general"  # domain of documents whose domain is missing or empty
    max_doc_chars: int = 1_000_000  # longer documents are dropped as doc_too_long; 0 = no limit
    batch_size: int = 256  # documents per encode call (bounds the encodings held at once)
    eos_token: str = ""  # document separator; empty = the tokenizer_config.json's eos_token, else <|endoftext|>


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


class _ShardWriter:
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
        self._shipped_name = ship_file(spark, self.info.path, key=self.info.hash[:16])

    def process_partition(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        task = TaskContext.get()
        partition, attempt = (task.partitionId(), task.attemptNumber()) if task else (0, 0)
        one_thread_per_core()
        tokenizer = worker_tokenizer(self._shipped_name)
        header = {"format": SHARD_FORMAT, "tokenizer_hash": self.info.hash, "vocab_size": self.info.vocab_size,
                  "eos_id": self.info.eos_id, "dtype": self.info.dtype}
        writers: dict[str, _ShardWriter] = {}

        def writer(domain: str) -> _ShardWriter:
            if domain not in writers:
                writers[domain] = _ShardWriter(self.shards_dir, domain, partition, attempt, header)
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
                w.add([ids[i] for i, _ in docs], lengths, np.array(flat, dtype=_numpy_dtype(self.info.dtype)))
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
            _check_size(index_path, index)
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
        availability = {
            "format": AVAILABILITY_FORMAT, "tokenizer_hash": self.info.hash, "vocab_size": self.info.vocab_size,
            "eos_id": self.info.eos_id, "dtype": self.info.dtype, "tokenizer": self.info.path,
            "domains": dict(sorted(domains.items())), "total_tokens": total_tokens, "total_documents": total_docs,
        }
        tmp = os.path.join(self.shards_dir, f".{AVAILABILITY_FILE}.tmp")
        os.makedirs(self.shards_dir, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(availability, f, indent=2)
        os.replace(tmp, os.path.join(self.shards_dir, AVAILABILITY_FILE))
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


def _numpy_dtype(dtype: str) -> np.dtype:
    # Explicitly little-endian: the contract's byte order, whatever the machine's.
    return np.dtype(dtype).newbyteorder("<")


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


# ---------------------------------------------------------------------------
# Readers (the trainer's side)


class ShardError(RuntimeError):
    """A token shard that does not match its index or the stage's counts."""


def read_index(index_path: str) -> dict:
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{index_path}: shard index not found") from e
    except ValueError as e:
        raise ConfigError(f"{index_path}: shard index is not JSON: {e}") from e
    if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT:
        raise ConfigError(f"{index_path}: not a {SHARD_FORMAT} shard index")
    return index


def _tokens_path(index_path: str, index: dict) -> str:
    return os.path.join(os.path.dirname(index_path), index.get("tokens_file") or
                        os.path.basename(index_path).removesuffix(".json") + ".bin")


def _check_size(index_path: str, index: dict) -> None:
    tokens_path = _tokens_path(index_path, index)
    expected = index["num_tokens"] * np.dtype(index["dtype"]).itemsize
    actual = os.path.getsize(tokens_path) if os.path.exists(tokens_path) else None
    if actual != expected:
        raise ShardError(f"{tokens_path}: {'missing' if actual is None else f'{actual} bytes'}, "
                         f"its index says {index['num_tokens']} {index['dtype']} tokens ({expected} bytes)")


def load_shard(index_path: str) -> tuple[np.memmap, dict]:
    """The shard's tokens, memory-mapped read-only, and its index."""
    index = read_index(index_path)
    _check_size(index_path, index)
    tokens = np.memmap(_tokens_path(index_path, index), dtype=_numpy_dtype(index["dtype"]), mode="r",
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
