"""Language ID with fastText's lid.176 (176 languages), as Llama 3 used.

The model file is found offline: the `model_path` option (e.g. `lid.176.bin`),
else `$KILN_LID_MODEL`, else the `lid.176.ftz` that `make setup` unpacks into
`.venv/share/kiln/`. The driver ships it to executors with `SparkFiles`; each
Python worker loads it once and predicts a batch of documents in one call.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from kiln.config import ConfigError
from kiln.formats import schema
from kiln.curation.spark import load_once, ship
from kiln.curation.stage import Stage, output_schema, set_columns, text_bytes

DEFAULT_MODEL = "lid.176.ftz"


@dataclass
class LangIdConfig:
    model_path: str = ""  # fastText LID model (.ftz or .bin); empty = $KILN_LID_MODEL or the bundled lid.176.ftz
    keep_languages: list[str] = field(default_factory=list)  # ISO codes to keep (e.g. ["en", "de"]); empty keeps all
    min_score: float = 0.0  # documents whose top language scores lower are dropped as lang_low_score
    max_chars: int = 10_000  # characters of each document given to the model


def resolve_model_path(configured: str = "") -> str:
    candidates = [configured] if configured else [
        os.environ.get("KILN_LID_MODEL", ""),
        str(Path(sys.prefix) / "share" / "kiln" / DEFAULT_MODEL),
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return str(Path(c).resolve())
    where = configured or " or ".join(c for c in candidates if c)
    raise ConfigError(f"{where}: fastText language-ID model not found (run `make setup`, or pass --model)")


def load_fasttext(path: str):
    import fasttext

    try:
        return fasttext.load_model(path)
    except ValueError as e:
        raise ConfigError(f"{path}: cannot load as a fastText model: {e}") from e


class LangIdStage(Stage):
    """fastText lid.176 language ID (176 languages): adds lang, lang_score."""
    name = "langid"

    def __init__(self, cfg: LangIdConfig | None = None):
        self.cfg = cfg or LangIdConfig()
        self.model_path = resolve_model_path(self.cfg.model_path)
        self._shipped_name = self.model_path
        self.keep = set(self.cfg.keep_languages)

    def settings(self) -> dict:
        return {**asdict(self.cfg), "model": os.path.basename(self.model_path),
                "model_bytes": os.path.getsize(self.model_path)}

    def prepare(self, spark, df) -> None:
        # Fail on the driver, with the path, before any task starts.
        labels = load_fasttext(self.model_path).get_labels()
        if "__label__en" not in labels:
            raise ConfigError(f"{self.model_path}: not a language-ID model (its labels: {', '.join(labels[:5])})")
        self._shipped_name = ship(spark, self.model_path)

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(schema.LANG, pa.string()), pa.field(schema.LANG_SCORE, pa.float32())]

    def predict(self, texts: list[str]) -> tuple[list[str], list[float]]:
        model = load_once(self._shipped_name, load_fasttext)
        # fastText reads one line per example: newlines would end the input early.
        lines = [" ".join((t or "")[: self.cfg.max_chars].split()) for t in texts]
        labels, scores = model.predict(lines, k=1)
        langs = [lab[0].removeprefix("__label__") if lab else None for lab in labels]
        return langs, [float(s[0]) if len(s) else 0.0 for s in scores]

    def open(self) -> None:
        load_once(self._shipped_name, load_fasttext)

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        texts = batch.column(schema.TEXT).to_pylist()
        langs, scores = self.predict(texts)
        reasons = []
        for lang, score in zip(langs, scores):
            if score < self.cfg.min_score:
                reasons.append("lang_low_score")
            elif self.keep and lang not in self.keep:
                reasons.append("lang_not_kept")
            else:
                reasons.append(None)
        return set_columns(batch, output_schema(self, batch.schema), {
            schema.LANG: langs, schema.LANG_SCORE: scores, schema.DROP_REASON: reasons,
            schema.IN_BYTES: text_bytes(batch.column(schema.TEXT)),
        })
