"""fastText quality and domain classifiers (Llama 3 section 3.1.1).

Llama 3 kept pages a fastText model judged "would be referenced by Wikipedia", and
sorted what remained into domains (general knowledge, math & reasoning, code,
multilingual) and topics so that over-represented topics could be downsampled before
the mixture was chosen. DCLM showed that keeping the top 10 % of a corpus by such a
classifier's score beats most heuristic pipelines.

Training (`train_fasttext`) reads labelled documents on the driver, holds out a
stratified validation split, trains in a fresh Python process (see `_train_in_subprocess`)
and prints precision and recall per class. The model is saved with a sidecar
`MODEL.bin.json` that records its kind, labels and text normalisation, so applying it
normalises text exactly as training did. Applying runs in Spark: the model file is
shipped with SparkFiles, loaded once per Python worker and fed whole Arrow batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa
from pyspark.sql import functions as F

from kiln.config import ConfigError
from kiln.formats import schema
from kiln.curation.langid import load_fasttext
from kiln.curation.spark import load_once, ship
from kiln.curation.stage import Stage, apply_stage, in_languages, is_blank, output_schema, set_columns, text_bytes

QUALITY_POSITIVE, QUALITY_NEGATIVE = "hq", "lq"
DEFAULT_DOMAINS = ["general", "math", "code", "multilingual"]


@dataclass
class FastTextTrainConfig:
    epoch: int = 25  # passes over the training rows
    lr: float = 0.5  # fastText learning rate
    word_ngrams: int = 2  # word n-gram features (DCLM's quality classifier uses bigrams)
    dim: int = 64  # embedding size
    bucket: int = 100_000  # hash buckets for word n-grams (fastText default 2M makes a 500 MB model at dim 64)
    min_count: int = 1  # words seen fewer times are ignored
    val_fraction: float = 0.1  # held-out share of each class for the printed precision/recall
    seed: int = 0  # split and training seed; training uses one thread so the model is reproducible
    lowercase: bool = True  # fold case before training and scoring
    max_chars: int = 10_000  # characters of each document the model sees


def fasttext_line(text: str | None, lowercase: bool, max_chars: int) -> str:
    # fastText reads one example per line: a newline would end the document early.
    text = " ".join((text or "")[:max_chars].split())
    return text.lower() if lowercase else text


def _stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        rows = by_class[label]
        rng.shuffle(rows)
        n_val = round(len(rows) * fraction) if fraction > 0 else 0
        if fraction > 0 and n_val == 0:
            n_val = 1
        if n_val >= len(rows):
            raise ConfigError(f"class {label!r} has {len(rows)} row(s): too few to hold out a validation "
                              f"split of {fraction:.0%} (add rows or set val_fraction = 0)")
        val += rows[:n_val]
        train += rows[n_val:]
    return sorted(train), sorted(val)


def check_classes(labels: list[str], where: str) -> Counter:
    counts = Counter(labels)
    if len(counts) < 2:
        only = next(iter(counts), None)
        raise ConfigError(f"{where}: only one class ({only!r}, {len(labels)} rows): a classifier needs "
                          "examples of at least two")
    return counts


def classification_report(truth: list[str], predicted: list[str]) -> dict:
    classes = sorted(set(truth) | set(predicted))
    report: dict = {"accuracy": sum(t == p for t, p in zip(truth, predicted)) / max(1, len(truth)),
                    "rows": len(truth), "classes": {}}
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(truth, predicted))
        n_pred = sum(p == c for p in predicted)
        n_true = sum(t == c for t in truth)
        report["classes"][c] = {"precision": tp / n_pred if n_pred else 0.0,
                                "recall": tp / n_true if n_true else 0.0, "support": n_true}
    return report


def format_report(report: dict) -> str:
    lines = [f"validation: {report['rows']} rows, accuracy {report['accuracy']:.3f}",
             f"  {'class':<16} {'precision':>9} {'recall':>7} {'support':>8}"]
    for c, m in report["classes"].items():
        lines.append(f"  {c:<16} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['support']:>8}")
    return "\n".join(lines)


def train_fasttext(texts: list[str], labels: list[str], out_path: str, cfg: FastTextTrainConfig | None = None,
                   kind: str = "domain", positive_label: str = "", where: str = "labels", log=None) -> dict:
    """Train a fastText classifier on (text, label) rows and save it to `out_path`
    (plus `out_path.json`). Returns the sidecar: labels, validation report, row counts."""
    cfg = cfg or FastTextTrainConfig()
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    labels = [str(lab) for lab in labels]
    counts = check_classes(labels, where)
    if any(" " in lab or not lab for lab in counts):
        raise ConfigError(f"{where}: labels must be non-empty words without spaces (got {sorted(counts)})")
    train_rows, val_rows = _stratified_split(labels, cfg.val_fraction, cfg.seed)
    log(f"training fastText {kind} classifier: {len(train_rows)} train / {len(val_rows)} validation rows, "
        f"classes {dict(sorted(counts.items()))}")
    t0 = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-fasttext-") as tmp:
        train_file = os.path.join(tmp, "train.txt")
        rng = random.Random(cfg.seed)
        order = list(train_rows)
        rng.shuffle(order)  # fastText learns in file order: classes must be interleaved
        with open(train_file, "w", encoding="utf-8") as f:
            for i in order:
                f.write(f"__label__{labels[i]} {fasttext_line(texts[i], cfg.lowercase, cfg.max_chars)}\n")
        tmp_model = os.path.join(tmp, "model.bin")
        _train_in_subprocess(train_file, tmp_model, cfg)
        model = load_fasttext(tmp_model)
        report = None
        if val_rows:
            predicted = predict_labels(model, [texts[i] for i in val_rows], cfg.lowercase, cfg.max_chars)[0]
            report = classification_report([labels[i] for i in val_rows], predicted)
            log(format_report(report))
        shutil.move(tmp_model, out_path)
    sidecar = {"kind": kind, "labels": sorted(counts), "positive_label": positive_label,
               "lowercase": cfg.lowercase, "max_chars": cfg.max_chars, "train_rows": len(train_rows),
               "val_rows": len(val_rows), "class_rows": dict(sorted(counts.items())), "validation": report,
               "settings": asdict(cfg), "seconds": round(time.time() - t0, 2)}
    with open(out_path + ".json", "w", encoding="utf-8") as f:
        json.dump(sidecar, f, indent=2)
    log(f"wrote {out_path} ({os.path.getsize(out_path) / 1e6:.1f} MB) in {sidecar['seconds']:.1f}s")
    return sidecar


def _train_in_subprocess(train_file: str, out_path: str, cfg: FastTextTrainConfig) -> None:
    # fasttext-numpy2-wheel 0.9.2's train_supervised reads memory it never initialises
    # and stops with "Encountered NaN" in a process whose heap has been reused (after
    # Spark or pandas work, say); a fresh interpreter starts from zeroed pages.
    params = {"input": train_file, "epoch": cfg.epoch, "lr": cfg.lr, "wordNgrams": cfg.word_ngrams,
              "dim": cfg.dim, "bucket": cfg.bucket, "minCount": cfg.min_count, "seed": cfg.seed, "thread": 1, "verbose": 0}
    code = ("import fasttext, json, sys; "
            "fasttext.train_supervised(**json.loads(sys.argv[1])).save_model(sys.argv[2])")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(params), out_path],
                          capture_output=True, text=True)
    if done.returncode != 0 or not os.path.exists(out_path):
        raise RuntimeError(f"fastText training failed: {done.stderr.strip()[-2000:]}")


def predict_labels(model, texts: list[str], lowercase: bool, max_chars: int) -> tuple[list[str], list[float]]:
    labels, probs = model.predict([fasttext_line(t, lowercase, max_chars) for t in texts], k=1)
    return ([lab[0].removeprefix("__label__") for lab in labels],
            [min(1.0, float(p[0])) for p in probs])


def positive_probability(model, texts: list[str], positive: str, lowercase: bool, max_chars: int) -> list[float]:
    """P(positive) per text. fastText's softmax sums to 1 over its labels, so every
    label is asked for (k=-1) and the positive one picked out."""
    labels, probs = model.predict([fasttext_line(t, lowercase, max_chars) for t in texts], k=-1)
    target = f"__label__{positive}"
    out = []
    for labs, ps in zip(labels, probs):
        score = 0.0
        for lab, p in zip(labs, ps):
            if lab == target:
                score = min(1.0, float(p))  # fastText can return 1.00001
                break
        out.append(score)
    return out


@dataclass
class FastTextModel:
    """A trained classifier file with what training recorded about it."""

    path: str
    labels: list[str]
    kind: str = ""
    positive_label: str = ""
    lowercase: bool = True
    max_chars: int = 10_000

    @classmethod
    def open(cls, path: str, what: str) -> "FastTextModel":
        if not path:
            raise ConfigError(f"no {what} model given (train one with `kiln curate train-{what}`)")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: {what} model not found")
        labels = [lab.removeprefix("__label__") for lab in load_fasttext(path).get_labels()]
        info = {}
        if os.path.isfile(path + ".json"):
            with open(path + ".json", encoding="utf-8") as f:
                info = json.load(f)
        return cls(path=os.path.abspath(path), labels=labels, kind=info.get("kind", ""),
                   positive_label=info.get("positive_label", ""), lowercase=info.get("lowercase", True),
                   max_chars=info.get("max_chars", 10_000))

    def fingerprint(self) -> dict:
        st = os.stat(self.path)
        return {"model": os.path.basename(self.path), "model_bytes": st.st_size, "labels": self.labels}


# ---------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------

@dataclass
class QualityConfig:
    model_path: str = ""  # fastText quality model from `kiln curate train-quality`
    positive_label: str = QUALITY_POSITIVE  # the class whose probability is quality_score
    min_score: float | None = None  # keep documents scoring at least this (drop: quality_low_score)
    keep_top_fraction: float | None = None  # or keep this share of the corpus by score (DCLM: 0.1)
    quantile_accuracy: int = 10_000  # percentile_approx accuracy for keep_top_fraction (relative error 1/N)
    languages: list[str] = field(default_factory=lambda: ["en"])  # lang values scored; others pass unscored ([] = all)


class QualityStage(Stage):
    """Adds `quality_score` = P(positive) and drops by threshold or by top fraction."""

    name = "quality"

    def __init__(self, cfg: QualityConfig | None = None):
        self.cfg = cfg or QualityConfig()
        if self.cfg.min_score is not None and self.cfg.keep_top_fraction is not None:
            raise ConfigError("[quality]: set min_score or keep_top_fraction, not both")
        frac = self.cfg.keep_top_fraction
        if frac is not None and not 0 < frac <= 1:
            raise ConfigError(f"[quality] keep_top_fraction: expected 0 < f <= 1, got {frac}")
        self.model = FastTextModel.open(self.cfg.model_path, "quality")
        if self.cfg.positive_label not in self.model.labels:
            raise ConfigError(f"{self.model.path}: not a quality model: no label {self.cfg.positive_label!r} "
                              f"(its labels: {', '.join(self.model.labels[:5])})")
        self._shipped = self.model.path
        self.threshold: float | None = self.cfg.min_score

    def settings(self) -> dict:
        return {**asdict(self.cfg), **self.model.fingerprint()}

    def prepare(self, spark, df) -> None:
        self._shipped = ship(spark, self.model.path)

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(schema.QUALITY_SCORE, pa.float32())]

    def open(self) -> None:
        load_once(self._shipped, load_fasttext)

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        texts = batch.column(schema.TEXT).to_pylist()
        empty = [is_blank(t) for t in texts]
        # A classifier trained on one language's pages scores every other language low:
        # those documents pass unscored (null) instead of being thrown away.
        scored = in_languages(batch, self.cfg.languages)
        present = [i for i in range(len(texts)) if not empty[i] and scored[i]]
        scores: list[float | None] = [None] * len(texts)
        got = positive_probability(load_once(self._shipped, load_fasttext), [texts[i] for i in present],
                                   self.cfg.positive_label, self.model.lowercase, self.model.max_chars)
        for i, s in zip(present, got):
            scores[i] = s
        reasons = []
        for i, s in enumerate(scores):
            if empty[i]:
                reasons.append("empty_document")
            elif s is not None and self.cfg.min_score is not None and s < self.cfg.min_score:
                reasons.append("quality_low_score")
            else:
                reasons.append(None)
        return set_columns(batch, output_schema(self, batch.schema), {
            schema.QUALITY_SCORE: scores, schema.DROP_REASON: reasons, schema.IN_BYTES: text_bytes(batch.column(schema.TEXT))})

    def transform(self, df):
        scored = apply_stage(self, df)
        if self.cfg.keep_top_fraction is None:
            return scored
        # The cut-off is a quantile of this corpus's scores: one extra pass over the
        # scored documents (fastText is cheap next to the write) rather than a cache
        # that grows with the corpus.
        kept = F.col(schema.DROP_REASON).isNull()
        row = scored.where(kept).agg(F.percentile_approx(schema.QUALITY_SCORE, 1 - self.cfg.keep_top_fraction,
                                                         self.cfg.quantile_accuracy)).first()
        self.threshold = float(row[0]) if row[0] is not None else None
        if self.threshold is None:
            return scored
        return scored.withColumn(schema.DROP_REASON, F.when(
            kept & (F.col(schema.QUALITY_SCORE) < F.lit(self.threshold)), F.lit("quality_not_top_fraction"))
            .otherwise(F.col(schema.DROP_REASON)))

    def fusable(self) -> bool:
        return self.cfg.keep_top_fraction is None  # a cut at a corpus quantile needs the whole corpus scored

    def finish(self, stats) -> None:
        if self.threshold is not None:
            stats.extra["quality_threshold"] = self.threshold


# ---------------------------------------------------------------------------
# Domains and topics
# ---------------------------------------------------------------------------

@dataclass
class DomainConfig:
    domains: list[str] = field(default_factory=lambda: list(DEFAULT_DOMAINS))  # the domains shards are split by
    backend: str = "fasttext"  # "fasttext" (model_path = MODEL.bin) or "transformer" (model_path = a train-scorer directory)
    model_path: str = ""  # classifier over the non-multilingual domains
    multilingual_domain: str = "multilingual"  # domain of documents whose lang is not in `languages` ("" = classify all)
    languages: list[str] = field(default_factory=lambda: ["en"])  # languages the model classifies
    topic_model: str = ""  # optional fastText topic classifier (adds `topic`)
    topic_rates: dict[str, float] = field(default_factory=dict)  # topic -> share of its documents kept (missing topics: 1.0)
    seed: int = 0  # seed of the per-document downsampling draw


def keep_draw(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document id: downsampling that is
    reproducible and independent of partitioning."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class DomainStage(Stage):
    """Adds `domain`, `domain_score` (null where `lang` decided) and, with a topic
    model, `topic`; drops `topic_downsampled` documents by `topic_rates`."""

    name = "domain"

    def __init__(self, cfg: DomainConfig | None = None):
        self.cfg = cfg or DomainConfig()
        cfg = self.cfg
        if cfg.backend not in ("fasttext", "transformer"):
            raise ConfigError(f"[domain] backend: expected 'fasttext' or 'transformer', got {cfg.backend!r}")
        if cfg.multilingual_domain and cfg.multilingual_domain not in cfg.domains:
            raise ConfigError(f"[domain] multilingual_domain {cfg.multilingual_domain!r} is not in domains {cfg.domains}")
        classified = [d for d in cfg.domains if d != cfg.multilingual_domain]
        if cfg.backend == "fasttext":
            self.model = FastTextModel.open(cfg.model_path, "domain")
            labels = self.model.labels
        else:
            from kiln.curation.scorer import scorer_info

            self.model = None
            self.scorer_info = scorer_info(cfg.model_path)  # hashes every file once: kept for settings()
            labels = list(self.scorer_info["labels"])
        stray = [lab for lab in labels if lab not in classified]
        if stray:
            raise ConfigError(f"{cfg.model_path}: not a domain model for {classified}: it predicts "
                              f"{', '.join(labels[:6])}")
        self.topics = FastTextModel.open(cfg.topic_model, "topic") if cfg.topic_model else None
        unknown = sorted(set(cfg.topic_rates) - set(self.topics.labels if self.topics else []))
        if unknown:
            raise ConfigError(f"[domain] topic_rates: {unknown[0]!r} is not a topic of the topic model "
                              f"({', '.join(self.topics.labels) if self.topics else 'none given'})")
        for topic, rate in cfg.topic_rates.items():
            if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
                raise ConfigError(f"[domain] topic_rates.{topic}: expected a rate in [0, 1], got {rate!r}")
        self._shipped = self.model.path if self.model else os.path.abspath(cfg.model_path)
        self._shipped_topics = self.topics.path if self.topics else ""

    def settings(self) -> dict:
        s = asdict(self.cfg)
        if self.model:
            s["model"] = self.model.fingerprint()
        else:
            s["model"] = self.scorer_info["fingerprint"]
        if self.topics:
            s["topics"] = self.topics.fingerprint()
        return s

    def prepare(self, spark, df) -> None:
        if self.model:
            self._shipped = ship(spark, self.model.path)
        else:
            self._shipped = ship(spark, self.cfg.model_path, key=self.scorer_info["fingerprint"][:12])
        if self.topics:
            self._shipped_topics = ship(spark, self.topics.path)

    def output_fields(self) -> list[pa.Field]:
        fields = [pa.field(schema.DOMAIN, pa.string()), pa.field(schema.DOMAIN_SCORE, pa.float32())]
        if self.topics:
            fields.append(pa.field(schema.TOPIC, pa.string()))
        return fields

    def open(self) -> None:
        if self.model:
            load_once(self._shipped, load_fasttext)
        else:
            from kiln.curation.scorer import worker_scorer

            worker_scorer(self._shipped)
        if self._shipped_topics:
            load_once(self._shipped_topics, load_fasttext)

    def _classify(self, texts: list[str]) -> tuple[list[str], list[float]]:
        if not texts:
            return [], []
        if self.model:
            return predict_labels(load_once(self._shipped, load_fasttext), texts, self.model.lowercase, self.model.max_chars)
        from kiln.curation.scorer import worker_scorer

        labels, probs = worker_scorer(self._shipped).classify(texts)
        return list(labels), [float(p) for p in probs.max(axis=1)]

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        cfg = self.cfg
        texts = batch.column(schema.TEXT).to_pylist()
        ids = batch.column(schema.ID).to_pylist()
        langs = (batch.column(schema.LANG).to_pylist() if schema.LANG in batch.schema.names
                 else [None] * len(texts))
        n = len(texts)
        domains: list[str | None] = [None] * n
        scores: list[float | None] = [None] * n
        empty = [is_blank(t) for t in texts]
        by_lang = [not empty[i] and bool(cfg.multilingual_domain) and langs[i] is not None
                   and langs[i] not in cfg.languages for i in range(n)]
        for i in range(n):
            if by_lang[i]:
                domains[i] = cfg.multilingual_domain
        todo = [i for i in range(n) if not empty[i] and not by_lang[i]]
        got, probs = self._classify([texts[i] for i in todo])
        for i, d, p in zip(todo, got, probs):
            domains[i], scores[i] = d, p
        columns = {schema.DOMAIN: domains, schema.DOMAIN_SCORE: scores}
        topics: list[str | None] = [None] * n
        if self.topics:
            present = [i for i in range(n) if not empty[i]]
            got_topics, _ = predict_labels(load_once(self._shipped_topics, load_fasttext), [texts[i] for i in present],
                                           self.topics.lowercase, self.topics.max_chars)
            for i, t in zip(present, got_topics):
                topics[i] = t
            columns[schema.TOPIC] = topics
        reasons = []
        for i in range(n):
            if empty[i]:
                reasons.append("empty_document")
            elif topics[i] is not None and keep_draw(ids[i], cfg.seed) >= cfg.topic_rates.get(topics[i], 1.0):
                reasons.append("topic_downsampled")
            else:
                reasons.append(None)
        columns[schema.DROP_REASON] = reasons
        columns[schema.IN_BYTES] = text_bytes(batch.column(schema.TEXT))
        return set_columns(batch, output_schema(self, batch.schema), columns)

    def metrics(self) -> dict:
        # Documents per domain among the kept ones: the mixer's first look at the corpus.
        kept = F.col(schema.DROP_REASON).isNull()
        return {f"docs_{d}": F.coalesce(F.sum(F.when(kept & (F.col(schema.DOMAIN) == d), 1).otherwise(0)), F.lit(0))
                for d in self.cfg.domains}

    def batch_metrics(self, out) -> dict:
        reasons, domains = out.column(schema.DROP_REASON).to_pylist(), out.column(schema.DOMAIN).to_pylist()
        return {f"docs_{d}": sum(1 for r, x in zip(reasons, domains) if r is None and x == d) for d in self.cfg.domains}
