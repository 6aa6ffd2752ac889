"""Deduplication stages: URL (Llama 3: the newest page wins) and exact text.

Both are corpus-wide: a key per document (a normalized URL, a hash of normalized
text), one winner per key chosen by an aggregate (Spark combines it map-side, so a
key held by half the corpus is still spread over every task), and a join back that
marks every other document of the key as a duplicate. Nothing reaches the driver.
The winner rules are total orders, so the result does not depend on partitioning:

- URL dedup keeps the latest `crawl_date`; among equal dates, the smallest `id`.
- Exact dedup keeps the earliest `crawl_date` (the first time the text was seen);
  among equal dates, the smallest `id`.

Documents without a URL (or without text) have no key and are kept. `id` must be
unique per document, which kiln's readers guarantee.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from kiln.curation import schema
from kiln.curation.stage import Stage

URL_KEY, TEXT_HASH = "url_normalized", "text_hash"
DEFAULT_PORTS = {"http": 80, "https": 443}
# Click and campaign trackers that change the URL, never the page.
TRACKING_PARAMS = ["utm_*", "gclid", "dclid", "fbclid", "msclkid", "yclid", "mc_cid", "mc_eid", "_ga", "_gl",
                   "igshid", "ref_src", "spm", "wt.mc_id"]
_NEVER = 2**63 - 1  # sorts after every real timestamp: documents without a date lose ties


@dataclass
class UrlDedupConfig:
    tracking_params: list[str] = field(default_factory=lambda: list(TRACKING_PARAMS))  # query keys removed; "x_*" is a prefix
    sort_query: bool = True  # ?b=2&a=1 and ?a=1&b=2 are the same page


@dataclass
class ExactDedupConfig:
    lowercase: bool = True  # fold case before hashing
    collapse_whitespace: bool = True  # runs of whitespace count as one space; leading/trailing ignored


def normalize_url(url: str | None, tracking_params: list[str] = TRACKING_PARAMS, sort_query: bool = True) -> str | None:
    """The page a URL names: lower-case scheme and host, no default port, no fragment,
    no trailing slash, no tracking parameters. None for an empty URL."""
    if not url or not url.strip():
        return None
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: keep the netloc as written, lower-cased
        host, port = parts.netloc.lower(), None
    netloc = host if port is None or DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
    path = parts.path.rstrip("/")
    exact = {p.lower() for p in tracking_params if not p.endswith("*")}
    prefixes = tuple(p[:-1].lower() for p in tracking_params if p.endswith("*"))
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k.lower() not in exact and not (prefixes and k.lower().startswith(prefixes))]
    if sort_query:
        query.sort()
    return urlunsplit((scheme, netloc, path, urlencode(query), ""))


def _mark_duplicates(df: DataFrame, key: str, order, reason: str) -> DataFrame:
    """`df` with drop_reason = `reason` for every row of a key but its winner (min `order`)."""
    winners = (df.where(F.col(key).isNotNull())
               .groupBy(key).agg(F.min(order).getField(schema.ID).alias("_winner")))
    joined = df.join(winners, on=key, how="left")
    duplicate = F.col("_winner").isNotNull() & (F.col(schema.ID) != F.col("_winner"))
    return (joined.withColumn(schema.DROP_REASON, F.when(duplicate, F.lit(reason)).cast("string"))
            .withColumn(schema.IN_BYTES, F.coalesce(F.octet_length(schema.TEXT), F.lit(0)).cast("long"))
            .drop("_winner"))


def _date_key(newest_first: bool):
    micros = F.unix_micros(F.col(schema.CRAWL_DATE))
    return F.coalesce(-micros if newest_first else micros, F.lit(_NEVER))


class UrlDedupStage(Stage):
    name = "dedup_url"

    def __init__(self, cfg: UrlDedupConfig | None = None):
        self.cfg = cfg or UrlDedupConfig()

    def settings(self) -> dict:
        return asdict(self.cfg)

    def transform(self, df) -> DataFrame:
        params, sort_query = list(self.cfg.tracking_params), self.cfg.sort_query

        @F.udf("string", useArrow=True)
        def normalize(url):
            return normalize_url(url, params, sort_query)

        keyed = df.withColumn(URL_KEY, normalize(F.col(schema.URL)))
        order = F.struct(_date_key(newest_first=True).alias("date"), F.col(schema.ID).alias(schema.ID))
        return _mark_duplicates(keyed, URL_KEY, order, "url_duplicate")


class ExactDedupStage(Stage):
    name = "dedup_exact"

    def __init__(self, cfg: ExactDedupConfig | None = None):
        self.cfg = cfg or ExactDedupConfig()

    def settings(self) -> dict:
        return asdict(self.cfg)

    def transform(self, df) -> DataFrame:
        text = F.col(schema.TEXT)
        if self.cfg.collapse_whitespace:
            text = F.regexp_replace(F.trim(text), r"\s+", " ")
        if self.cfg.lowercase:
            text = F.lower(text)
        keyed = df.withColumn(TEXT_HASH, F.when(F.col(schema.TEXT).isNotNull(), F.sha2(text, 256)))
        order = F.struct(_date_key(newest_first=False).alias("date"), F.col(schema.ID).alias(schema.ID))
        return _mark_duplicates(keyed, TEXT_HASH, order, "exact_duplicate")
