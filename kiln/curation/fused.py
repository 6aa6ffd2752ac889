"""Fused stages: consecutive per-document stages in one Spark pass.

Run one by one, every stage reads Parquet, round-trips Arrow and writes its whole
table, text included, again: for a cheap stage (fastText quality) that plumbing costs
more than the work. A fused group reads its input once, hands each Arrow batch from
stage to stage in the same Python worker (a stage's kept rows are the next one's
input), and writes once: the last stage's kept rows, and every stage's dropped rows
under that stage's own directory.

Accounting stays per stage and exact. Each task counts, for every stage of the group,
its rows in, kept, dropped by reason, bytes in and kept, characters kept and the
stage's metrics (`Stage.batch_metrics`), and writes them as one small JSON file per
partition under the group's staging directory, renamed into place when complete. A
retried or speculative attempt of a partition computes the same counts from the same
rows, so whichever attempt's file lands is right; the driver requires one file per
partition, sums them, and checks the dropped and kept counts against the Parquet
footers of what the write committed. Every stage still gets its own stats.json with
in = kept + Σ dropped, and `--write-dropped` its own `dropped/drop_reason=.../`; the
dropped rows carry the group's columns, those of later stages null.

Boundaries: a stage whose `fusable()` is false (dedup, tokenize, a quality cut at a
corpus quantile) runs alone; one whose `prepare` reads its whole input
(`needs_corpus_pass`: the token-KL reference) may start a group but not join one. An
intermediate stage of a group writes stats.json (and dropped/) but no docs/: a relaunch
reuses a group only whole, and recomputes it from its input otherwise.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame

from kiln.config import ConfigError
from kiln.curation import paths
from kiln.curation.spark import spark_type
from kiln.curation.stage import (DOCS_DIR, DROPPED_DIR, OWNER_FILE, STATS_FILE, Stage, StageResult, output_schema,
                                 with_fault)
from kiln.formats import schema
from kiln.formats.stats import StageStats

STAGE_COLUMN = "_kiln_stage"  # the index in the group of the stage that dropped a row (a partition column)
STATS_DIR = "_fused_stats"
TIMES = ("seconds", "cpu_seconds", "input_seconds", "input_cpu_seconds", "setup_seconds",
         "setup_cpu_seconds")  # a partition's count file's clocks
DEFAULT = "__HIVE_DEFAULT_PARTITION__"


def groups(stages: list[Stage]) -> list[list[int]]:
    """Indices of `stages` in runs that share one pass: consecutive fusable stages, a
    stage that needs a corpus pass only at a run's start."""
    out: list[list[int]] = []
    for i, stage in enumerate(stages):
        if out and stage.fusable() and not stage.needs_corpus_pass() and stages[out[-1][-1]].fusable():
            out[-1].append(i)
        else:
            out.append([i])
    return out


class FusedGroup:
    """The group's stages as one partition function over Arrow batches."""

    def __init__(self, stages: list[Stage], input_schema: pa.Schema, stats_dir: str):
        self.stages, self.stats_dir = stages, stats_dir
        self.schemas = []  # each stage's output schema (with drop_reason and in_bytes)
        current = input_schema
        for s in stages:
            out = output_schema(s, current)
            self.schemas.append(out)
            current = pa.schema([f for f in out if f.name not in (schema.DROP_REASON, schema.IN_BYTES)])
        fields: dict[str, pa.Field] = {}
        for out in self.schemas:  # the union, later stages' types winning
            for f in out:
                if f.name != schema.IN_BYTES:
                    fields[f.name] = f
        self.kept_schema = current
        self.schema = pa.schema([*fields.values(), pa.field(STAGE_COLUMN, pa.int32())])
        # Asked here, on the driver: metrics() builds Spark Columns, which need the driver's context
        self.with_metrics = [bool(s.metrics()) for s in stages]

    def process_partition(self, batches):
        from pyspark import TaskContext

        ctx = TaskContext.get()
        counts = [_Counts() for _ in self.stages]
        self._open(counts)
        pending: list[pa.RecordBatch] = []
        stream = self._timed_input(batches, counts[0])
        for k, stage in enumerate(self.stages):
            stream = self._split(k, stage, stage.process_partition(stream), counts[k], pending)
        for kept in stream:
            yield from pending
            pending.clear()
            if kept.num_rows:
                yield self._widen(kept, None)
        yield from pending
        if ctx is not None:
            self._write_counts(ctx.partitionId(), ctx.attemptNumber(), counts)

    def _open(self, counts) -> None:
        """Each stage's per-worker set-up (`Stage.open`: loading a model), timed apart
        from its per-document work; a worker's first task pays it, later ones find it
        loaded. The first stage's also holds the worker's Arrow warm-up: pyarrow imports
        pandas at its first conversion of Python objects (about 0.4 CPU seconds), which
        would otherwise land in whichever stage converts first."""
        start = _clock()
        pa.array([0])
        counts[0].setup.add(start)
        for stage, c in zip(self.stages, counts):
            start = _clock()
            stage.open()
            c.setup.add(start)

    @staticmethod
    def _timed_input(batches, counts):
        """The partition's input batches; `counts.input` is the time this worker spent
        receiving them (waiting for the JVM, Arrow deserialisation), which belongs to
        the group's one read, not to its first stage."""
        it = iter(batches)
        while True:
            start = _clock()
            batch = next(it, None)
            counts.input.add(start)
            if batch is None:
                return
            yield batch

    def _split(self, k: int, stage: Stage, outputs, counts, pending: list):
        """Stage k's output batches: counted, dropped rows queued (widened to the group's
        schema), kept rows passed on without drop_reason and in_bytes. `counts.time` is
        the time spent producing them, upstream stages included (the driver takes
        differences: each stage's own cost, its share of the plumbing with it)."""
        start = _clock()
        for out in outputs:
            counts.add(stage, out, self.with_metrics[k])
            reasons = out.column(schema.DROP_REASON)
            dropped = pc.is_valid(reasons)
            if counts.last_dropped:
                pending.append(self._widen(out.filter(dropped), k))
            kept = out.filter(pc.invert(dropped)).select([f.name for f in self.schemas[k]
                                                          if f.name not in (schema.DROP_REASON, schema.IN_BYTES)])
            counts.time.add(start)
            if kept.num_rows:
                yield kept
            start = _clock()
        counts.time.add(start)

    def _widen(self, batch: pa.RecordBatch, k: int | None) -> pa.RecordBatch:
        arrays = []
        for f in self.schema:
            if f.name == STAGE_COLUMN:
                arrays.append(pa.array([k] * batch.num_rows, type=pa.int32()))
            elif f.name in batch.schema.names:
                arrays.append(batch.column(f.name).cast(f.type))
            else:
                arrays.append(pa.nulls(batch.num_rows, type=f.type))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _write_counts(self, partition: int, attempt: int, counts: list) -> None:
        final = paths.join(self.stats_dir, f"part-{partition:05d}.json")
        tmp = f"{final}.attempt-{attempt}.tmp"
        paths.write_text(tmp, json.dumps([c.to_dict() for c in counts]))
        paths.move(tmp, final)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class _Time:
    """Wall and CPU seconds of this worker process, summed over intervals. CPU time
    leaves out waiting for a core (workers share cores with each other and the JVM)
    and, for a sandboxed stage (extraction), the sandbox process's own work."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def add(self, start: tuple[float, float]) -> None:
        wall, cpu = _clock()
        self.wall += wall - start[0]
        self.cpu += cpu - start[1]


class _Counts:
    """One stage's totals over the batches of one partition."""

    def __init__(self):
        self.rows = self.kept = self.bytes_in = self.bytes_kept = self.chars_kept = 0
        self.dropped: Counter = Counter()
        self.metrics: Counter = Counter()
        self.last_dropped = 0
        self.time = _Time()  # producing this stage's output, upstream stages included
        self.input = _Time()  # the first stage's: receiving the group's input batches
        self.setup = _Time()  # Stage.open: per-worker set-up before the first batch

    def add(self, stage: Stage, out: pa.RecordBatch, with_metrics: bool) -> None:
        """Vectorised (Arrow compute, as Spark's octet_length and length count): these
        totals must not cost the per-document work fusing saves."""
        reasons = out.column(schema.DROP_REASON)
        kept = pc.is_null(reasons)
        n_kept = pc.sum(kept.cast(pa.int64())).as_py() or 0
        self.rows += out.num_rows
        self.kept += n_kept
        if schema.IN_BYTES in out.schema.names:
            self.bytes_in += pc.sum(out.column(schema.IN_BYTES)).as_py() or 0
        if n_kept and schema.TEXT in out.schema.names:
            texts = out.column(schema.TEXT).filter(kept)
            self.bytes_kept += pc.sum(pc.binary_length(texts)).as_py() or 0
            self.chars_kept += pc.sum(pc.utf8_length(texts)).as_py() or 0
        self.last_dropped = out.num_rows - n_kept
        if self.last_dropped:
            for item in pc.value_counts(reasons.drop_null()).to_pylist():
                self.dropped[item["values"]] += item["counts"]
        if with_metrics:
            self.metrics.update(stage.batch_metrics(out))

    def to_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "bytes_in": self.bytes_in, "bytes_kept": self.bytes_kept,
                "chars_kept": self.chars_kept, "dropped": dict(self.dropped), "metrics": dict(self.metrics),
                "seconds": self.time.wall, "cpu_seconds": self.time.cpu, "input_seconds": self.input.wall,
                "input_cpu_seconds": self.input.cpu, "setup_seconds": self.setup.wall,
                "setup_cpu_seconds": self.setup.cpu}


def run_group(spark, stages: list[Stage], df, out_dirs: list[str], write_dropped: bool, fingerprints: list[str],
              log, overwrite: bool = False) -> list[StageResult]:
    """Run `stages` (a fused group) over `df` in one pass; writes each stage's stats.json
    (and dropped/), the last stage's docs/; returns one StageResult per stage."""
    from pyspark.sql.pandas.types import to_arrow_schema

    from kiln.curation.stage import check_output

    names = [s.name for s in stages]
    for stage, out_dir in zip(stages, out_dirs):
        check_output(out_dir, stage.name, overwrite)
    t0 = time.time()
    log(f"[fused] {' -> '.join(names)}: one pass")
    for stage in stages:
        log(f"[{stage.name}] settings {json.dumps(stage.settings(), sort_keys=True, default=str)}")
        stage.prepare(spark, df)
    last = out_dirs[-1]
    for stage, out_dir in zip(stages, out_dirs):
        paths.write_text(paths.join(out_dir, OWNER_FILE), stage.name + "\n")
        for name in (STATS_FILE, DOCS_DIR, DROPPED_DIR, "_staging"):
            paths.remove(paths.join(out_dir, name))
    staging = paths.join(last, "_staging")
    stats_dir = paths.join(last, "_staging_counts")
    paths.remove(stats_dir)
    input_schema = to_arrow_schema(df.schema, timezone="UTC") if isinstance(df, DataFrame) else df.arrow_schema
    group = FusedGroup(stages, input_schema, stats_dir)
    fn = with_fault(names, group.process_partition)
    out = df.mapInArrow(fn, spark_type(group.schema)) if isinstance(df, DataFrame) else \
        df.map_in_arrow(fn, spark_type(group.schema))
    partitions = out.rdd.getNumPartitions()
    log(f"[fused] running ({partitions} partitions)")
    out.write.partitionBy(STAGE_COLUMN, schema.DROP_REASON).parquet(staging)
    seconds = round(time.time() - t0, 2)
    counts = _read_counts(stats_dir, partitions, names)
    footers = _footer_counts(staging)
    results = []
    for k, (stage, out_dir) in enumerate(zip(stages, out_dirs)):
        c = counts[k]
        stats = StageStats(stage=stage.name, docs_in=c["rows"], kept=c["kept"], bytes_in=c["bytes_in"],
                           bytes_kept=c["bytes_kept"], chars_kept=c["chars_kept"],
                           dropped=dict(sorted(c["dropped"].items(), key=lambda kv: (-kv[1], kv[0]))))
        if stage.metrics():
            stats.extra["metrics"] = {m: c["metrics"].get(m, 0) for m in stage.metrics()}
        stats.check()
        if footers.get(str(k), {}) != c["dropped"]:
            raise RuntimeError(f"[{stage.name}] fused counts {c['dropped']} differ from the rows written "
                               f"{footers.get(str(k), {})}")
        if k < len(stages) - 1 and counts[k + 1]["rows"] != c["kept"]:
            raise RuntimeError(f"[{stage.name}] kept {c['kept']} rows but {names[k + 1]} saw {counts[k + 1]['rows']}")
        if write_dropped and c["dropped"]:
            for reason_dir in paths.list_dir(paths.join(staging, f"{STAGE_COLUMN}={k}")) or []:
                paths.move(paths.join(staging, f"{STAGE_COLUMN}={k}", reason_dir),
                           paths.join(out_dir, DROPPED_DIR, reason_dir))
        results.append((stage, out_dir, stats))
    kept_dir = paths.join(staging, f"{STAGE_COLUMN}={DEFAULT}", f"{schema.DROP_REASON}={DEFAULT}")
    docs = paths.join(last, DOCS_DIR)
    if results[-1][2].kept:
        if footers.get(DEFAULT, {}).get(None) != results[-1][2].kept:
            raise RuntimeError(f"[{names[-1]}] counted {results[-1][2].kept} kept rows, wrote "
                               f"{footers.get(DEFAULT, {}).get(None)}")
        paths.move(kept_dir, docs)
    else:
        from pyspark.sql.pandas.types import from_arrow_schema

        spark.createDataFrame([], from_arrow_schema(group.kept_schema)).write.parquet(docs)
    paths.remove(staging)
    paths.remove(stats_dir)
    out_results = []
    upstream = 0.0
    for k, ((stage, out_dir, stats), fingerprint) in enumerate(zip(results, fingerprints)):
        stage.finish(stats)
        stats.extra["seconds"] = seconds  # the group's wall time
        # the seconds of this stage's own processing and its plumbing in the workers, wall
        # (task_seconds) and CPU (task_cpu_seconds); the group's input (receiving the
        # batches) is the first stage's input_seconds / input_cpu_seconds
        if k == 0:
            upstream = {key: counts[0][f"input_{key}"] for key in ("seconds", "cpu_seconds")}
            for key, value in upstream.items():
                stats.extra[f"input_{key}"] = round(value, 3)
        for key, value in upstream.items():
            stats.extra[f"task_{key}"] = round(counts[k][key] - value, 3)
        for key in ("seconds", "cpu_seconds"):  # Stage.open in each worker, apart from the task time
            stats.extra[f"setup_{key}"] = round(counts[k][f"setup_{key}"], 3)
        upstream = {key: counts[k][key] for key in ("seconds", "cpu_seconds")}
        stats.extra["fingerprint"] = fingerprint
        stats.extra["settings"] = stage.settings()
        stats.extra["fused"] = names
        paths.write_text(paths.join(out_dir, STATS_FILE), stats.to_json())
        log(f"[{stage.name}] in={stats.docs_in} kept={stats.kept} dropped={stats.dropped_total} (fused)")
        out_results.append(StageResult(kept=None, stats=stats))
    out_results[-1].kept = spark.read.parquet(docs)
    log(f"[fused] {' -> '.join(names)} done ({seconds:.1f}s)")
    return out_results


def _read_counts(stats_dir: str, partitions: int, names: list[str]) -> list[dict]:
    """The per-partition counts summed; every partition must have written its file."""
    files = [f for f in (paths.list_dir(stats_dir) or []) if f.endswith(".json")]
    if len(files) != partitions:
        raise RuntimeError(f"[fused {', '.join(names)}] {len(files)} of {partitions} partitions recorded their "
                           f"counts in {stats_dir}")
    total = [{"rows": 0, "kept": 0, "bytes_in": 0, "bytes_kept": 0, "chars_kept": 0, "dropped": Counter(),
              "metrics": Counter(), **dict.fromkeys(TIMES, 0.0)} for _ in names]
    for name in files:
        for t, c in zip(total, json.loads(paths.read_text(paths.join(stats_dir, name)))):
            for key in ("rows", "kept", "bytes_in", "bytes_kept", "chars_kept", *TIMES):
                t[key] += c[key]
            t["dropped"].update(c["dropped"])
            t["metrics"].update(c["metrics"])
    for t in total:
        t["dropped"] = dict(t["dropped"])
    return total


def _footer_counts(staging: str) -> dict[str, dict]:
    """Rows written per stage index and drop reason (None = kept), from the footers."""
    out: dict[str, dict] = {}
    for stage_dir in paths.list_dir(staging) or []:
        if not stage_dir.startswith(f"{STAGE_COLUMN}="):
            continue
        k = paths.unescape_partition(stage_dir.split("=", 1)[1])
        for reason_dir, rows in paths.parquet_rows_by_dir(paths.join(staging, stage_dir)).items():
            reason = paths.unescape_partition(reason_dir.split("=", 1)[1])
            out.setdefault(k, {})[None if reason == DEFAULT else reason] = rows
    return out


def explicit_groups(stages: list[Stage], names: list[list[str]], where: str) -> list[list[int]]:
    """`[pipeline] fuse_groups` as indices: each group consecutive stages of the recipe,
    each member fusable, a stage that needs a corpus pass only first; the stages no
    group names run alone. A group across a corpus-wide stage is refused with the reason."""
    order = [s.name for s in stages]
    grouped: dict[int, list[int]] = {}
    for group in names:
        missing = [n for n in group if n not in order]
        if missing:
            raise ConfigError(f"{where}: fuse_groups names {missing[0]!r}, not a stage of this pipeline")
        at = [order.index(n) for n in group]
        if at != list(range(at[0], at[0] + len(at))):
            raise ConfigError(f"{where}: fuse_groups {group}: a group is consecutive stages, in pipeline order")
        for i in at:
            s = stages[i]
            if not s.fusable():
                raise ConfigError(f"{where}: fuse_groups {group}: {s.name!r} cannot be fused: it needs the whole "
                                  "corpus (a shuffle, a corpus-wide cut or side outputs), so it is a fusion boundary")
            if i != at[0] and s.needs_corpus_pass():
                raise ConfigError(f"{where}: fuse_groups {group}: {s.name!r} reads its whole input before it runs "
                                  "(the token-KL reference), so it can only start a group")
            if i in grouped:
                raise ConfigError(f"{where}: fuse_groups: {s.name!r} is in two groups")
            grouped[i] = at
    out, i = [], 0
    while i < len(stages):
        out.append(grouped.get(i, [i]))
        i = out[-1][-1] + 1
    return out
