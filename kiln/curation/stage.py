"""The one place that runs a stage over Spark and accounts for it.

A stage is a small object with `name`, `output_schema(input_schema)` and
`process(batch) -> batch`: per partition, on Arrow batches, one output row per
input row, with `drop_reason` set on the rows it drops. `prepare(spark, df)` is
the hook for a first pass over the corpus (the token-KL reference) or for
shipping a model file to executors. `run_stage` runs the stage once, inside the
write: kept rows land in `OUT/docs/`, dropped rows (when asked) in
`OUT/dropped/drop_reason=<reason>/`, and the counts in `OUT/stats.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from kiln.config import ConfigError
from kiln.curation import paths
from kiln.curation.spark import spark_type
from kiln.formats import schema
from kiln.formats.stats import StageStats

DOCS_DIR, DROPPED_DIR, STATS_FILE = "docs", "dropped", "stats.json"
OWNER_FILE = ".kiln-stage"  # written first into a stage's output directory: the name of the stage that owns it


class Stage:
    name: str = "stage"
    reads_raw: bool = False  # reads raw pages (a reader's table) rather than a document table

    def prepare(self, spark: SparkSession, df: DataFrame) -> None:
        """Driver-side work before the stage runs (first passes, shipping files)."""

    def output_fields(self) -> list[pa.Field]:
        """Columns this stage adds (or replaces)."""
        return []

    def removed_fields(self) -> list[str]:
        """Input columns this stage does not pass on (the extract stage's raw HTML)."""
        return []

    def open(self) -> None:
        """Per-worker set-up before the first batch: load the stage's model or index the
        way `process` will (`load_once`, so later calls are free). A fused group times
        it apart (`setup_seconds`), so a stage's task time is its per-document cost."""

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        raise NotImplementedError

    def process_partition(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """All of one Spark partition; override to hold a resource across its batches."""
        for batch in batches:
            yield self.process(batch)

    def metrics(self) -> dict:
        """Extra totals for stats.json: name -> aggregate Column over the stage's output
        (for example the lines a line-level stage removed)."""
        return {}

    def batch_metrics(self, out: pa.RecordBatch) -> dict | None:
        """`metrics` computed on one output batch in Python (summed over batches): what
        a fused run records, where the stage's output is never a DataFrame of its own.
        None = no such twin, and a stage with metrics but no twin is not fused."""
        return None

    def fusable(self) -> bool:
        """Whether the stage transforms documents one at a time and can share a Spark
        pass with its neighbours (kiln.curation.fused): `process` per partition, no
        internal columns, metrics (if any) with a Python twin. Corpus-wide stages
        (dedup, tokenize, a quality cut at a corpus quantile) are fusion boundaries."""
        own = type(self)  # asked of the class: metrics() builds Spark Columns, and plans are made before Spark starts
        return (own.transform is Stage.transform and own.internal_columns is Stage.internal_columns
                and (own.metrics is Stage.metrics or own.batch_metrics is not Stage.batch_metrics))

    def needs_corpus_pass(self) -> bool:
        """Whether `prepare` reads the stage's whole input (the token-KL reference): such
        a stage may start a fused group, whose input is a written table, but not join one."""
        return False

    def internal_columns(self) -> list[str]:
        """Output columns that feed `metrics` and are not written."""
        return []

    def outputs_intact(self) -> bool:
        """Whether side outputs a reused run relies on are still there (the tokenizer's
        shards); a stage whose stats.json matches but whose side outputs are gone reruns."""
        return True

    def finish(self, stats: StageStats) -> None:
        """Driver-side work after the output is written and counted, before stats.json
        marks it complete: cross-checks and summary files (the tokenizer's availability.json)."""

    def transform(self, df) -> DataFrame:
        """The stage's output rows. Per-document stages keep this default (their
        `process` per partition); corpus-wide ones (dedup) override it with shuffles."""
        return apply_stage(self, df)

    def fingerprint(self) -> str:
        """Identifies the stage's settings, so a relaunch reuses only matching outputs."""
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def settings(self) -> dict:
        return {}


def with_drop_columns(arrow_schema: pa.Schema) -> pa.Schema:
    for name, typ in ((schema.DROP_REASON, pa.string()), (schema.IN_BYTES, pa.int64())):
        if name not in arrow_schema.names:
            arrow_schema = arrow_schema.append(pa.field(name, typ))
    return arrow_schema


def output_schema(stage: Stage, input_schema: pa.Schema) -> pa.Schema:
    out = pa.schema([f for f in input_schema if f.name not in stage.removed_fields()])
    for f in stage.output_fields():
        if f.name in out.names:
            out = out.set(out.get_field_index(f.name), f)
        else:
            out = out.append(f)
    return with_drop_columns(out)


def set_columns(batch: pa.RecordBatch, out_schema: pa.Schema, columns: dict[str, list]) -> pa.RecordBatch:
    """`batch` with `columns` replaced or added, in `out_schema`'s order."""
    arrays = []
    for field in out_schema:
        if field.name in columns:
            value = columns[field.name]
            arrays.append(value.cast(field.type) if isinstance(value, pa.Array) else pa.array(value, type=field.type))
        else:
            arrays.append(batch.column(field.name))
    return pa.RecordBatch.from_arrays(arrays, schema=out_schema)


def apply_stage(stage: Stage, df) -> DataFrame:
    """`df` is a DataFrame, or a reader's RawSource, which fuses reading into the stage."""
    from pyspark.sql.pandas.types import to_arrow_schema

    fn = with_fault(stage.name, stage.process_partition)
    if isinstance(df, DataFrame):
        out_schema = output_schema(stage, to_arrow_schema(df.schema, timezone="UTC"))
        return df.mapInArrow(fn, spark_type(out_schema))
    return df.map_in_arrow(fn, spark_type(output_schema(stage, df.arrow_schema)))


FAULT_ENV = "KILN_FAULT_KILL"


def with_fault(names, fn):
    """`fn` (a partition function), or, when KILN_FAULT_KILL=STAGE:PARTITION names one of
    `names` (a stage name or a fused group's names), `fn` that kills its own Python
    worker with SIGKILL after the first output batch of that partition's first attempt:
    a crashed worker mid-task, for tests of Spark's task retries. Read on the driver
    when the job is built, so it reaches executors on a cluster too."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, partition = spec.partition(":")
    if not spec or name not in ([names] if isinstance(names, str) else names):
        return fn
    target = int(partition or 0)

    def killing(batches):
        from pyspark import TaskContext

        ctx = TaskContext.get()
        doomed = ctx is not None and ctx.partitionId() == target and ctx.attemptNumber() == 0
        for i, out in enumerate(fn(batches)):
            yield out
            if doomed and i == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    return killing


def columns(batch: pa.RecordBatch, names: list[str]) -> dict[str, list]:
    """Python lists of just the named columns: converting every column (timestamps
    into datetime objects, above all) costs more than some stages' own work."""
    return {name: batch.column(name).to_pylist() for name in names}


def in_languages(batch: pa.RecordBatch, languages: list[str]) -> list[bool]:
    """Which rows a language-scoped classifier applies to: all of them without a `lang`
    column or with `languages` empty, else those whose lang is listed."""
    if not languages or schema.LANG not in batch.schema.names:
        return [True] * batch.num_rows
    keep = set(languages)
    return [lang in keep for lang in batch.column(schema.LANG).to_pylist()]


def task_cpus() -> int:
    """Cores Spark gave the running task (spark.task.cpus); 1 outside a task."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    try:
        return max(1, int(ctx.cpus())) if ctx else 1
    except Exception:  # noqa: BLE001 - a context without resource information
        return 1


def one_thread_per_core() -> None:
    """Keep a task's Rust tokenizer on the task's cores. Spark already runs one task per
    core; tokenizers' batch encoding would add a thread per core in every task, and the
    oversubscribed cores run measurably slower (benchmarks/classify_tokenize_throughput)."""
    import os

    if task_cpus() == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def text_bytes(texts: list[str | None] | pa.Array) -> list[int] | pa.Array:
    """UTF-8 bytes of each text (0 for a null). Given the batch's Arrow column, counted
    by Arrow without making Python strings (a per-document stage's plumbing)."""
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        return pc.fill_null(pc.binary_length(texts), 0)
    return [len(t.encode("utf-8", "surrogatepass")) if t else 0 for t in texts]


def is_blank(text: str | None) -> bool:
    """No text or only whitespace (`not text.strip()` without copying the text)."""
    return not text or text.isspace()


@dataclass
class StageResult:
    kept: DataFrame
    stats: StageStats
    result: DataFrame | None = None  # persisted stage output (in-memory runs); release with unpersist()

    def unpersist(self) -> None:
        if self.result is not None:
            self.result.unpersist()


def run_stage(spark: SparkSession, stage: Stage, df, out_dir: str | None,
              write_dropped: bool = False, fingerprint: str = "", log=None, overwrite: bool = False) -> StageResult:
    """Run `stage` over `df` and account for it; with `out_dir`, write its outputs.

    With an output directory the stage runs once, in the write itself: every row goes
    to `OUT/_staging/drop_reason=.../` (kept rows under Spark's null partition), the
    per-reason counts come from the Parquet footers and the byte totals from an
    Observation on the same job, and the directories are then renamed to `docs/` and
    `dropped/`. Nothing is cached, so memory does not grow with the corpus. Without
    one (tests, notebooks) the output is persisted and counted with a groupBy.
    """
    log = log or _log
    if out_dir:
        check_output(out_dir, stage.name, overwrite)
    t0 = time.time()
    log(f"[{stage.name}] settings {json.dumps(stage.settings(), sort_keys=True, default=str)}")
    log(f"[{stage.name}] preparing")
    stage.prepare(spark, df)
    result = stage.transform(df)
    log(f"[{stage.name}] running")
    if out_dir:
        stats = _write_outputs(spark, stage, result, out_dir, write_dropped)
        kept = spark.read.parquet(paths.join(out_dir, DOCS_DIR))
    else:
        result = result.persist(StorageLevel.MEMORY_AND_DISK)
        stats = collect_stats(stage.name, result)
        if stage.metrics():
            row = result.agg(*[c.alias(k) for k, c in stage.metrics().items()]).first()
            stats.extra["metrics"] = {k: row[k] for k in stage.metrics()}
        kept = (result.where(F.col(schema.DROP_REASON).isNull())
                .drop(schema.DROP_REASON, schema.IN_BYTES, *stage.internal_columns()))
    stage.finish(stats)
    stats.extra["seconds"] = round(time.time() - t0, 2)
    stats.extra["fingerprint"] = fingerprint or stage.fingerprint()
    stats.extra["settings"] = stage.settings()
    if out_dir:
        # Written last: its presence marks the stage's output as complete.
        paths.write_text(paths.join(out_dir, STATS_FILE), stats.to_json())
    log(f"[{stage.name}] in={stats.docs_in} kept={stats.kept} dropped={stats.dropped_total} "
        f"({stats.extra['seconds']:.1f}s)")
    return StageResult(kept=kept, stats=stats, result=None if out_dir else result)


KEPT_PARTITION = f"{schema.DROP_REASON}=__HIVE_DEFAULT_PARTITION__"


def output_owner(out_dir: str) -> str:
    """The stage an output directory belongs to: its owner file, else its stats.json's
    stage (outputs of earlier kiln versions); "" when neither says."""
    if paths.exists(paths.join(out_dir, OWNER_FILE)):
        return paths.read_text(paths.join(out_dir, OWNER_FILE)).strip()
    if paths.exists(paths.join(out_dir, STATS_FILE)):
        try:
            return str(json.loads(paths.read_text(paths.join(out_dir, STATS_FILE))).get("stage", ""))
        except (ValueError, AttributeError):
            return ""
    return ""


def check_output(out_dir: str, stage_name: str, overwrite: bool = False) -> None:
    """A stage writes only into a directory that is absent, empty, or an earlier output
    of the same stage; anything else (another stage's output, the user's files) is
    refused before anything is touched, unless `overwrite` says to replace it."""
    entries = paths.list_dir(out_dir)
    if not entries or overwrite:
        return
    owner = output_owner(out_dir)
    if owner == stage_name:
        return
    what = (f"the output of the {owner!r} stage" if owner else
            f"{len(entries)} entries that are not a kiln output ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})")
    raise ConfigError(f"{out_dir}: holds {what}; refusing to write the {stage_name} stage there "
                      "(choose an empty or new directory, or pass --overwrite to replace it)")


def _write_outputs(spark: SparkSession, stage: Stage, result: DataFrame, out_dir: str,
                   write_dropped: bool) -> StageStats:
    from pyspark.sql import Observation

    # Claimed before anything is removed: a relaunch after a crash finds the directory its own.
    paths.write_text(paths.join(out_dir, OWNER_FILE), stage.name + "\n")
    staging = paths.join(out_dir, "_staging")
    # A stats.json left by an earlier run would vouch for outputs this run is replacing.
    paths.remove(paths.join(out_dir, STATS_FILE))
    for name in (DOCS_DIR, DROPPED_DIR, "_staging"):
        paths.remove(paths.join(out_dir, name))
    kept_only = F.when(F.col(schema.DROP_REASON).isNull(), F.col(schema.TEXT))
    stage_name = stage.name
    totals = Observation(f"kiln-{stage_name}")
    observed = result.observe(
        totals,
        F.count(F.lit(1)).alias("rows"),
        F.coalesce(F.sum(schema.IN_BYTES), F.lit(0)).alias("bytes_in"),
        F.coalesce(F.sum(F.octet_length(kept_only)), F.lit(0)).alias("bytes_kept"),
        F.coalesce(F.sum(F.length(kept_only)), F.lit(0)).alias("chars_kept"),
        *[c.alias(f"metric_{k}") for k, c in stage.metrics().items()],
    )
    (observed.drop(schema.IN_BYTES, *stage.internal_columns())
     .write.partitionBy(schema.DROP_REASON).parquet(staging))
    metrics = totals.get

    stats = StageStats(stage=stage_name, docs_in=metrics["rows"], bytes_in=metrics["bytes_in"],
                       bytes_kept=metrics["bytes_kept"], chars_kept=metrics["chars_kept"])
    if stage.metrics():
        stats.extra["metrics"] = {k: metrics[f"metric_{k}"] for k in stage.metrics()}
    for partition, rows in paths.parquet_rows_by_dir(staging).items():
        if partition == KEPT_PARTITION:
            stats.kept = rows
        else:
            stats.dropped[paths.unescape_partition(partition.split("=", 1)[1])] = rows
    stats.dropped = dict(sorted(stats.dropped.items(), key=lambda kv: (-kv[1], kv[0])))
    stats.check()

    docs = paths.join(out_dir, DOCS_DIR)
    if stats.kept:
        paths.move(paths.join(staging, KEPT_PARTITION), docs)
    else:  # still a readable, empty table for the next stage
        kept_schema = result.drop(schema.DROP_REASON, schema.IN_BYTES, *stage.internal_columns()).schema
        spark.createDataFrame([], kept_schema).write.parquet(docs)
    if write_dropped and stats.dropped:
        paths.remove(paths.join(staging, "_SUCCESS"))
        paths.move(staging, paths.join(out_dir, DROPPED_DIR))
    else:
        paths.remove(staging)
    return stats


def completed_stage(spark: SparkSession, out_dir: str, fingerprint: str) -> StageResult | None:
    """A finished earlier run of this stage on the same input and settings, if there is one."""
    stats_path = paths.join(out_dir, STATS_FILE)
    if not paths.exists(stats_path) or not paths.exists(paths.join(out_dir, DOCS_DIR)):
        return None  # no docs/: an intermediate stage of a fused group, which is reused only whole
    stats = StageStats.from_json(paths.read_text(stats_path))
    if stats.extra.get("fingerprint") != fingerprint:
        return None
    return StageResult(kept=spark.read.parquet(paths.join(out_dir, DOCS_DIR)), stats=stats)


def collect_stats(stage: str, result: DataFrame) -> StageStats:
    """Count a stage's output by drop reason. The collect is one row per reason."""
    rows = (
        result.groupBy(schema.DROP_REASON)
        .agg(
            F.count(F.lit(1)).alias("n"),
            F.coalesce(F.sum(schema.IN_BYTES), F.lit(0)).alias("bytes_in"),
            F.coalesce(F.sum(F.octet_length(schema.TEXT)), F.lit(0)).alias("bytes_out"),
            F.coalesce(F.sum(F.length(schema.TEXT)), F.lit(0)).alias("chars_out"),
        )
        .collect()
    )
    stats = StageStats(stage=stage)
    for r in rows:
        stats.docs_in += r["n"]
        stats.bytes_in += r["bytes_in"]
        reason = r[schema.DROP_REASON]
        if reason is None:
            stats.kept = r["n"]
            stats.bytes_kept = r["bytes_out"]
            stats.chars_kept = r["chars_out"]
        else:
            stats.dropped[reason] = r["n"]
    stats.dropped = dict(sorted(stats.dropped.items(), key=lambda kv: (-kv[1], kv[0])))
    stats.check()
    return stats


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
