"""Readers: WARC, JSONL and Parquet inputs into the raw page table (`schema.RAW`).

Each input file is read by one Spark task (`mapInArrow` over a one-row-per-file
table), so reading is parallel across files and nothing is collected to the
driver. Damaged input never stops a job: a corrupt gzip member becomes one row
dropped as `bad_record` and reading resumes at the next member; a file cut short
ends with one `truncated_record` row; a file in which no WARC record is found is one
`not_warc` row; non-HTML responses are `not_html`. A JSONL or Parquet value that is
not a string (a number, a list, an object) is dropped as `bad_html_type` or
`bad_text_type`, never turned into a document by `str()`.

WARC records are parsed by warcio or by fastwarc (`[read] warc_reader`). warcio's
handling of damage is the reference: fastwarc reads a gzipped WARC, record by record,
only as far as it can prove that warcio would have read the same records the same way,
and warcio takes over from the first record it cannot vouch for (see `_read_fastwarc`).
"""

from __future__ import annotations

import hashlib
import io
import re
import zlib
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
# Compressed bytes inflated at a time in a one-member gzip: what a corrupt block costs,
# besides everything after it (zlib gives nothing of a call that fails).
INFLATE_CHUNK = 1 << 13
UTF8_BOM = b"\xef\xbb\xbf"
FORMATS = ("auto", "warc", "jsonl", "parquet")
WARC_READERS = ("auto", "fastwarc", "warcio")


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
    # WARC parser: auto (fastwarc where installed: measured faster, benchmarks/extraction_engines.py) | fastwarc |
    # warcio. The same rows either way, damage counted as warcio counts it; plain and whole-file-gzipped WARCs: warcio.
    warc_reader: str = "auto"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"read.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.warc_reader not in WARC_READERS:
            raise ConfigError(f"read.warc_reader must be one of {', '.join(WARC_READERS)}, got {self.warc_reader!r}")
        if self.max_html_bytes <= 0:
            raise ConfigError(f"read.max_html_bytes must be greater than 0, got {self.max_html_bytes}")
        if self.partitions < 0:
            raise ConfigError(f"read.partitions must not be negative, got {self.partitions}")


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

def _content_type(value: str | None) -> tuple[str, str | None]:
    """(mime type, charset) of a Content-Type header's value."""
    mime, _, params = (value or "").partition(";")
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


def _sniff(f, path: str) -> tuple[bool, bool]:
    """(whether the decompressed file begins with 'WARC/1.', whether it is gzipped).

    Contents decide, not the name: a plain WARC may be named .warc.gz. A head too
    damaged or too short to tell counts as a WARC, so the record loop reports it as a
    bad or truncated record."""
    head = f.read(1 << 16)
    f.seek(0)
    if head.startswith(GZIP_MAGIC):
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            start = d.decompress(head, len(WARC_MAGIC))
        except zlib.error:
            return True, True
        return start.startswith(WARC_MAGIC) or (not d.eof and WARC_MAGIC.startswith(start)), True
    if head.startswith(WARC_MAGIC) or WARC_MAGIC.startswith(head) or GZIP_MAGIC.startswith(head):
        return True, False
    # Not a WARC at its start, or a gzipped one whose first bytes are damaged: the name
    # says which record starts to look for.
    return False, path.lower().endswith(".gz")


def _one_member(f, limit: int = 1 << 28) -> bool:
    """Whether a gzipped WARC's first gzip member goes on past its first record: a whole
    WARC gzipped at once rather than a member per record. Decompresses only as far as
    the first record's end (its Content-Length), at most `limit` bytes."""
    f.seek(0)
    d = zlib.decompressobj(31)
    out = b""
    record_end = None
    while not d.eof and len(out) < limit:
        chunk = f.read(1 << 16)
        if not chunk:
            # The first member is cut short: read as one stream, whatever the layout, its
            # whole records are kept and the cut is counted (warcio would end quietly).
            return True
        try:
            out += d.decompress(chunk, limit - len(out))
        except zlib.error:
            return False
        if record_end is None:
            head = out.find(b"\r\n\r\n")
            if head < 0:
                continue
            length = re.search(rb"(?im)^content-length:[ \t]*(\d+)", out[:head])
            if length is None:
                return False
            record_end = head + 4 + int(length.group(1))
        if out[record_end:].strip():
            return True
    return False


class _Gunzip(io.RawIOBase):
    """A gzip stream read as far as it goes: gzip.GzipFile drops the data it decompressed
    when the file turns out cut short, and warcio takes that EOFError for a clean end.
    Here a cut or corrupt stream ends after its last good byte, with `cut` set."""

    def __init__(self, f):
        self.f, self.cut = f, False
        self.d = zlib.decompressobj(31)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            return self._readinto(buffer)
        except zlib.error:
            self.cut = True
            return 0

    def _readinto(self, buffer) -> int:
        data = b""
        while not data:
            if self.d.eof:  # the next member, if any
                rest = self.d.unused_data
                if not rest and not (rest := self.f.read(INFLATE_CHUNK)):
                    return 0
                self.d = zlib.decompressobj(31)
                data = self.d.decompress(rest, len(buffer))
                continue
            chunk = self.d.unconsumed_tail or self.f.read(INFLATE_CHUNK)
            if not chunk:
                self.cut = True
                return 0
            data = self.d.decompress(chunk, len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _member_complete(f, start: int) -> bool:
    """Whether the gzip member at `start` ends with its trailer (inflated and discarded)."""
    f.seek(start)
    d = zlib.decompressobj(31)
    chunk = b""
    while not d.eof:
        chunk = d.unconsumed_tail or f.read(INFLATE_CHUNK)
        if not chunk:
            return False
        try:
            d.decompress(chunk, 1 << 20)
        except zlib.error:
            return False
    return True


def _read_one_member(f, path: str, cfg: ReadConfig, rows: _Rows):
    """The records of a one-member gzipped WARC, in order; yields full batches and
    returns the number of records read."""
    from warcio.archiveiterator import WARCIterator

    f.seek(0)
    records = 0
    stream = _Gunzip(f)
    try:
        for record in WARCIterator(io.BufferedReader(stream), check_digests=False):
            row = _warc_record(record, path, records, cfg)
            if _cut_short(record):
                raise EOFError("record cut short")
            records += 1
            if row is not None:
                rows.add(**row)
            if len(rows) >= BATCH_ROWS:
                yield from rows.flush()
        if stream.cut:
            raise EOFError("gzip stream cut short")
    except Exception as e:  # noqa: BLE001 - a cut stream, a corrupt block, a bad record: a counted drop
        rows.add(id=doc_id(f"{path}#record{records}", None, type(e).__name__.encode()), source=path,
                 drop_reason="truncated_record")
    return records


def _skip_blank_lines(f, offset: int) -> int:
    """The offset of the first byte at or after `offset` that is not a blank line.
    warcio's record length leaves out the blank lines that close an uncompressed record,
    so the next record, or the end of a complete file, lies past them."""
    f.seek(offset)
    while chunk := f.read(1 << 16):
        blank = len(chunk) - len(chunk.lstrip())
        if blank < len(chunk):
            return offset + blank
        offset += len(chunk)
    return offset


def _cut_short(record) -> bool:
    """warcio yields a record cut short without complaint: headers missing, a
    Content-Length (mandatory) missing or cut to nothing, which warcio reads as 0, or
    fewer bytes than the Content-Length."""
    length = record.rec_headers.get_header("Content-Length") or ""
    return (record.rec_type is None or not length.strip().isdigit()
            or getattr(record.raw_stream, "limit", 0) > 0)


def read_warc(path: str, cfg: ReadConfig) -> Iterator[pa.RecordBatch]:
    """One row per response or resource record, and one dropped row per stretch that
    could not be read. A file that does not start like a WARC is read all the same (its
    first bytes may be what is damaged) and becomes one `not_warc` row if no record
    turns up."""
    rows = _Rows()
    records = 0  # complete WARC records read
    with paths.open_binary(path) as f:
        starts_as_warc, gz = _sniff(f, path)
        offset = 0  # where warcio takes over; None once the whole file is read
        if gz and starts_as_warc and _one_member(f):
            # A whole WARC gzipped at once (`gzip crawl.warc`): one gzip member holds every
            # record. warcio refuses to seek in such a file, so it is read as one stream;
            # damage inside it ends the file with one truncated_record.
            records = yield from _read_one_member(f, path, cfg, rows)
            offset = None
        elif gz and starts_as_warc and _fastwarc_wanted(cfg.warc_reader):
            offset, records = yield from _read_fastwarc(f, path, cfg, rows)
        if offset is not None:
            records = yield from _read_warcio(f, path, cfg, rows, offset, records, gz)
    if not starts_as_warc and not records:
        # Nothing in the file was a WARC record: one row naming the file, not one per
        # place that looked like a record start. (No batch was flushed: none was full.)
        rows = _Rows()
        rows.add(id=doc_id(f"{path}#0", None, b"not_warc"), source=path, drop_reason="not_warc")
    yield from rows.flush()


def _read_warcio(f, path: str, cfg: ReadConfig, rows: _Rows, offset: int, records: int, gz: bool):
    """warcio from `offset` (a record start) to the end of the file, resuming past damage;
    yields full batches and returns the number of complete records, `records` included."""
    from warcio.archiveiterator import WARCIterator

    magic = GZIP_MAGIC if gz else WARC_MAGIC
    size = f.seek(0, 2)
    while offset is not None:
        f.seek(offset)
        # WARC only: warcio's ArchiveIterator reads any line of five words as an ARC
        # header, and a text file would come out as invented documents.
        it = WARCIterator(f, check_digests=False)
        record_offset = offset  # start of the record being read
        last_start = offset  # start of the last record read: in a gzipped WARC, its member's
        try:
            for record in it:
                row = _warc_record(record, path, record_offset, cfg)
                # Asked only after the payload is read: warcio skips to the record's end.
                end = it.get_record_offset() + it.get_record_length()
                if _cut_short(record):
                    raise EOFError("record cut short")
                # When one gzip member holds several records (a whole WARC gzipped at
                # once) warcio's offsets mix compressed and decompressed bytes.
                if not record_offset < end <= size:
                    raise ValueError(f"record end {end} outside the file")
                records += 1
                if row is not None:
                    rows.add(**row)
                last_start, record_offset = record_offset, end
                if len(rows) >= BATCH_ROWS:
                    yield from rows.flush()
            # warcio ends quietly on a gzip member cut short, even one that lost only its
            # trailer: the file is cut, whatever the record kept.
            if _skip_blank_lines(f, record_offset) == size and not (gz and not _member_complete(f, last_start)):
                break
            error = "unparsed tail"
        except Exception as e:  # noqa: BLE001 - any decoding failure is a counted drop
            error = type(e).__name__
        # Searched from past the failed record's own start, which may follow blank lines.
        resume = _next_member(f, _skip_blank_lines(f, record_offset) + 1, magic)
        reason = "bad_record" if resume is not None else "truncated_record"
        rows.add(id=doc_id(f"{path}#{record_offset}", None, error.encode()), source=path, drop_reason=reason)
        offset = resume
    return records


# warcio's accepted WARC versions and request methods: a record fastwarc reads must be one
# warcio reads too, and reads the same way.
WARC_VERSIONS = ("WARC/1.1", "WARC/1.0", "WARC/0.17", "WARC/0.18")
HTTP_VERBS = ("GET", "HEAD", "POST", "PUT", "DELETE", "TRACE", "OPTIONS", "CONNECT", "PATCH")
HTTP_STATUS_PREFIXES = ("HTTP/1.0 ", "HTTP/1.1 ")
# The record types fastwarc reads itself; warcio reads the rest (resource, revisit, ...).
FASTWARC_TYPES = ("response", "request", "metadata", "warcinfo")
# WARC headers a row is made of: no whitespace inside them, so no continuation line
# (which warcio and fastwarc join differently) and no URI that warcio would rewrite.
ROW_HEADERS = ("WARC-Type", "WARC-Target-URI", "WARC-Date", "WARC-Record-ID", "Content-Length")
UNSURE = object()  # a record fastwarc cannot vouch for: warcio reads it


def _fastwarc_wanted(choice: str) -> bool:
    """auto: fastwarc where it is installed (a dependency; an environment without it
    still reads, with warcio)."""
    if choice == "auto":
        import importlib.util

        return importlib.util.find_spec("fastwarc") is not None
    return choice == "fastwarc"


def _read_fastwarc(f, path: str, cfg: ReadConfig, rows: _Rows):
    """The records of a gzipped WARC (a member per record) read by fastwarc, as far as
    they are provably what warcio would read; yields full batches and returns (the
    offset where warcio takes over, the number of complete records read).

    A record is committed only once fastwarc has started the next gzip member, which
    means the record's member inflated to its end and its CRC matched, and only if its
    block was read to exactly its Content-Length and the gzip trailer just before the
    next member gives the size of exactly this record, written plainly: no blank member
    in between (which fastwarc skips and warcio counts), no header line fastwarc read
    otherwise than warcio. A record whose headers warcio might read differently (other
    than plain ASCII `Name: value` lines, a type, URI or status line warcio treats
    specially, an encoded payload) is read by warcio alone, in place. Anything else (a
    fastwarc error, a record cut short, two records in one member, the last record of the
    file) hands the rest of the file to warcio at that record's start: damage is then
    found, counted and skipped exactly as warcio does."""
    from fastwarc.warc import ArchiveIterator

    f.seek(0)
    records = 0
    handover = 0  # start of the record read last, not yet committed
    pending = None  # (row or None, its end if warcio read it, its member's size if fastwarc did)
    with paths.open_binary(path) as probe:  # a second handle: fastwarc reads on from f
        try:
            for record in ArchiveIterator(f, parse_http=True):
                start = record.stream_pos
                if pending is not None:
                    row, end, size = pending
                    if start <= handover or (end is not None and end != start) or (
                            size is not None and _member_size_before(probe, start) != size % (1 << 32)):
                        break
                    records += 1
                    if row is not None:
                        rows.add(**row)
                    if len(rows) >= BATCH_ROWS:
                        yield from rows.flush()
                handover, pending = start, None  # should reading it raise, warcio starts here
                pending = _fastwarc_record(record, path, start, cfg)
                if pending is UNSURE:
                    pending = (*_warcio_record_at(probe, start, path, cfg), None)
        except Exception:  # noqa: BLE001 - warcio rereads this record and finds what is wrong
            pass
    return handover, records


def _member_size_before(f, offset: int) -> int:
    """ISIZE of the gzip member that ends at `offset`: its trailer's last 4 bytes, the
    inflated size modulo 2**32."""
    f.seek(offset - 4)
    return int.from_bytes(f.read(4), "little")


def _plain_length(headers) -> int | None:
    """The bytes of `headers` written as `Name: value\r\n` lines, or None unless every
    parser reads them alike: ASCII, no line break left in a value, no whitespace-only
    line read as a nameless header. (Whole-string tests: this runs for every record.)"""
    names, values = headers.keys(), "".join(headers.values())
    joined = "\x00".join(names)
    if (all(names) and joined.isascii() and values.isascii() and " " not in joined and "\t" not in joined
            and "\r" not in values and "\n" not in values):
        return len(joined) - len(names) + 1 + len(values) + 4 * len(names) if names else 0
    return None


def _fastwarc_record(record, path: str, offset: int, cfg: ReadConfig):
    """(the raw-table row, None for records that are not documents; None; the size the
    record's gzip member must inflate to) for a fastwarc record, or UNSURE where warcio
    might read the record otherwise."""
    h = record.headers
    header_bytes = _plain_length(h)
    if h.status_line not in WARC_VERSIONS or header_bytes is None:
        return UNSURE
    rec_type, url, date, record_id, length = (h.get(k) for k in ROW_HEADERS)
    length = length or ""
    if (rec_type not in FASTWARC_TYPES or str(record.record_type) != rec_type or not length.isdigit()
            or any(v and (" " in v or "\t" in v) for v in (url, date, record_id))):
        return UNSURE
    # warcio parses HTTP headers of response and request records with a body and an http(s) URI.
    http = rec_type in ("response", "request") and int(length) > 0
    if http and (url is None or url.startswith("<")):
        return UNSURE
    http = http and url.startswith(("http:", "https:"))
    if http != record.is_http:
        return UNSURE
    content_type, status = None, "200"
    if http:
        hh = record.http_headers
        line = hh.status_line or ""
        raw_length = int(length) - record.content_length  # what fastwarc took as HTTP headers
        http_bytes = _plain_length(hh)
        if (http_bytes is None or not line.isascii() or "\r" in line or "\n" in line
                or raw_length != len(line) + 2 + http_bytes + 2):
            return UNSURE  # not exactly "status\r\n" + "Name: value\r\n"... + "\r\n"
        if rec_type == "request":
            if line.split(" ", 1)[0] not in HTTP_VERBS:
                return UNSURE
        elif (not line.startswith(HTTP_STATUS_PREFIXES) or "Content-Encoding" in hh
              or "Transfer-Encoding" in hh):
            return UNSURE  # warcio decodes an encoded payload
        else:
            content_type = hh.get("Content-Type")
            status = line[len("HTTP/1.1"):].strip().split(" ", 1)[0]
    body = _read_capped(record.reader, cfg.max_html_bytes + 1) if rec_type == "response" else b""
    if len(body) + record.reader.consume() != record.content_length:
        return UNSURE  # cut short
    # What the record's gzip member inflates to when its headers are written plainly,
    # and the block is followed by the two CRLFs that end a record.
    size = len(h.status_line) + 2 + header_bytes + 2 + int(length) + 4
    if rec_type != "response":
        return None, None, size
    return _document_row(path, offset, url, date, record_id, content_type, status, body, cfg), None, size


def _warcio_record_at(f, offset: int, path: str, cfg: ReadConfig) -> tuple[dict | None, int]:
    """(row, end offset) of the one record at `offset`, read by warcio, which raises on
    damage."""
    from warcio.archiveiterator import WARCIterator

    f.seek(offset)
    it = WARCIterator(f, check_digests=False)
    record = next(it)
    row = _warc_record(record, path, offset, cfg)
    end = it.get_record_offset() + it.get_record_length()
    if _cut_short(record):
        raise EOFError("record cut short")
    return row, end


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
    """The raw-table row for a warcio record, or None for records that are not documents."""
    if record.rec_type not in ("response", "resource"):
        return None  # request / metadata / warcinfo / revisit records are not documents
    headers = record.http_headers if record.rec_type == "response" else record.rec_headers
    body = _read_capped(record.content_stream(), cfg.max_html_bytes + 1)
    status = record.http_headers.get_statuscode() if record.http_headers else "200"
    h = record.rec_headers
    return _document_row(path, offset, h.get_header("WARC-Target-URI"), h.get_header("WARC-Date"),
                         h.get_header("WARC-Record-ID"), headers.get_header("Content-Type") if headers else None,
                         status, body, cfg)


def _document_row(path: str, offset: int, url: str | None, date: str | None, record_id: str | None,
                  content_type: str | None, status: str | None, body: bytes, cfg: ReadConfig) -> dict:
    """A response or resource record's row, whichever parser read it."""
    date = parse_date(date)
    mime, charset = _content_type(content_type)
    row = dict(id=doc_id(url, date, (record_id or f"{path}#{offset}").encode()), url=url, source=path,
               crawl_date=date, charset=charset, in_bytes=len(body))
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
            if line_no == 0:
                line = line.removeprefix(UTF8_BOM)  # JSON readers may ignore a byte-order mark
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except (orjson.JSONDecodeError, ValueError):
                rows.add(id=doc_id(f"{path}#{line_no}", None, line[:64]), source=path,
                         drop_reason="bad_record", in_bytes=len(line))
                continue
            n_lines += 1  # records: a file of broken lines is counted drops, not a wrong column
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
        if isinstance(content, bytes):  # a Parquet binary column
            try:
                content = content.decode("utf-8")
            except UnicodeDecodeError:
                _add_bad(rows, url, date, given_id, content, path, "undecodable")
                return
        if content is not None and not isinstance(content, str):
            # A number, list or object is not a text: str() would invent "12345" or "['a', ...]".
            _add_bad(rows, url, date, given_id, content, path, "bad_text_type")
            return
        text = content
        data = (text or "").encode("utf-8", "surrogatepass")
        base = dict(id=str(given_id) if given_id else doc_id(url, date, data), url=url, source=path,
                    crawl_date=date, in_bytes=len(data))
        if not text or not text.strip():
            rows.add(**base, drop_reason="empty_page")
        else:
            rows.add(**base, text=text)
        return
    if content is not None and not isinstance(content, (str, bytes)):
        _add_bad(rows, url, date, given_id, content, path, "bad_html_type")
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


def _add_bad(rows: _Rows, url, date, given_id, content, path: str, reason: str) -> None:
    """A dropped row for a value that is not a document; nothing of it is kept as content."""
    key = repr(content).encode("utf-8", "surrogatepass")
    rows.add(id=str(given_id) if given_id else doc_id(url, date, key), url=url, source=path, crawl_date=date,
             drop_reason=reason)


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
