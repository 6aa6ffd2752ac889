"""Readers: WARC, JSONL and Parquet inputs into the raw page table (`schema.RAW`).

Each input file is read by one Spark task (`mapInArrow` over a one-row-per-file
table), so reading is parallel across files and nothing is collected to the
driver. Damaged input never stops a job: a corrupt gzip member becomes one row
dropped as `bad_record` and reading resumes at the next member; a file cut short
ends with one `truncated_record` row; non-HTML responses are `not_html`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

import pyarrow as pa

from kiln.config import ConfigError
from kiln.curation import paths
from kiln.curation.spark import spark_type
from kiln.formats import schema

HTML_TYPES = ("text/html", "application/xhtml+xml")
BATCH_ROWS = 256
GZIP_MAGIC = b"\x1f\x8b\x08"
WARC_MAGIC = b"WARC/1."


@dataclass
class ReadConfig:
    format: str = "auto"  # auto (by file name) | warc | jsonl | parquet
    html_column: str = "html"  # JSONL/Parquet column holding raw HTML
    text_column: str = ""  # JSONL/Parquet column holding plain text; set it to skip extraction
    url_column: str = "url"  # JSONL/Parquet column with the page URL
    date_column: str = "crawl_date"  # JSONL/Parquet column with the crawl date (ISO 8601)
    id_column: str = ""  # JSONL/Parquet column with a stable id; hashed from url+date+content when empty
    max_html_bytes: int = 2_000_000  # larger pages are dropped as html_too_large without being held in memory
    partitions: int = 0  # partitions after reading; 0 = 2 x default parallelism when files are fewer


def doc_id(url: str | None, date: datetime | None, content: bytes) -> str:
    h = hashlib.sha256()
    h.update((url or "").encode("utf-8", "surrogatepass"))
    h.update(b"\n")
    h.update((date.isoformat() if date else "").encode())
    h.update(b"\n")
    h.update(content)
    return h.hexdigest()[:32]


def parse_date(value) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    try:
        parsed = datetime.fromisoformat(str(value).strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


class _Rows:
    """Accumulates raw rows and emits Arrow batches of the RAW schema."""

    def __init__(self):
        self.cols = {name: [] for name in schema.RAW.names}

    def add(self, *, id, url=None, source=None, crawl_date=None, html=None, charset=None,
            text=None, drop_reason=None, in_bytes=0):
        c = self.cols
        c[schema.ID].append(id)
        c[schema.URL].append(url)
        c[schema.SOURCE].append(source)
        c[schema.CRAWL_DATE].append(crawl_date)
        c[schema.HTML].append(html)
        c[schema.CHARSET].append(charset)
        c[schema.TEXT].append(text)
        c[schema.DROP_REASON].append(drop_reason)
        c[schema.IN_BYTES].append(in_bytes)

    def __len__(self):
        return len(self.cols[schema.ID])

    def flush(self) -> Iterator[pa.RecordBatch]:
        if len(self):
            yield pa.RecordBatch.from_pydict(self.cols, schema=schema.RAW)
            self.cols = {name: [] for name in schema.RAW.names}


# --------------------------------------------------------------------------- WARC

def _content_type(record) -> tuple[str, str | None]:
    headers = record.http_headers if record.rec_type == "response" else record.rec_headers
    value = (headers.get_header("Content-Type") if headers else None) or ""
    mime, _, params = value.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, val = param.strip().partition("=")
        if key.lower() == "charset" and val:
            charset = val.strip().strip("\"'").lower()
    return mime.strip().lower(), charset


def _looks_like_html(head: bytes) -> bool:
    head = head.lstrip()[:512].lower()
    return head.startswith((b"<!doctype html", b"<html")) or b"<html" in head


def _next_member(f, start: int, magic: bytes) -> int | None:
    """Offset of the next record start (gzip member or 'WARC/1.') after `start`."""
    f.seek(start)
    carry = b""
    pos = start
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            return None
        buf = carry + chunk
        found = buf.find(magic)
        if found >= 0:
            return pos - len(carry) + found
        carry = buf[-(len(magic) - 1):]
        pos += len(chunk)


def read_warc(path: str, cfg: ReadConfig) -> Iterator[pa.RecordBatch]:
    from warcio.archiveiterator import ArchiveIterator

    rows = _Rows()
    gz = path.lower().endswith(".gz")
    magic = GZIP_MAGIC if gz else WARC_MAGIC
    with paths.open_binary(path) as f:
        size = f.seek(0, 2)
        offset = 0
        while offset is not None:
            f.seek(offset)
            it = ArchiveIterator(f, check_digests=False)
            record_offset = offset  # start of the record being read
            try:
                for record in it:
                    row = _warc_record(record, path, record_offset, cfg)
                    # Asked only after the payload is read: warcio skips to the record's end.
                    end = offset + it.get_record_offset() + it.get_record_length()
                    # warcio yields a record cut short without complaint: headers missing,
                    # or fewer payload bytes than its Content-Length.
                    if record.rec_type is None or getattr(record.raw_stream, "limit", 0) > 0:
                        raise EOFError("record cut short")
                    if row is not None:
                        rows.add(**row)
                    record_offset = end
                    if len(rows) >= BATCH_ROWS:
                        yield from rows.flush()
                if record_offset >= size:
                    break
                error = "unparsed tail"  # warcio ends quietly on a gzip member cut short
            except Exception as e:  # noqa: BLE001 - any decoding failure is a counted drop
                error = type(e).__name__
            resume = _next_member(f, record_offset + 1, magic)
            reason = "bad_record" if resume is not None else "truncated_record"
            rows.add(id=doc_id(f"{path}#{record_offset}", None, error.encode()), source=path, drop_reason=reason)
            offset = resume
    yield from rows.flush()


def _read_capped(stream, limit: int) -> bytes:
    # In chunks up to the cap: an oversized page never sits whole in memory.
    chunks, total = [], 0
    while total < limit:
        chunk = stream.read(min(1 << 16, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _warc_record(record, path: str, offset: int, cfg: ReadConfig) -> dict | None:
    """The raw-table row for a record, or None for records that are not documents."""
    if record.rec_type not in ("response", "resource"):
        return None  # request / metadata / warcinfo / revisit records are not documents
    url = record.rec_headers.get_header("WARC-Target-URI")
    date = parse_date(record.rec_headers.get_header("WARC-Date"))
    record_id = record.rec_headers.get_header("WARC-Record-ID") or f"{path}#{offset}"
    mime, charset = _content_type(record)
    body = _read_capped(record.content_stream(), cfg.max_html_bytes + 1)
    row = dict(id=doc_id(url, date, record_id.encode()), url=url, source=path, crawl_date=date,
               charset=charset, in_bytes=len(body))
    status = record.http_headers.get_statuscode() if record.http_headers else "200"
    if mime and mime not in HTML_TYPES or (not mime and not _looks_like_html(body)):
        row["drop_reason"] = "not_html"
    elif status and not str(status).startswith("2"):
        row["drop_reason"] = "http_not_ok"
    elif len(body) > cfg.max_html_bytes:
        row["drop_reason"] = "html_too_large"
    elif not body.strip():
        row["drop_reason"] = "empty_page"
    else:
        row["html"] = body
    return row


# --------------------------------------------------------------------------- JSONL

def read_jsonl(path: str, cfg: ReadConfig) -> Iterator[pa.RecordBatch]:
    import orjson

    column = cfg.text_column or cfg.html_column
    rows = _Rows()
    n_lines = n_with_content = 0
    with paths.open_lines(path) as f:
        for line_no, line in enumerate(_lines(f, path, rows)):
            if not line.strip():
                continue
            n_lines += 1
            try:
                obj = orjson.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except (orjson.JSONDecodeError, ValueError):
                rows.add(id=doc_id(f"{path}#{line_no}", None, line[:64]), source=path,
                         drop_reason="bad_record", in_bytes=len(line))
                continue
            content = obj.get(column)
            if content is not None:
                n_with_content += 1
            _add_structured(rows, obj.get(cfg.url_column), obj.get(cfg.date_column),
                            obj.get(cfg.id_column) if cfg.id_column else None, content, path, cfg)
            if len(rows) >= BATCH_ROWS:
                yield from rows.flush()
    if n_lines and not n_with_content:
        raise ConfigError(f"{path}: no record has the column {column!r}; set --html-column or --text-column")
    yield from rows.flush()


def _lines(f, path: str, rows: _Rows) -> Iterator[bytes]:
    """Lines of a (possibly compressed) file; a truncated stream ends with a counted drop."""
    try:
        yield from f
    except Exception as e:  # noqa: BLE001 - gzip's EOFError, zstandard's ZstdError, OSError...
        rows.add(id=doc_id(f"{path}#eof", None, str(e).encode()), source=path, drop_reason="truncated_record")


def _add_structured(rows: _Rows, url, date, given_id, content, path: str, cfg: ReadConfig) -> None:
    date = parse_date(date)
    url = None if url is None else str(url)
    if cfg.text_column:
        text = None if content is None else str(content)
        data = (text or "").encode("utf-8", "surrogatepass")
        base = dict(id=str(given_id) if given_id else doc_id(url, date, data), url=url, source=path,
                    crawl_date=date, in_bytes=len(data))
        if not text or not text.strip():
            rows.add(**base, drop_reason="empty_page")
        else:
            rows.add(**base, text=text)
        return
    html = content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content
    html = html or b""
    base = dict(id=str(given_id) if given_id else doc_id(url, date, html), url=url, source=path,
                crawl_date=date, in_bytes=len(html), charset="utf-8" if isinstance(content, str) else None)
    if len(html) > cfg.max_html_bytes:
        rows.add(**base, drop_reason="html_too_large")
    elif not html.strip():
        rows.add(**base, drop_reason="empty_page")
    else:
        rows.add(**base, html=bytes(html))


# --------------------------------------------------------------------------- Spark

class RawSource:
    """WARC or JSONL files as raw pages, one Spark task per file.

    A stage applied to a RawSource runs the reader inside its own Python function
    (`map_in_arrow`), so the HTML does not travel Python -> JVM -> Python between
    reading and extraction. When there are fewer files than cores, the pages are
    repartitioned first, and then they have to go through the JVM anyway.
    """

    arrow_schema = schema.RAW

    def __init__(self, files_df, read_partition, partitions: int):
        self.files_df = files_df
        self.read_partition = read_partition
        self.partitions = partitions

    def to_df(self):
        df = self.files_df.mapInArrow(self.read_partition, spark_type(schema.RAW))
        return df.repartition(self.partitions) if self.partitions else df

    def map_in_arrow(self, fn, spark_schema):
        if self.partitions:
            return self.to_df().mapInArrow(fn, spark_schema)
        read = self.read_partition
        return self.files_df.mapInArrow(lambda batches: fn(read(batches)), spark_schema)


def read_raw(spark, inputs: list[str], cfg: ReadConfig):
    """All inputs as raw pages (schema.RAW; drops included): a RawSource for WARC and
    JSONL files, a DataFrame for Parquet."""
    files = paths.expand_inputs(inputs)
    fmt = cfg.format
    formats = {paths.detect_format(f) for f in files} if fmt == "auto" else {fmt}
    if len(formats) != 1:
        raise ConfigError(f"inputs mix formats {sorted(formats)}; run one stage per format")
    fmt = formats.pop()
    parallelism = spark.sparkContext.defaultParallelism
    # A single large WARC would otherwise be extracted by one task.
    partitions = cfg.partitions or (2 * parallelism if len(files) < parallelism else 0)
    if fmt == "parquet":
        df = _read_parquet(spark, files, cfg)
        return df.repartition(partitions) if partitions else df
    if fmt not in ("warc", "jsonl"):
        raise ConfigError(f"unknown input format {fmt!r} (warc, jsonl, parquet)")
    reader = read_warc if fmt == "warc" else read_jsonl
    # One partition per file: each input file is read by exactly one task.
    files_df = spark.createDataFrame(spark.sparkContext.parallelize([(f,) for f in files], len(files)), "path string")

    def read_partition(batches):
        for batch in batches:
            for path in batch.column(0).to_pylist():
                yield from reader(path, cfg)

    return RawSource(files_df, read_partition, partitions)


def _read_parquet(spark, files: list[str], cfg: ReadConfig):
    df = spark.read.parquet(*files)
    column = cfg.text_column or cfg.html_column
    if column not in df.columns:
        raise ConfigError(
            f"{files[0]}: Parquet input has no column {column!r} (columns: {', '.join(df.columns)})"
        )
    wanted = [c for c in (column, cfg.url_column, cfg.date_column, cfg.id_column) if c and c in df.columns]
    df = df.select(*wanted).withColumn("_source", _input_file())

    def normalize(batches):
        for batch in batches:
            rows = _Rows()
            data = {name: batch.column(name).to_pylist() for name in batch.schema.names}
            n = batch.num_rows
            for i in range(n):
                _add_structured(
                    rows,
                    data.get(cfg.url_column, [None] * n)[i],
                    data.get(cfg.date_column, [None] * n)[i],
                    data[cfg.id_column][i] if cfg.id_column in data else None,
                    data[column][i],
                    data["_source"][i],
                    cfg,
                )
            yield from rows.flush()

    return df.mapInArrow(normalize, spark_type(schema.RAW))


def _input_file():
    from pyspark.sql import functions as F

    return F.input_file_name()
