"""The document table (DESIGN.md contract 1) in one place: column names and Arrow schemas.

Every stage reads and writes Parquet with these required columns; each stage adds
its own columns and never rewrites another stage's (the filter stage's line-level
cleaners are the one documented exception: they shorten `text`).
"""

import pyarrow as pa

ID, URL, TEXT, SOURCE, CRAWL_DATE = "id", "url", "text", "source", "crawl_date"
TITLE, HTML, CHARSET = "title", "html", "charset"
LANG, LANG_SCORE = "lang", "lang_score"
QUALITY_SCORE = "quality_score"  # fastText quality classifier (P(positive))
MODEL_SCORE = "model_score"  # transformer quality scorer (DistilRoBERTa role)
DOMAIN, DOMAIN_SCORE, TOPIC = "domain", "domain_score", "topic"
CONTAMINATED_BY = "contaminated_by"  # evaluation sets a document shares n-grams with
N_TOKENS, SHARD = "n_tokens", "shard"  # tokenize stage: tokens written (EOS included), shard file

# Internal to a stage's output before it is split into kept and dropped rows.
DROP_REASON = "drop_reason"
IN_BYTES = "_in_bytes"

TIMESTAMP = pa.timestamp("us", tz="UTC")

DOCUMENT = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(URL, pa.string()),
        pa.field(TEXT, pa.string()),
        pa.field(SOURCE, pa.string()),
        pa.field(CRAWL_DATE, TIMESTAMP),
    ]
)

# What a reader produces: raw pages before extraction. `html` is bytes because the
# charset is only known after detection; `text` is set instead for text-only inputs.
RAW = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(URL, pa.string()),
        pa.field(SOURCE, pa.string()),
        pa.field(CRAWL_DATE, TIMESTAMP),
        pa.field(HTML, pa.binary()),
        pa.field(CHARSET, pa.string()),
        pa.field(TEXT, pa.string()),
        pa.field(DROP_REASON, pa.string()),
        pa.field(IN_BYTES, pa.int64()),
    ]
)


def missing_columns(names: list[str], required: list[str] | None = None) -> list[str]:
    required = required or DOCUMENT.names
    return [c for c in required if c not in names]
