"""Classifier and tokenizer throughput: kiln's Spark stages against in-process loops.

On the same documents, in one run, this measures

(a) fastText quality scoring: kiln's `QualityStage` through `run_stage` against
    fastText's own `model.predict(lines, k=-1)` over kiln-normalized text in one
    Python process, in documents/s per core;
(b) transformer scoring on CPU: kiln's `ScorerStage` through `run_stage` against
    `Scorer.score` in one process with one torch thread, swept over batch sizes
    (1, 8, 32, 64); the Spark job uses the best in-process batch size and is
    compared with it, in documents/s per core;
(c) tokenization: kiln's `TokenizeStage` (token shards and Parquet written)
    against `tokenizers`' own `encode_batch_fast` in one process, in tokens/s per
    core. That batch encoding is multi-threaded (rayon, one thread per core), so it
    is measured twice: held to one thread (TOKENIZERS_PARALLELISM=false), and with
    every core, whose rate is divided by the machine's cores.

Target: every Spark path >= 0.85x the in-process rate per core.

"Per core" divides a rate by the cores a measurement was given: 1 for a loop held
to one thread, `--cores` for Spark local[N], the machine's cores for the
all-thread tokenizers baseline. The table also shows the cores each measurement
actually kept busy (CPU seconds of this script's processes, Spark's JVM and
Python workers included, over wall seconds), so a side that used more threads
than it was given shows.

The in-process loops only compute, over texts already in memory. kiln's time
includes reading the corpus from Parquet, Arrow batches to and from the Python
workers, writing the output Parquet (and the token shards), and its counts. To
say where a miss comes from, the run also measures that path alone, with a stage
that does no work: a plain Parquet read; the read and the Arrow round trip
through the Python workers; all of run_stage, Parquet written; and run_stage over
a handful of documents, which is what a job costs whatever its size.

The three models are trained at the start from kiln's own labelled sample
(`kiln.demo.build_labels`, seconds each, offline); the corpora are
those labelled texts cycled with distinct ids (`--docs` for tokenization,
`--fasttext-docs` and `--scorer-docs`: sized so each measurement takes seconds,
not fractions of one) and written as Parquet, one equal file per Spark core,
before anything is timed. Spark session
start-up is left out of the timed regions, and each kiln job runs twice on the
same input: the first run in a JVM also pays for compiling that job's code paths
and for the Python workers importing fastText, torch or tokenizers. Both runs are
reported; the targets are judged on the second. The machine is assumed to be
shared: each measurement waits for other processes to go idle and reports how
much CPU they took meanwhile. Nothing here raises on a missed target: it reports.

    python benchmarks/classify_tokenize_throughput.py --cores 2

The table is printed and written with a JSON of the same numbers to
`benchmarks/results/classify_tokenize_throughput_<date>_<host>.{md,json}`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

# Before pyspark is imported: no network, loopback only, and Spark's Python
# workers must run this interpreter (the one with kiln's dependencies).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# tokenizers' default, said out loud: Spark's workers inherit it and encode on all
# their threads, and tokenizers stays quiet when the driver forks the JVM.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from common import (Monitor, NEIGHBOUR_WARNING, Rates, is_ours, log, machine, processes, versions,  # noqa: E402
                    wait_until_quiet, warm_up, write_results)
from kiln.formats import schema  # noqa: E402
from kiln.curation.classify import (QUALITY_NEGATIVE, QUALITY_POSITIVE, FastTextModel,  # noqa: E402
                                    FastTextTrainConfig, QualityConfig, QualityStage, fasttext_line, train_fasttext)
from kiln.curation.labelled import read_labelled  # noqa: E402
from kiln.curation.langid import load_fasttext  # noqa: E402
from kiln.demo import build_labels  # noqa: E402
from kiln.curation.scorer import Scorer, ScorerConfig, ScorerStage, ScorerTrainConfig, train_scorer  # noqa: E402
from kiln.curation.spark import get_spark  # noqa: E402
from kiln.curation.stage import DOCS_DIR, Stage, apply_stage, output_schema, run_stage, set_columns, text_bytes  # noqa: E402
from kiln.curation.token_shards import TokenizeConfig, TokenizeStage  # noqa: E402
from kiln.curation.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.85  # kiln per-core rate >= 0.85 x the in-process per-core rate
MIN_SCORE = 0.5  # QualityStage threshold: both sides count the documents scoring at least this
# Scores computed by the same model on the same text differ only by float rounding
# (a transformer's padding differs with the batch's other documents).
SCORE_TOLERANCE = 1e-4
# Spark retires Python workers idle for a minute (PythonWorkerFactory), and a new worker
# imports fastText/torch and loads the model again: between a job's first and second
# run, waiting for a quiet machine stops well short of that.
STEADY_WAIT_S = 30.0


@dataclass
class Measurement(Rates):
    name: str  # e.g. "fastText / in-process predict"
    cores: int  # what rates are divided by: 1 (one thread), N (local[N]), or the machine's cores
    docs: int
    seconds: float
    cpu_s: float  # CPU seconds of this script's processes meanwhile (all threads, Spark's JVM and workers)
    other_cpu_s: float  # CPU seconds other processes on the machine used meanwhile (see common.Monitor)
    jvm_cpu_s: float  # the part of cpu_s that Spark's JVM used (reading, Arrow, writing); the rest is Python
    tokens: int | None = None  # tokenization: tokens produced (EOS excluded, so both sides count alike)
    kept: int | None = None  # fastText: documents scoring at least MIN_SCORE
    notes: dict = field(default_factory=dict)

    @property
    def tokens_per_s_per_core(self) -> float | None:
        return None if self.tokens is None else self.tokens / self.seconds / self.cores

    @property
    def busy_cores(self) -> float:
        return self.cpu_s / self.seconds

    @property
    def jvm_cores(self) -> float:
        return self.jvm_cpu_s / self.seconds


    @classmethod
    def timed(cls, name: str, cores: int, docs: int, timer, notes: dict | None = None, **kw) -> "Measurement":
        return cls(name, cores, docs, timer.seconds, timer.cpu_s, timer.other_cpu_s, timer.jvm_cpu_s,
                   notes={**(notes or {}), "processes_started": timer.started}, **kw)

    def to_json(self) -> dict:
        return {**asdict(self), "docs_per_s": self.docs_per_s, "docs_per_s_per_core": self.docs_per_s_per_core,
                "tokens_per_s_per_core": self.tokens_per_s_per_core, "busy_cores": self.busy_cores,
                "jvm_cores": self.jvm_cores, "other_load": self.other_load}


def own_cpu() -> dict[int, tuple[float, bool]]:
    """pid -> (CPU seconds so far, is Spark's JVM) for this process and its descendants:
    Spark's JVM and its Python workers."""
    procs = processes()
    return {pid: (p[2], p[1] == "java") for pid, p in procs.items() if is_ours(pid, procs)}


@contextmanager
def measured():
    """A Monitor that also records this script's own CPU seconds as `timer.cpu_s`
    (`timer.jvm_cpu_s` of them in Spark's JVM). Per process, so a worker that Spark
    retires meanwhile takes its CPU time with it instead of making the sum negative;
    Spark keeps its Python workers across jobs, so that is rare."""
    start = own_cpu()
    with Monitor() as timer:
        yield timer
    end = own_cpu()
    used = {pid: (cpu - start.get(pid, (0.0, jvm))[0], jvm) for pid, (cpu, jvm) in end.items()}
    timer.cpu_s = sum(cpu for cpu, _ in used.values())
    timer.jvm_cpu_s = sum(cpu for cpu, jvm in used.values() if jvm)
    # Python workers started during a steady-state run mean it paid imports and model loads again.
    timer.started = len(set(end) - set(start))


@contextmanager
def tokenizers_parallelism(enabled: bool):
    # tokenizers reads the variable on every batch call, so it can be switched per measurement.
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


@contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- set-up (untimed)


@dataclass
class Models:
    quality: str  # fastText model file
    tokenizer: str  # directory train_tokenizer wrote
    scorer: str  # directory train_scorer wrote
    info: dict


def train_models(labels_dir: Path, workdir: Path) -> tuple[Models, list[str]]:
    """The three models, trained on kiln's labelled sample; and the texts the corpus is made of.

    The quality positives and negatives are the corpus: the documents a quality
    classifier is run over, good and bad pages, ~3,400 characters on average.
    """
    quiet = lambda msg: None  # noqa: E731 - training reports are not the benchmark's output
    pos = read_labelled([str(labels_dir / "quality_pos.jsonl")], label=QUALITY_POSITIVE)
    neg = read_labelled([str(labels_dir / "quality_neg.jsonl")], label=QUALITY_NEGATIVE)
    texts, labels = pos.texts + neg.texts, pos.labels + neg.labels
    quality = str(workdir / "models" / "quality.bin")
    ft = train_fasttext(texts, labels, quality, FastTextTrainConfig(), kind="quality",
                        positive_label=QUALITY_POSITIVE, log=quiet)
    tokenizer = str(workdir / "models" / "tokenizer")
    tok = train_tokenizer(texts, tokenizer, log=quiet)
    graded = read_labelled([str(labels_dir / "quality_scores.jsonl")], label_column="score")
    scorer = str(workdir / "models" / "scorer")
    # One epoch: the benchmark needs the model's size, not its accuracy.
    scorer_cfg = ScorerTrainConfig(task="regression", tokenizer=tokenizer, epochs=1, device="cpu")
    train_scorer(graded.texts, graded.labels, scorer_cfg, scorer, log=quiet)
    loaded = Scorer.load(scorer, device="cpu")
    info = {
        "fasttext": {"file_mb": round(os.path.getsize(quality) / 1e6, 1), "dim": FastTextTrainConfig().dim,
                     "train_rows": ft["train_rows"], "validation_accuracy": (ft["validation"] or {}).get("accuracy")},
        "tokenizer": {"vocab_size": tok["vocab_size"], "kind": "byte-level BPE"},
        "scorer": {"parameters": sum(p.numel() for p in loaded.model.parameters()),
                   "model_type": scorer_cfg.model_type, "hidden_size": scorer_cfg.hidden_size,
                   "layers": scorer_cfg.num_layers, "max_length": scorer_cfg.max_length},
    }
    return Models(quality, tokenizer, scorer, info), texts


def make_corpus(texts: list[str], n_docs: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(ids, texts): the texts in a fixed shuffled order, cycled to `n_docs`, distinct ids."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)  # good and bad pages interleaved, so every file gets both
    chosen = [texts[order[i % len(order)]] for i in range(n_docs)]
    return [f"doc-{i:08d}" for i in range(n_docs)], chosen


def write_corpus(ids: list[str], texts: list[str], files: int, out_dir: Path) -> Path:
    """The corpus as `files` Parquet files of equal size, document i in file i % files.

    One file per Spark core: Spark reads each into one partition, so every core gets
    the same work and the measurement is not of an uneven split.
    """
    out_dir.mkdir(parents=True)
    for k in range(files):
        table = pa.table({schema.ID: ids[k::files], schema.TEXT: texts[k::files]})
        pq.write_table(table, out_dir / f"part-{k:05d}.parquet")
    return out_dir


def read_output(out_dir: Path, column: str) -> dict[str, float]:
    """id -> `column` of the kept documents a kiln stage wrote (for the same-work check)."""
    table = pq.read_table(out_dir / DOCS_DIR, columns=[schema.ID, column])
    return dict(zip(table.column(schema.ID).to_pylist(), table.column(column).to_pylist()))


def fmt_diff(diff: float | None) -> str:
    return "none compared" if diff is None else f"{diff:.1e}"


def max_difference(ids: list[str], expected: list[float], got: dict[str, float]) -> float | None:
    """Largest |score difference| over the documents both sides scored (None when none)."""
    diffs = [abs(e - got[i]) for i, e in zip(ids, expected) if i in got and got[i] is not None]
    return max(diffs) if diffs else None


# --------------------------------------------------------------------------- (a) fastText


def bench_fasttext_inprocess(model_path: str, texts: list[str]) -> tuple[Measurement, list[float]]:
    """fastText's own batch prediction over kiln-normalized text, one process, one thread.

    Normalizing is timed (kiln's stage does it too); picking P(positive) out of the
    result is not, which makes this the stricter reference.
    """
    info = FastTextModel.open(model_path, "quality")  # the normalization training recorded
    lowercase, max_chars = info.lowercase, info.max_chars
    model = load_fasttext(model_path)
    model.predict([fasttext_line(t, lowercase, max_chars) for t in texts[:256]], k=-1)  # page the model in
    with measured() as timer:
        labels, probs = model.predict([fasttext_line(t, lowercase, max_chars) for t in texts], k=-1)
    positive = f"__label__{QUALITY_POSITIVE}"
    scores = [min(1.0, float(dict(zip(labs, ps)).get(positive, 0.0))) for labs, ps in zip(labels, probs)]
    kept = sum(s >= MIN_SCORE for s in scores)
    return Measurement.timed("fastText / in-process model.predict(k=-1)", 1, len(texts), timer, kept=kept), scores


def bench_fasttext_kiln(spark, corpus: Path, model_path: str, name: str, cores: int, out_dir: Path,
                        ids: list[str], expected: list[float]) -> Measurement:
    """kiln's quality stage: read Parquet, score, threshold, count, write Parquet."""
    with measured() as timer:
        df = spark.read.parquet(str(corpus))
        stage = QualityStage(QualityConfig(model_path=model_path, min_score=MIN_SCORE))
        result = run_stage(spark, stage, df, str(out_dir), log=log)
    stats = result.stats
    got = read_output(out_dir, schema.QUALITY_SCORE)
    return Measurement.timed(name, cores, stats.docs_in, timer, kept=stats.kept,
                             notes={"partitions": df.rdd.getNumPartitions(), "dropped": stats.dropped,
                                    "seconds_to_stats": stats.extra["seconds"],
                                    "max_score_difference": max_difference(ids, expected, got),
                                    "output": "Parquet (Spark default, snappy), text included"})


# --------------------------------------------------------------------------- the Spark path without a model


class PassThrough(Stage):
    """A stage with no work in it: what every per-document stage pays around its model
    (the text column to Python, the in-bytes count, the batch rebuilt)."""

    name = "pass_through"

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        texts = batch.column(schema.TEXT).to_pylist()
        return set_columns(batch, output_schema(self, batch.schema), {
            schema.DROP_REASON: [None] * batch.num_rows, schema.IN_BYTES: text_bytes(texts)})


def bench_overhead(spark, corpus: Path, tiny: Path, n_docs: int, n_tiny: int, cores: int, workdir: Path,
                   wait: float) -> list[Measurement]:
    """The Spark path without a model, in cuts: Parquet read alone; read and the Arrow
    round trip through the Python workers; all of run_stage (the Parquet write, the
    counts and stats.json too); and run_stage over a handful of documents, which is
    the cost of a job itself. Where nothing is written, Spark's no-op sink discards
    the rows. Each cut runs twice and the second is kept, as for kiln's jobs."""

    def read_only():
        spark.read.parquet(str(corpus)).write.format("noop").mode("overwrite").save()
        return n_docs

    def roundtrip():
        apply_stage(PassThrough(), spark.read.parquet(str(corpus))).write.format("noop").mode("overwrite").save()
        return n_docs

    def through_run_stage(source: Path, out: str):
        return lambda: run_stage(spark, PassThrough(), spark.read.parquet(str(source)), str(workdir / out),
                                 log=lambda msg: None).stats.docs_in

    cuts = [("overhead / Parquet read only (noop sink)", read_only),
            ("overhead / read + no-op stage in the Python workers (noop sink)", roundtrip),
            ("overhead / no-op stage through run_stage (Parquet written)", through_run_stage(corpus, "noop_big")),
            (f"overhead / no-op stage through run_stage, {n_tiny} documents (a job's fixed cost)",
             through_run_stage(tiny, "noop_tiny"))]
    out = []
    for name, job in cuts:
        for run in range(2):
            wait_until_quiet(wait if run == 0 else min(wait, STEADY_WAIT_S))
            with measured() as timer:
                docs = job()
        out.append(Measurement.timed(name, cores, docs, timer, notes={"run": "second of two"}))
        log(f"{name}: {timer.seconds:.2f}s")
    return out


# --------------------------------------------------------------------------- (b) transformer scorer


def bench_scorer_inprocess(model_dir: str, texts: list[str], batch_size: int) -> tuple[Measurement, np.ndarray]:
    """`Scorer.score` over all texts in one process: one torch thread, tokenization on one thread."""
    scorer = Scorer.load(model_dir, device="cpu", batch_size=batch_size)
    with torch_threads(1), tokenizers_parallelism(False):
        scorer.score(texts[:64])  # first-call allocations
        with measured() as timer:
            scores = scorer.score(texts)
    return Measurement.timed(f"scorer / in-process Scorer.score, batch {batch_size}, 1 torch thread", 1, len(texts),
                             timer, notes={"batch_size": batch_size}), scores


def bench_scorer_kiln(spark, corpus: Path, model_dir: str, batch_size: int, name: str, cores: int, out_dir: Path,
                      ids: list[str], expected: np.ndarray) -> Measurement:
    """kiln's scorer stage: read Parquet, score (one torch thread per task), count, write Parquet."""
    with measured() as timer:
        df = spark.read.parquet(str(corpus))
        stage = ScorerStage(ScorerConfig(model_dir=model_dir, batch_size=batch_size, device="cpu"))
        result = run_stage(spark, stage, df, str(out_dir), log=log)
    stats = result.stats
    got = read_output(out_dir, schema.MODEL_SCORE)
    return Measurement.timed(name, cores, stats.docs_in, timer,
                             notes={"partitions": df.rdd.getNumPartitions(), "batch_size": batch_size,
                                    "seconds_to_stats": stats.extra["seconds"],
                                    "max_score_difference": max_difference(ids, [float(s) for s in expected], got)})


# --------------------------------------------------------------------------- (c) tokenization


def bench_tokenize_inprocess(tokenizer_dir: str, texts: list[str], one_thread: bool) -> Measurement:
    """`encode_batch_fast` over chunks of kiln's batch size (the Encoding objects of a
    whole corpus would not fit in memory at once), one thread or all of them."""
    tokenizer = load_tokenizer(tokenizer_dir, log=log).tokenizer
    chunk = TokenizeConfig().batch_size
    with tokenizers_parallelism(not one_thread):
        tokenizer.encode_batch_fast(texts[:chunk], add_special_tokens=False)
        with measured() as timer:
            tokens = 0
            for start in range(0, len(texts), chunk):
                for enc in tokenizer.encode_batch_fast(texts[start:start + chunk], add_special_tokens=False):
                    tokens += len(enc.ids)
    cores = 1 if one_thread else os.cpu_count() or 1
    label = "1 thread" if one_thread else f"{cores} threads"
    return Measurement.timed(f"tokenize / in-process encode_batch_fast, {label}", cores, len(texts), timer,
                             tokens=tokens, notes={"chunk": chunk})


def bench_tokenize_kiln(spark, corpus: Path, tokenizer_dir: str, name: str, cores: int, workdir: Path,
                        tag: str) -> Measurement:
    """kiln's tokenize stage: read Parquet, encode, write token shards and their indexes,
    write Parquet, check every shard against the counts, write availability.json."""
    with measured() as timer:
        df = spark.read.parquet(str(corpus))
        stage = TokenizeStage(TokenizeConfig(tokenizer=tokenizer_dir, shards_dir=str(workdir / f"shards_{tag}")))
        result = run_stage(spark, stage, df, str(workdir / f"tokenize_{tag}"), log=log)
    stats = result.stats
    # Shards end every document with EOS; the in-process count has no EOS.
    tokens = stats.extra["metrics"]["tokens"] - stats.kept
    return Measurement.timed(name, cores, stats.docs_in, timer, tokens=tokens,
                             notes={"partitions": df.rdd.getNumPartitions(),
                                    "seconds_to_stats": stats.extra["seconds"],
                                    "worker TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
                                    "output": "uint16 token shards + Parquet (text included)"})


# --------------------------------------------------------------------------- report


def comparison(base: Measurement, kiln: Measurement, unit: str, same: bool, detail: str) -> dict:
    b = base.tokens_per_s_per_core if unit == "tokens" else base.docs_per_s_per_core
    k = kiln.tokens_per_s_per_core if unit == "tokens" else kiln.docs_per_s_per_core
    ratio = k / b
    return {"kiln": kiln.name, "baseline": base.name, "unit": f"{unit}/s per core", "kiln_per_core": k,
            "baseline_per_core": b, "ratio": ratio, "target": TARGET, "pass": ratio >= TARGET,
            "same_work": same, "same_work_detail": detail}


def core_us(m: Measurement) -> float:
    """Core-microseconds per document: seconds x cores / documents."""
    return m.seconds * m.cores / m.docs * 1e6


def where_time_goes(overhead: list[Measurement], pairs: dict[str, tuple[Measurement, Measurement]]) -> dict:
    """kiln's cost per document split into the model's work and the Spark path around it.

    The path's cost per document is the no-op stage through run_stage minus a job's
    fixed cost, spread over the corpus; a model costing w per document in-process can
    then reach at most w / (w + path) of the in-process rate through Spark.
    """
    read_only, roundtrip, noop, tiny = overhead
    fixed_s = tiny.seconds
    path_us = max(0.0, (noop.seconds - fixed_s) * noop.cores / noop.docs * 1e6)
    out = {"read_us": core_us(read_only), "roundtrip_us": core_us(roundtrip), "run_stage_us": core_us(noop),
           "job_fixed_s": fixed_s, "path_us": path_us, "stages": {}}
    for what, (base, kiln) in pairs.items():
        w, k = core_us(base), core_us(kiln)
        fixed_us = fixed_s * kiln.cores / kiln.docs * 1e6
        out["stages"][what] = {
            "in_process_us": w, "kiln_us": k, "job_fixed_us": fixed_us, "path_us": path_us,
            # What kiln spends beyond the model's work, a job's fixed cost and the bare path:
            # the stage's own extra work (model loading, thread contention, shard writes).
            "rest_us": k - w - fixed_us - path_us,
            "bound": w / (w + path_us + fixed_us),
            # The ratio a corpus large enough to make a job's fixed cost vanish would see.
            "ratio_without_fixed": w / (k - fixed_us)}
    return out


def render(report: dict) -> str:
    m, v, a, mod = report["machine"], report["versions"], report["args"], report["models"]
    lines = [
        f"# Classifier and tokenizer throughput, {report['date']}",
        "",
        f"- machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, host `{m['hostname']}`, "
        f"Python {m['python']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- corpus: kiln's labelled quality sample ({report['distinct_texts']} distinct texts, "
        f"{report['mean_chars']:.0f} characters on average) cycled to distinct ids: fastText {a['fasttext_docs']} "
        f"documents, tokenization {a['docs']}, transformer scorer {a['scorer_docs']}; "
        f"{a['cores']} Parquet files each",
        f"- models (trained at the start on the same sample): fastText {mod['fasttext']['file_mb']} MB "
        f"(dim {mod['fasttext']['dim']}); byte-level BPE tokenizer, {mod['tokenizer']['vocab_size']} tokens; "
        f"scorer {mod['scorer']['model_type']} {mod['scorer']['layers']} layers x {mod['scorer']['hidden_size']} "
        f"({mod['scorer']['parameters']:,} parameters), max_length {mod['scorer']['max_length']}",
        f"- command: `{report['command']}`",
        "",
        "| measurement | cores (divisor) | cores busy (of which JVM) | docs | seconds | docs/s | docs/s per core | "
        "tokens/s per core | other processes' CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["measurements"]:
        flag = " **(disturbed)**" if r["other_load"] > NEIGHBOUR_WARNING else ""
        tps = f"{r['tokens_per_s_per_core']:,.0f}" if r["tokens_per_s_per_core"] is not None else ""
        jvm = f" ({r['jvm_cores']:.2f})" if r["jvm_cpu_s"] else ""
        lines.append(f"| {r['name']} | {r['cores']} | {r['busy_cores']:.2f}{jvm} | {r['docs']} | {r['seconds']:.2f} | "
                     f"{r['docs_per_s']:,.0f} | {r['docs_per_s_per_core']:,.0f} | {tps} | "
                     f"{r['other_load']:.0%}{flag} |")
    lines += [
        "",
        "| comparison | kiln per core | in-process per core | kiln / in-process | target | result | same work |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, c in report["comparisons"].items():
        lines.append(f"| {name} | {c['kiln_per_core']:,.0f} {c['unit']} | {c['baseline_per_core']:,.0f} | "
                     f"{c['ratio']:.2f}x | >= {c['target']:.2f}x | {'PASS' if c['pass'] else 'MISS'} | "
                     f"{'yes' if c['same_work'] else '**NO**'}: {c['same_work_detail']} |")
    if report["steady_runs_that_started_workers"]:
        lines += ["", "Spark started new Python workers during these steady-state runs (they paid imports and "
                  "model loads again): " + "; ".join(report["steady_runs_that_started_workers"]) + "."]
    o = report["where_time_goes"]
    lines += [
        "",
        f"Where kiln's time goes, in core-microseconds per document (seconds x cores / documents), on the "
        f"fastText corpus ({a['fasttext_docs']} documents), second of two runs each: Parquet read alone "
        f"{o['read_us']:.0f}; read plus the Arrow round trip through a no-op stage in the Python workers "
        f"{o['roundtrip_us']:.0f}; the no-op stage through run_stage (Parquet written, counts, stats) "
        f"{o['run_stage_us']:.0f}, of which a job's fixed cost (run_stage over a handful of documents: "
        f"{o['job_fixed_s']:.2f} s) leaves {o['path_us']:.0f} per document for the path itself. \"rest\" is "
        "what kiln spends beyond the model's work, the job's fixed cost and that path: the stage's own "
        "code around the model and anything that makes the Python workers slower than one plain process.",
        "",
        "| stage | in-process work w | kiln | job's fixed cost | Spark path p | rest | "
        "best ratio w / (w + p + fixed) | measured ratio | ratio with the fixed cost amortized |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for what, st in o["stages"].items():
        lines.append(f"| {what} | {st['in_process_us']:.0f} | {st['kiln_us']:.0f} | {st['job_fixed_us']:.0f} | "
                     f"{st['path_us']:.0f} | {st['rest_us']:.0f} | {st['bound']:.2f}x | "
                     f"{st['in_process_us'] / st['kiln_us']:.2f}x | {st['ratio_without_fixed']:.2f}x |")
    lines += [
        "",
        "\"Per core\" divides a rate by the cores in the \"cores (divisor)\" column: 1 for an in-process loop "
        "held to one thread (fastText predicts on one; torch is set to one thread; tokenizers runs with "
        "TOKENIZERS_PARALLELISM=false), the Spark local[N] cores for kiln, and the machine's cores for the "
        "all-thread tokenizers baseline. \"cores busy\" is what the measurement actually used: CPU seconds of "
        "this script's processes (Spark's JVM and Python workers included) over wall seconds. kiln's Python "
        "workers tokenize on one thread per single-core task (kiln.curation.stage.one_thread_per_core), "
        "since Spark already runs one task per core. "
        "The in-process loops only compute, over texts already in memory; kiln's time includes reading the "
        "Parquet corpus, Arrow batches to and from the Python workers, writing the output Parquet (text "
        "included; tokenization also writes the token shards and checks them), and the counts. "
        "The scorer's Spark job uses the best in-process batch size; it sorts documents by length within "
        "each Arrow batch, the in-process call over the whole corpus. Spark session start-up is excluded "
        "(a tiny warm-up job starts the Python workers first); each kiln job runs twice on the same input: "
        "the first run also pays for the JVM compiling that job's code paths and the workers importing and "
        "loading the model, once per application, so the target is judged on the second. "
        "\"other processes' CPU\" is the share of the whole machine that processes outside the benchmark "
        f"used during the measurement; above {NEIGHBOUR_WARNING:.0%} the numbers are not trustworthy.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cores", type=int, default=2, help="Spark local[N] (default: %(default)s)")
    p.add_argument("--docs", type=int, default=20_000,
                   help="documents of the tokenization corpus; ~13 s on one thread in-process, ~9 s in Spark "
                        "on 2 cores (default: %(default)s)")
    p.add_argument("--fasttext-docs", type=int, default=100_000,
                   help="documents of the fastText corpus: fastText scores ~17,000 documents a second on one "
                        "core, so a few thousand would measure Spark's per-job fixed cost, not a rate "
                        "(default: %(default)s)")
    p.add_argument("--scorer-docs", type=int, default=8_000,
                   help="documents of the transformer scorer's corpus (the first of the tokenization corpus); "
                        "~14 s per in-process batch size (default: %(default)s)")
    p.add_argument("--batch-sizes", default="1,8,32,64", help="in-process scorer batch sizes (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="result folder (default: %(default)s)")
    p.add_argument("--wait-quiet", type=float, default=60.0,
                   help="before each measurement wait up to this many seconds for other processes to go "
                        "idle; 0 to start at once (default: %(default)s)")
    p.add_argument("--keep-temp", action="store_true", help="keep the temporary folder (for profiling)")
    args = p.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.scorer_docs = min(args.scorer_docs, args.docs)

    workdir = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    try:
        # Set-up: models and corpora, before anything is timed.
        build_labels(workdir / "labels")
        models, texts = train_models(workdir / "labels", workdir)
        log(f"models trained: {models.info}")
        ft_ids, ft_texts = make_corpus(texts, args.fasttext_docs)
        ids, tok_texts = make_corpus(texts, args.docs)
        sc_ids, sc_texts = ids[:args.scorer_docs], tok_texts[:args.scorer_docs]
        ft_corpus = write_corpus(ft_ids, ft_texts, args.cores, workdir / "corpus_fasttext")
        tok_corpus = write_corpus(ids, tok_texts, args.cores, workdir / "corpus_tokenize")
        sc_corpus = write_corpus(sc_ids, sc_texts, args.cores, workdir / "corpus_scorer")
        tiny_ids = ids[:2 * args.cores]
        tiny_corpus = write_corpus(tiny_ids, tok_texts[:len(tiny_ids)], args.cores, workdir / "corpus_tiny")

        # The in-process loops first, before Spark's JVM exists, so nothing of ours shares their core.
        wait_until_quiet(args.wait_quiet)
        ft_base, ft_scores = bench_fasttext_inprocess(models.quality, ft_texts)
        log(f"{ft_base.name}: {ft_base.seconds:.1f}s")
        wait_until_quiet(args.wait_quiet)
        tok_base1 = bench_tokenize_inprocess(models.tokenizer, tok_texts, one_thread=True)
        log(f"{tok_base1.name}: {tok_base1.seconds:.1f}s")
        wait_until_quiet(args.wait_quiet)
        tok_base_all = bench_tokenize_inprocess(models.tokenizer, tok_texts, one_thread=False)
        log(f"{tok_base_all.name}: {tok_base_all.seconds:.1f}s")
        sweep, sweep_scores = [], {}
        for b in batch_sizes:
            wait_until_quiet(args.wait_quiet)
            m, scores = bench_scorer_inprocess(models.scorer, sc_texts, b)
            sweep.append(m)
            sweep_scores[b] = scores
            log(f"{m.name}: {m.seconds:.1f}s")
        sc_base = max(sweep, key=lambda m: m.docs_per_s)
        best_batch = sc_base.notes["batch_size"]

        # Session start-up (JVM launch, ~5-10 s) is paid once per application, not per document,
        # so it is kept out of the timed region; the warm-up job starts the Python workers.
        spark = get_spark("kiln-bench", f"local[{args.cores}]")
        warm_up(spark, args.cores)
        local = f"local[{args.cores}]"
        runs = {}

        def twice(key: str, job) -> None:
            """The same kiln job, first in a cold JVM and then in steady state."""
            for run, suffix in (("cold", ", first job (cold JVM)"), ("steady", "")):
                wait_until_quiet(args.wait_quiet if run == "cold" else min(args.wait_quiet, STEADY_WAIT_S))
                runs[f"{key}_{run}"] = m = job(run, suffix)
                log(f"{m.name}: {m.seconds:.1f}s")

        twice("ft", lambda run, suffix: bench_fasttext_kiln(
            spark, ft_corpus, models.quality, f"fastText / kiln QualityStage, Spark {local}{suffix}", args.cores,
            workdir / f"quality_{run}", ft_ids, ft_scores))
        overhead = bench_overhead(spark, ft_corpus, tiny_corpus, args.fasttext_docs, len(tiny_ids), args.cores,
                                  workdir, args.wait_quiet)
        twice("tok", lambda run, suffix: bench_tokenize_kiln(
            spark, tok_corpus, models.tokenizer, f"tokenize / kiln TokenizeStage, Spark {local}{suffix}",
            args.cores, workdir, run))
        twice("sc", lambda run, suffix: bench_scorer_kiln(
            spark, sc_corpus, models.scorer, best_batch,
            f"scorer / kiln ScorerStage batch {best_batch}, Spark {local}{suffix}", args.cores,
            workdir / f"scorer_{run}", sc_ids, sweep_scores[best_batch]))
        spark.stop()
    finally:
        if args.keep_temp:
            log(f"temporary files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    def ft_same(k: Measurement) -> tuple[bool, str]:
        diff = k.notes["max_score_difference"]
        same = k.docs == ft_base.docs and k.kept == ft_base.kept and diff is not None and diff <= SCORE_TOLERANCE
        return same, f"{k.kept} vs {ft_base.kept} scoring >= {MIN_SCORE}, max score difference {fmt_diff(diff)}"

    def tok_same(k: Measurement, base: Measurement) -> tuple[bool, str]:
        return k.tokens == base.tokens and k.docs == base.docs, f"{k.tokens:,} vs {base.tokens:,} tokens"

    def sc_same(k: Measurement) -> tuple[bool, str]:
        diff = k.notes["max_score_difference"]
        same = k.docs == sc_base.docs and diff is not None and diff <= SCORE_TOLERANCE
        return same, f"{k.docs} vs {sc_base.docs} docs, max score difference {fmt_diff(diff)}"

    comparisons = {}
    for run, suffix in (("steady", ""), ("cold", ", kiln's first job (cold JVM)")):
        comparisons[f"fastText scoring, docs/s per core{suffix}"] = comparison(
            ft_base, runs[f"ft_{run}"], "docs", *ft_same(runs[f"ft_{run}"]))
        comparisons[f"transformer scoring vs in-process batch {best_batch}, docs/s per core{suffix}"] = comparison(
            sc_base, runs[f"sc_{run}"], "docs", *sc_same(runs[f"sc_{run}"]))
        comparisons[f"tokenization vs tokenizers on 1 thread, tokens/s per core{suffix}"] = comparison(
            tok_base1, runs[f"tok_{run}"], "tokens", *tok_same(runs[f"tok_{run}"], tok_base1))
        comparisons[f"tokenization vs tokenizers on all {tok_base_all.cores} threads, tokens/s per core{suffix}"] = (
            comparison(tok_base_all, runs[f"tok_{run}"], "tokens", *tok_same(runs[f"tok_{run}"], tok_base_all)))

    where = where_time_goes(overhead, {"fastText": (ft_base, runs["ft_steady"]),
                                       "tokenization (1-thread baseline)": (tok_base1, runs["tok_steady"]),
                                       f"scorer (batch {best_batch})": (sc_base, runs["sc_steady"])})

    measurements = [ft_base, runs["ft_cold"], runs["ft_steady"], *overhead, *sweep, runs["sc_cold"], runs["sc_steady"],
                    tok_base1, tok_base_all, runs["tok_cold"], runs["tok_steady"]]
    for name, c in comparisons.items():
        if not c["same_work"]:
            log(f"WARNING: {name}: the two sides did not do the same work ({c['same_work_detail']})")
    restarted = [m.name for m in measurements if m.jvm_cpu_s and "first job" not in m.name
                 and m.notes["processes_started"]]
    for name in restarted:
        log(f"WARNING: {name}: Spark started Python workers during a steady-state run")
    for m in measurements:
        if m.other_load > NEIGHBOUR_WARNING:
            log(f"WARNING: {m.name}: other processes used {m.other_load:.0%} of the machine meanwhile; "
                "rerun on a quiet machine")
    report = {
        "date": date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/classify_tokenize_throughput.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "machine": machine(),
        "versions": versions("fasttext-numpy2-wheel", "tokenizers", "torch", "transformers"),
        "models": models.info,
        "distinct_texts": len(texts),
        "mean_chars": sum(map(len, texts)) / len(texts),
        "measurements": [m.to_json() for m in measurements],
        "comparisons": comparisons,
        "where_time_goes": where,
        "steady_runs_that_started_workers": restarted,
    }
    text = render(report)
    print(text)
    write_results(args.out, "classify_tokenize_throughput", report, text, args.cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
