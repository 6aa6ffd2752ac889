"""Labelled documents for training classifiers, read on the driver.

Training sets (quality positives and negatives, domain labels, scores a larger model
gave) are small next to the corpus, so they are read here into Python lists rather
than through Spark. JSONL (.jsonl, .jsonl.gz, .jsonl.zst) and Parquet files, or kiln
stage directories (their docs/), are accepted. Rows without text are counted, not
silently skipped; a line that is not JSON fails with the file and line number,
because a broken labels file means the user should look at it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from kiln.config import ConfigError
from kiln.curation import paths


@dataclass
class Labelled:
    texts: list[str] = field(default_factory=list)
    labels: list = field(default_factory=list)  # str class names or float scores
    skipped_empty: int = 0  # rows whose text was missing or blank
    files: list[str] = field(default_factory=list)

    def extend(self, other: "Labelled") -> None:
        self.texts += other.texts
        self.labels += other.labels
        self.skipped_empty += other.skipped_empty
        self.files += other.files


def read_labelled(inputs: list[str], text_column: str = "text", label_column: str | None = "label",
                  label: object = None, max_rows: int = 0) -> Labelled:
    """Texts and labels from `inputs`. With `label` given, every row gets that label
    (a positives or negatives file); otherwise it comes from `label_column`."""
    import orjson

    out = Labelled()
    for path in paths.document_files(inputs):
        out.files.append(path)
        if path.endswith(".parquet"):
            rows = _parquet_rows(path, text_column, None if label is not None else label_column)
        else:
            rows = jsonl_rows(path, orjson)
        n_with_text = 0
        for where, row in rows:
            text = row.get(text_column)
            if label is None and label_column not in row:
                raise ConfigError(f"{where}: no {label_column!r} field (set the label column)")
            if not isinstance(text, str) or not text.strip():
                out.skipped_empty += 1
                continue
            n_with_text += 1
            out.texts.append(text)
            out.labels.append(label if label is not None else row[label_column])
            if max_rows and len(out.texts) >= max_rows:
                return out
        if not n_with_text:
            raise ConfigError(f"{path}: no row has text in column {text_column!r}")
    if out.skipped_empty:
        print(f"labels: {out.skipped_empty} rows without text skipped", file=sys.stderr)
    return out


def jsonl_rows(path: str, orjson):
    """(file:line, object) per non-blank line; a line that is not a JSON object fails loudly."""
    with paths.open_lines(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise ConfigError(f"{path}:{line_no}: not JSON: {e}") from e
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{line_no}: not a JSON object")
            yield f"{path}:{line_no}", row


def _parquet_rows(path: str, text_column: str, label_column: str | None):
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    wanted = [c for c in (text_column, label_column) if c]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ConfigError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
    table = pq.read_table(path, columns=wanted)
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}#row{i}", row
