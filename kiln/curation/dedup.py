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

from kiln.curation.spark import spark_type
from kiln.formats import schema
from kiln.curation.stage import Stage, apply_stage

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
    """URL dedup: the newest crawl of each normalized URL is kept.

    Llama 3 URL dedup: URLs are normalized (case of scheme and host, default ports,
    fragment, trailing slash, tracking parameters, query order) and the page with the
    latest crawl_date is kept (ties: smallest id). Adds url_normalized; drops the others
    as url_duplicate."""
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
    """Exact dedup on a hash of normalized text.

    SHA-256 of the text with whitespace collapsed and case folded; the earliest crawl of
    each text is kept (ties: smallest id). Adds text_hash; drops the others as
    exact_duplicate."""
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


# --------------------------------------------------------------------------- lines (ccNet / Llama 3)

@dataclass
class LineDedupConfig:
    bucket_docs: int = 30_000_000  # documents per bucket (Llama 3: 30M); lines are counted within a bucket
    max_count: int = 6  # a line in more than this many documents of its bucket is removed everywhere
    min_chars: int = 50  # documents shorter than this after removal are dropped as line_dedup_too_short


def normalize_line(line: str) -> str:
    """ccNet's normalization for line dedup: case, digits and punctuation do not make
    a line different ("Page 3 of 10" and "page 4 of 10" are one line)."""
    import unicodedata

    line = "".join("0" if ch.isdigit() else ch for ch in line.strip().lower()
                   if not unicodedata.category(ch).startswith("P"))
    return " ".join(line.split())


def line_hash(normalized: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


class LineDedupStage(Stage):
    """Removes lines repeated across many documents (boilerplate, navigation, legal text).

    Each document falls in one of ceil(N / bucket_docs) buckets by its id. Three
    distributed passes: (1) every document's distinct normalized-line hashes, counted
    per bucket; (2) the (bucket, hash) pairs seen in more than `max_count` documents,
    joined back to the documents that hold them; (3) per document, those lines are
    removed. A document left empty is dropped as `line_dedup_empty`, one left shorter
    than `min_chars` as `line_dedup_too_short`. Lines and characters removed are
    counted in stats.json (`extra.metrics`).
    """

    name = "dedup_lines"
    LINES_REMOVED, CHARS_REMOVED, DROP_HASHES = "_lines_removed", "_chars_removed", "_drop_hashes"

    def __init__(self, cfg: LineDedupConfig | None = None):
        self.cfg = cfg or LineDedupConfig()

    def settings(self) -> dict:
        return asdict(self.cfg)

    def internal_columns(self) -> list[str]:
        return [self.LINES_REMOVED, self.CHARS_REMOVED]

    def metrics(self) -> dict:
        return {"lines_removed": F.coalesce(F.sum(self.LINES_REMOVED), F.lit(0)),
                "chars_removed": F.coalesce(F.sum(self.CHARS_REMOVED), F.lit(0))}

    def transform(self, df) -> DataFrame:
        import math

        import pyarrow as pa

        n_buckets = max(1, math.ceil(df.count() / self.cfg.bucket_docs))
        bucket = (F.abs(F.xxhash64(F.col(schema.ID))) % n_buckets).cast("int")
        pairs_schema = pa.schema([(schema.ID, pa.string()), ("hash", pa.int64())])

        def doc_line_hashes(batches):
            for batch in batches:
                ids, hashes = [], []
                for id_, text in zip(batch.column(schema.ID).to_pylist(), batch.column(schema.TEXT).to_pylist()):
                    seen = {line_hash(n) for n in map(normalize_line, (text or "").split("\n")) if n}
                    ids.extend([id_] * len(seen))
                    hashes.extend(seen)
                yield pa.RecordBatch.from_arrays([pa.array(ids, pa.string()), pa.array(hashes, pa.int64())],
                                                 schema=pairs_schema)

        pairs = (df.select(schema.ID, schema.TEXT).mapInArrow(doc_line_hashes, spark_type(pairs_schema))
                 .withColumn("bucket", bucket))
        frequent = (pairs.groupBy("bucket", "hash").count()
                    .where(F.col("count") > self.cfg.max_count).select("bucket", "hash"))
        to_drop = (pairs.join(frequent, ["bucket", "hash"])
                   .groupBy(schema.ID).agg(F.collect_list("hash").alias(self.DROP_HASHES)))
        # The per-document pass (`process`) runs over the documents with their hashes to drop.
        return apply_stage(self, df.join(to_drop, on=schema.ID, how="left"))

    def output_fields(self) -> list:
        import pyarrow as pa

        return [pa.field(schema.TEXT, pa.string()), pa.field(self.LINES_REMOVED, pa.int64()),
                pa.field(self.CHARS_REMOVED, pa.int64())]

    def removed_fields(self) -> list[str]:
        return [self.DROP_HASHES]

    def process(self, batch):
        from kiln.curation.stage import output_schema, set_columns, text_bytes

        texts = batch.column(schema.TEXT).to_pylist()
        drops = batch.column(self.DROP_HASHES).to_pylist()
        new_texts, reasons, lines_removed, chars_removed = [], [], [], []
        for text, drop in zip(texts, drops):
            drop = set(drop or ())
            kept, n_lines, n_chars = [], 0, 0
            for line in (text or "").split("\n"):
                normalized = normalize_line(line)
                if normalized and line_hash(normalized) in drop:
                    n_lines += 1
                    n_chars += len(line)
                else:
                    kept.append(line)
            new = "\n".join(kept).strip() if n_lines else text
            reason = None
            if n_lines and not new:
                reason = "line_dedup_empty"
            elif n_lines and len(new) < self.cfg.min_chars:
                reason = "line_dedup_too_short"
            new_texts.append(new)
            reasons.append(reason)
            lines_removed.append(n_lines)
            chars_removed.append(n_chars)
        return set_columns(batch, output_schema(self, batch.schema), {
            schema.TEXT: new_texts, schema.DROP_REASON: reasons, schema.IN_BYTES: text_bytes(texts),
            self.LINES_REMOVED: lines_removed, self.CHARS_REMOVED: chars_removed})


# --------------------------------------------------------------------------- MinHash-LSH

@dataclass
class MinHashConfig:
    ngram: int = 5  # word n-gram shingles (characters one by one for CJK scripts, see filters.llama3.tokens)
    bands: int = 14  # LSH bands (FineWeb: 14 x 8)
    rows: int = 8  # hash values per band
    seed: int = 1  # MinHash permutation seed
    max_shingles: int = 100_000  # shingles per document beyond this are ignored (very long documents)
    per_language: bool = False  # only documents of the same `lang` can be duplicates
    max_iterations: int = 50  # connected-components rounds before giving up (a stage error, not a silent cut)
    threshold: float = 0.0  # when set, bands x rows are chosen for this Jaccard (datasketch's optimum over bands*rows hashes)
    verify: bool = False  # compute the exact shingle Jaccard of every candidate pair and drop pairs below verify_threshold
    verify_threshold: float = 0.7  # the Jaccard a verified pair needs

    def band_rows(self) -> tuple[int, int]:
        if not self.threshold:
            return self.bands, self.rows
        from datasketch.lsh import _optimal_param

        return _optimal_param(self.threshold, self.bands * self.rows, 0.5, 0.5)


def shingles(text: str, n: int, limit: int) -> set[bytes]:
    """Word n-grams of the normalized text. CJK characters are tokens of their own, so
    unsegmented scripts get character n-grams; a text shorter than n is one shingle."""
    from kiln.curation.filters.llama3 import tokens

    toks = tokens(text or "")
    if not toks:
        return set()
    if len(toks) < n:
        return {" ".join(toks).encode()}
    return {" ".join(toks[i:i + n]).encode() for i in range(min(len(toks) - n + 1, limit))}


def connected_components(edges: DataFrame, max_iterations: int = 50) -> DataFrame:
    """(id, component) for every node of an undirected edge list (src, dst), computed in
    Spark by iterated minimum-label propagation: each round every node takes the
    smallest label among itself and its neighbours, until no label changes. The
    component is the smallest id in it. Each round is a join and a groupBy; nothing
    but the count of changed labels reaches the driver."""
    both = edges.select("src", "dst").union(edges.select(F.col("dst").alias("src"), F.col("src").alias("dst")))
    both = both.distinct().localCheckpoint()
    labels = both.select(F.col("src").alias("id")).distinct().withColumn("label", F.col("id")).localCheckpoint()
    for _ in range(max_iterations):
        proposals = (both.join(labels.withColumnRenamed("id", "dst").withColumnRenamed("label", "nlabel"), "dst")
                     .groupBy(F.col("src").alias("id")).agg(F.min("nlabel").alias("nlabel")))
        updated = (labels.join(proposals, "id", "left")
                   .select("id", F.least("label", F.coalesce("nlabel", "label")).alias("new"), "label")
                   .localCheckpoint())
        changed = updated.where(F.col("new") != F.col("label")).count()
        labels = updated.select("id", F.col("new").alias("label"))
        if changed == 0:
            return labels.withColumnRenamed("label", "component")
    raise RuntimeError(f"connected components did not converge in {max_iterations} rounds")


class MinHashDedupStage(Stage):
    """Fuzzy dedup: MinHash signatures (datasketch, vectorized per document), LSH bands,
    connected components in Spark; one document kept per component.

    Kept: the component's smallest id (documented rule: deterministic, independent of
    partitioning). The others are dropped as `minhash_duplicate`; every document gets
    `minhash_cluster` (its component's smallest id; its own id when it has no match).
    Candidate edges join each band bucket's documents to the bucket's smallest id (a
    star), so a bucket of k documents gives k-1 edges, not k^2/2 pairs.
    """

    name = "dedup_minhash"
    CLUSTER, CLUSTER_SIZE = "minhash_cluster", "_cluster_size"

    def __init__(self, cfg: MinHashConfig | None = None):
        self.cfg = cfg or MinHashConfig()

    def settings(self) -> dict:
        return asdict(self.cfg)

    def output_fields(self) -> list:
        import pyarrow as pa

        return [pa.field(self.CLUSTER, pa.string())]

    def band_hashes(self, batches):
        """(id, lang, band, band_hash) for every band of every non-empty document."""
        import hashlib

        import pyarrow as pa
        from datasketch import MinHash

        cfg = self.cfg
        n_bands, n_rows = cfg.band_rows()
        out_schema = pa.schema([(schema.ID, pa.string()), ("lang", pa.string()), ("band", pa.int32()),
                                ("band_hash", pa.int64())])
        mh = MinHash(num_perm=n_bands * n_rows, seed=cfg.seed)
        for batch in batches:
            ids, langs, bands, hashes = [], [], [], []
            texts = batch.column(schema.TEXT).to_pylist()
            doc_langs = (batch.column(schema.LANG).to_pylist() if schema.LANG in batch.schema.names
                         else [None] * batch.num_rows)
            for id_, text, lang in zip(batch.column(schema.ID).to_pylist(), texts, doc_langs):
                sh = shingles(text, cfg.ngram, cfg.max_shingles)
                if not sh:
                    continue
                mh.clear()
                mh.update_batch(list(sh))
                values = mh.hashvalues
                for b in range(n_bands):
                    digest = hashlib.blake2b(values[b * n_rows:(b + 1) * n_rows].tobytes(), digest_size=8)
                    ids.append(id_)
                    langs.append((lang or "") if cfg.per_language else "")
                    bands.append(b)
                    hashes.append(int.from_bytes(digest.digest(), "little", signed=True))
            yield pa.RecordBatch.from_arrays([pa.array(ids, pa.string()), pa.array(langs, pa.string()),
                                              pa.array(bands, pa.int32()), pa.array(hashes, pa.int64())],
                                             schema=out_schema)

    def transform(self, df) -> DataFrame:
        import pyarrow as pa

        band_schema = pa.schema([(schema.ID, pa.string()), ("lang", pa.string()), ("band", pa.int32()),
                                 ("band_hash", pa.int64())])
        cols = [schema.ID, schema.TEXT] + ([schema.LANG] if schema.LANG in df.columns else [])
        bands = df.select(*cols).mapInArrow(self.band_hashes, spark_type(band_schema))
        key = ["lang", "band", "band_hash"]
        roots = bands.groupBy(*key).agg(F.min(schema.ID).alias("root"))
        edges = (bands.join(roots, key).where(F.col(schema.ID) != F.col("root"))
                 .select(F.col(schema.ID).alias("src"), F.col("root").alias("dst")).distinct())
        if self.cfg.verify:
            edges = self.verified(edges, df)
        components = connected_components(edges, self.cfg.max_iterations)
        joined = df.join(components, schema.ID, "left")
        cluster = F.coalesce(F.col("component"), F.col(schema.ID))
        joined = joined.withColumn(self.CLUSTER, cluster).drop("component")
        sizes = joined.groupBy(self.CLUSTER).agg(F.count(F.lit(1)).alias(self.CLUSTER_SIZE))
        return (joined.join(sizes, self.CLUSTER)
                .withColumn(schema.DROP_REASON,
                            F.when(F.col(self.CLUSTER) != F.col(schema.ID), F.lit("minhash_duplicate")).cast("string"))
                .withColumn(schema.IN_BYTES, F.coalesce(F.octet_length(schema.TEXT), F.lit(0)).cast("long")))

    def verified(self, edges: DataFrame, df: DataFrame) -> DataFrame:
        """The candidate edges whose exact shingle Jaccard reaches verify_threshold."""
        import pyarrow as pa

        texts = df.select(schema.ID, schema.TEXT)
        pairs = (edges.join(texts.withColumnRenamed(schema.ID, "src").withColumnRenamed(schema.TEXT, "src_text"), "src")
                 .join(texts.withColumnRenamed(schema.ID, "dst").withColumnRenamed(schema.TEXT, "dst_text"), "dst"))
        cfg = self.cfg
        out_schema = pa.schema([("src", pa.string()), ("dst", pa.string())])

        def check(batches):
            for batch in batches:
                d = {name: batch.column(name).to_pylist() for name in ("src", "dst", "src_text", "dst_text")}
                keep = [i for i in range(batch.num_rows)
                        if jaccard(shingles(d["src_text"][i], cfg.ngram, cfg.max_shingles),
                                   shingles(d["dst_text"][i], cfg.ngram, cfg.max_shingles)) >= cfg.verify_threshold]
                yield pa.RecordBatch.from_arrays([pa.array([d["src"][i] for i in keep], pa.string()),
                                                  pa.array([d["dst"][i] for i in keep], pa.string())],
                                                 schema=out_schema)

        return pairs.mapInArrow(check, spark_type(out_schema))

    def internal_columns(self) -> list[str]:
        return [self.CLUSTER_SIZE]

    def metrics(self) -> dict:
        """Clusters by size (counted at each cluster's kept document), for stats.json."""
        kept, size = F.col(schema.DROP_REASON).isNull(), F.col(self.CLUSTER_SIZE)
        buckets = {"clusters_size_1": size == 1, "clusters_size_2": size == 2,
                   "clusters_size_3_to_4": size.between(3, 4), "clusters_size_5_to_16": size.between(5, 16),
                   "clusters_size_17_up": size >= 17}
        return {name: F.coalesce(F.sum(F.when(kept & cond, 1).otherwise(0)), F.lit(0))
                for name, cond in buckets.items()}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0
