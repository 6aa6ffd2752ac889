"""WARC writing: a list of records to one WARC file (gzip per record, as Common Crawl ships).

The demo's sample builder and the tests' small WARCs both go through ``write_warc``;
each caller decides what its records say.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter


@dataclass(frozen=True)
class Record:
    """One WARC record as warcio builds it."""

    type: str                     # warcinfo | request | response | metadata
    url: str                      # WARC-Target-URI ("" for warcinfo)
    payload: bytes                # the block after the HTTP headers, if any
    headers: dict[str, str]       # WARC headers: WARC-Date, WARC-Record-ID, ...; kept in order
    http: StatusAndHeaders | None = None
    content_type: str = ""        # the record's own Content-Type (application/warc-fields)


def http_request(target: str, headers: list[tuple[str, str]]) -> StatusAndHeaders:
    return StatusAndHeaders(f"GET {target} HTTP/1.1", headers, is_http_request=True)


def http_response(status: int, reason: str, headers: list[tuple[str, str]]) -> StatusAndHeaders:
    return StatusAndHeaders(f"{status} {reason}", headers, protocol="HTTP/1.1")


def write_warc(path: str | Path, records: list[Record], version: str = "1.1", gzip: bool = True) -> Path:
    """Write `records` in order to `path` (via a temporary file, so a reader never sees half a WARC)."""
    path = Path(path)
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=gzip, warc_version=version)
    for r in records:
        writer.write_record(writer.create_warc_record(
            r.url, r.type, payload=io.BytesIO(r.payload), length=len(r.payload), http_headers=r.http,
            warc_content_type=r.content_type, warc_headers_dict=r.headers))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path
