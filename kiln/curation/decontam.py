"""Decontamination: documents that share long n-grams with evaluation sets.

GPT-3 and Llama 3 removed training documents that share 13-word sequences with the
benchmarks they report, so a score measures generalisation rather than recall. Here
the user names the evaluation sets (JSONL files, one set per file, named by the file
stem); every string in an item is normalised (lowercase, unicode word characters
only) and each run of `ngram` consecutive words is hashed to 64 bits. The driver
reads the sets, builds one table `hash -> bitmask of sets` and broadcasts it;
per document the stage slides the same window over the same normalisation and looks
each hash up. Each string of an item is its own text, so an n-gram never runs from
the end of a question into its answer: that sequence is not in the benchmark.

"drop" mode drops a matched document as `eval_contamination`; "flag" mode keeps it.
Either way `contaminated_by` lists the sets it matched, and stats.json reports per
set the items read, n-grams indexed, items too short to match, and documents matched.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import asdict, dataclass, field

import orjson
import pyarrow as pa
from pyspark.sql import functions as F

from kiln.config import ConfigError
from kiln.curation import paths
from kiln.formats import schema
from kiln.formats.hashing import content_sha256
from kiln.curation.labelled import jsonl_rows
from kiln.curation.stage import Stage, output_schema, set_columns, text_bytes
from kiln.formats.stats import StageStats

DROP_REASON = "eval_contamination"
MODES = ("drop", "flag")
EVAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


@dataclass
class DecontamConfig:
    eval_sets: list[str] = field(default_factory=list)  # JSONL files, directories or globs; one set per file, named by its stem
    fields: list[str] = field(default_factory=list)  # JSON fields holding evaluation text; empty = every string in each record
    ngram: int = 13  # words per n-gram (GPT-3, Llama 3); shorter runs start matching common phrases
    mode: str = "drop"  # "drop" removes matched documents as eval_contamination; "flag" only fills contaminated_by
    min_matches: int = 1  # distinct shared n-grams needed before a document counts as contaminated by a set


@dataclass
class EvalSet:
    name: str
    path: str
    items: int = 0  # JSON records in the file
    ngrams: int = 0  # distinct n-gram hashes indexed
    short_items: int = 0  # items with no text of `ngram` words: nothing of them can be matched


def ngram_words(text: str) -> list[str]:
    """Lowercased words; punctuation, whitespace and markup between them do not count."""
    return re.findall(r"\w+", text.lower())


def ngram_hash(words: list[str]) -> int:
    # 64 bits keep the broadcast table small; a false match needs a collision with one
    # of a few million indexed hashes (odds about 1e-13 per window).
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


def ngram_hashes(words: list[str], n: int) -> list[int]:
    return [ngram_hash(words[i:i + n]) for i in range(len(words) - n + 1)]


def item_texts(value, fields: list[str]) -> list[str]:
    """The strings of one evaluation item, each its own text: the named fields, or
    every string in the record; strings inside lists and nested objects (answer
    choices) count one by one."""
    if fields:
        value = [value[f] for f in fields if f in value]
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [t for v in value for t in item_texts(v, [])]
    return []  # numbers, booleans, nulls: not text a document could copy


def matched_sets(words: list[str], table: dict[int, int], n: int, min_matches: int, all_sets: int) -> int:
    """Bitmask of the sets sharing at least `min_matches` distinct n-grams with `words`."""
    done = 0
    counts: dict[int, int] = {}  # set bit -> distinct n-grams matched
    seen: set[int] = set()
    for i in range(len(words) - n + 1):
        h = ngram_hash(words[i:i + n])
        sets = table.get(h)
        if sets is None or h in seen:
            continue
        seen.add(h)
        pending = sets & ~done
        while pending:
            bit = pending & -pending
            pending ^= bit
            counts[bit] = counts.get(bit, 0) + 1
            if counts[bit] >= min_matches:
                done |= bit
        if done == all_sets:
            break
    return done


def eval_set_name(path: str) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in EVAL_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    raise ConfigError(f"{path}: an evaluation set must be a JSONL file ({', '.join(EVAL_SUFFIXES)})")


def resolve_eval_sets(inputs: list[str]) -> list[EvalSet]:
    if not inputs:
        raise ConfigError("decontam.eval_sets: no evaluation sets given")
    sets, by_name = [], {}
    for path in paths.expand_inputs(inputs):
        name = eval_set_name(path)
        if name in by_name:
            # The name is what contaminated_by and stats.json report: two files under one name
            # would be indistinguishable there.
            raise ConfigError(f"{path}: evaluation set name {name!r} is also used by {by_name[name]}; rename one")
        by_name[name] = path
        sets.append(EvalSet(name=name, path=path))
    return sets


class DecontamStage(Stage):
    """Drop or flag documents sharing n-grams with evaluation sets.

    Documents sharing a 13-gram (of lower-cased words, punctuation ignored) with an item
    of an evaluation set are dropped as eval_contamination, or flagged in
    contaminated_by with mode = "flag". stats.json counts documents per evaluation set."""
    name = "decontam"

    def __init__(self, cfg: DecontamConfig | None = None):
        self.cfg = cfg or DecontamConfig()
        if self.cfg.mode not in MODES:
            raise ConfigError(f"decontam.mode: expected one of {', '.join(MODES)}, got {self.cfg.mode!r}")
        if self.cfg.ngram < 1:
            raise ConfigError(f"decontam.ngram: expected at least 1 word, got {self.cfg.ngram}")
        if self.cfg.min_matches < 1:
            raise ConfigError(f"decontam.min_matches: expected at least 1, got {self.cfg.min_matches}")
        self.sets = resolve_eval_sets(self.cfg.eval_sets)
        self.all_sets = (1 << len(self.sets)) - 1
        self._digests: dict[str, str] | None = None
        self._table: dict[int, int] | None = None
        self._broadcast = None

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._broadcast is not None:
            state["_table"] = None  # executors read the broadcast instead of a copy in every task
        return state

    def settings(self) -> dict:
        if self._digests is None:
            # The contents, not the paths: an edited benchmark file must invalidate a reused output.
            self._digests = {s.name: content_sha256(s.path, paths.open_binary) for s in self.sets}
        return {**asdict(self.cfg), "eval_sets": self._digests}

    def build_index(self) -> dict[int, int]:
        """Read every evaluation set (on the driver: they are small) into hash -> set bitmask."""
        if self._table is not None:
            return self._table
        table: dict[int, int] = {}
        n = self.cfg.ngram
        for index, s in enumerate(self.sets):
            bit, hashes, has_field = 1 << index, set(), False
            s.items = s.short_items = 0
            for _, record in jsonl_rows(s.path, orjson):
                s.items += 1
                has_field = has_field or not self.cfg.fields or any(f in record for f in self.cfg.fields)
                found = [ngram_hashes(words, n) for words in map(ngram_words, item_texts(record, self.cfg.fields))]
                if not any(found):
                    s.short_items += 1
                for h in found:
                    hashes.update(h)
            if not s.items:
                raise ConfigError(f"{s.path}: evaluation set has no items")
            if not has_field:
                raise ConfigError(f"{s.path}: no item has any of the fields {', '.join(self.cfg.fields)} "
                                  "(decontam.fields)")
            if s.short_items == s.items:
                raise ConfigError(f"{s.path}: all {s.items} items are shorter than {n} words, so none can be "
                                  "matched; lower ngram")
            s.ngrams = len(hashes)
            for h in hashes:
                table[h] = table.get(h, 0) | bit
            print(f"[decontam] {s.name}: {s.items} items, {s.ngrams} {n}-grams, "
                  f"{s.short_items} items shorter than {n} words skipped", file=sys.stderr)
        self._table = table
        return table

    def prepare(self, spark, df) -> None:
        self._broadcast = spark.sparkContext.broadcast(self.build_index())

    @property
    def table(self) -> dict[int, int]:
        return self._broadcast.value if self._broadcast is not None else self.build_index()

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(schema.CONTAMINATED_BY, pa.list_(pa.string()))]

    def contaminated_by(self, texts: list[str | None]) -> list[list[str]]:
        """Per text, the names of the sets it matched (in `eval_sets` order)."""
        table, n = self.table, self.cfg.ngram
        out = []
        for text in texts:
            mask = matched_sets(ngram_words(text), table, n, self.cfg.min_matches, self.all_sets) if text else 0
            out.append([s.name for i, s in enumerate(self.sets) if mask >> i & 1])
        return out

    def open(self) -> None:
        _ = self.table  # the broadcast index (or the index built here), read once per worker

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        texts = batch.column(schema.TEXT).to_pylist()
        matched = self.contaminated_by(texts)
        drop = self.cfg.mode == "drop"
        return set_columns(batch, output_schema(self, batch.schema), {
            schema.CONTAMINATED_BY: matched,
            schema.DROP_REASON: [DROP_REASON if drop and m else None for m in matched],
            schema.IN_BYTES: text_bytes(batch.column(schema.TEXT)),
        })

    @staticmethod
    def metric_name(set_name: str) -> str:
        return f"contaminated_{set_name}"

    def metrics(self) -> dict:
        # Over every output row, dropped ones included: in "drop" mode they are the matches.
        return {self.metric_name(s.name): F.coalesce(
                    F.sum(F.array_contains(F.col(schema.CONTAMINATED_BY), s.name).cast("int")), F.lit(0))
                for s in self.sets}

    def batch_metrics(self, out) -> dict:
        matched = out.column(schema.CONTAMINATED_BY).to_pylist()
        return {self.metric_name(s.name): sum(1 for m in matched if m and s.name in m) for s in self.sets}

    def finish(self, stats: StageStats) -> None:
        self.build_index()  # no-op after prepare; fills the per-set counts otherwise
        counted = stats.extra.get("metrics", {})
        stats.extra["eval_sets"] = {
            s.name: {"items": s.items, "ngrams": s.ngrams, "short_items": s.short_items,
                     "documents": counted.get(self.metric_name(s.name), 0)}
            for s in self.sets
        }

