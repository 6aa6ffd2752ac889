"""The scorer stage: a trained scorer (kiln.curation.scorer.model) over the corpus in
Spark, one model per Python worker, torch threads = the task's cores."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
from pyspark.sql import functions as F

from kiln.config import ConfigError
from kiln.curation.scorer.model import Scorer, read_meta
from kiln.curation.spark import load_once, ship
from kiln.curation.stage import Stage, in_languages, one_thread_per_core, output_schema, set_columns, task_cpus, text_bytes
from kiln.formats import schema
from kiln.formats.hashing import content_sha256


@dataclass
class ScorerConfig:
    model_dir: str = ""  # a directory written by train_scorer
    column: str = schema.MODEL_SCORE  # float32 output column; null for empty documents
    min_score: float | None = None  # when set, documents scoring lower are dropped as model_score_low
    batch_size: int = 32  # documents per forward pass
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", ...
    max_chars: int = 20_000  # characters given to the tokenizer; more cannot fit max_length tokens anyway
    languages: list[str] = field(default_factory=lambda: ["en"])  # lang values scored; others pass unscored ([] = all)


def worker_scorer(shipped: str, device: str = "auto", batch_size: int = 32, max_chars: int = 20_000) -> Scorer:
    """The worker's Scorer for `shipped` (a name `ship` returned, or an absolute path)."""
    scorer = load_once(shipped, Scorer.load, device)
    scorer.batch_size, scorer.max_chars = batch_size, max_chars
    return scorer


class ScorerStage(Stage):
    """Transformer quality scorer (Llama 3's DistilRoBERTa role): adds model_score.

    Batched inference of a transformers sequence classifier/regressor trained with
    train-scorer, one model per Spark worker, torch threads = task cores, a GPU when
    present. With min_score, lower-scoring documents are dropped as model_score_low."""
    name = "scorer"

    def __init__(self, cfg: ScorerConfig):
        self.cfg = cfg
        if not cfg.model_dir:
            raise ConfigError("scorer: model_dir is not set (a directory written by train_scorer)")
        if cfg.batch_size < 1:
            raise ConfigError(f"scorer: batch_size must be 1 or more, got {cfg.batch_size}")
        self.model_dir = os.path.abspath(cfg.model_dir)
        self.meta = read_meta(self.model_dir)
        self.digest = content_sha256(self.model_dir)
        self._shipped = self.model_dir  # until prepare ships it, workers are this process

    def settings(self) -> dict:
        return {**asdict(self.cfg), "model_dir": os.path.basename(self.model_dir), "model_sha256": self.digest[:16],
                "task": self.meta["task"], "positive_label": self.meta.get("positive_label", "")}

    def prepare(self, spark, df) -> None:
        # Loaded once here so a broken checkpoint fails on the driver, with its path.
        Scorer.load(self.model_dir, device="cpu")
        self._shipped = ship(spark, self.model_dir, key=self.digest[:12])

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(self.cfg.column, pa.float32())]

    def metrics(self) -> dict:
        # Null scores: empty documents, and documents in languages the scorer does not judge.
        return {"unscored_documents": F.count(F.when(F.col(self.cfg.column).isNull(), F.lit(1)))}

    def batch_metrics(self, out) -> dict:
        return {"unscored_documents": out.column(self.cfg.column).null_count}

    def process_partition(self, batches):
        import torch

        torch.set_num_threads(task_cpus())  # the task's cores, not every core of the executor
        one_thread_per_core()
        for batch in batches:
            yield self.process(batch)

    def _scorer(self) -> Scorer:
        return worker_scorer(self._shipped, self.cfg.device, self.cfg.batch_size, self.cfg.max_chars)

    def open(self) -> None:
        self._scorer()

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        scorer = self._scorer()
        texts = batch.column(schema.TEXT).to_pylist()
        judged = in_languages(batch, self.cfg.languages)
        scores = [None if np.isnan(s) else float(s)
                  for s in scorer.score([t if ok else None for t, ok in zip(texts, judged)])]
        # A reason an earlier step set (a reader's) stands; empty documents are not judged here.
        reasons = (batch.column(schema.DROP_REASON).to_pylist() if schema.DROP_REASON in batch.schema.names
                   else [None] * batch.num_rows)
        if self.cfg.min_score is not None:
            for i, s in enumerate(scores):
                if reasons[i] is None and s is not None and s < self.cfg.min_score:
                    reasons[i] = "model_score_low"
        return set_columns(batch, output_schema(self, batch.schema), {
            self.cfg.column: scores, schema.DROP_REASON: reasons, schema.IN_BYTES: text_bytes(batch.column(schema.TEXT)),
        })
