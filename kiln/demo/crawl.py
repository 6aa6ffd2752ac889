"""The crawl around the pages: URLs, capture dates and order, and the WARC records of each capture.

The file imitates one Common Crawl WARC: a ``warcinfo`` record, then for every
capture a ``request``, a ``response`` and a ``metadata`` record.  Record ids,
dates and server addresses come from seeded RNGs, so the same pages and seed
give the same records.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from random import Random
from urllib.parse import urlsplit

from kiln.demo.pages import Page, rng_for, slugify
from kiln.demo.warc import Record, http_request, http_response

WARC_FILENAME = "KILN-SAMPLE-2024-00000.warc.gz"  # fixed: not the output name
CRAWL_START = datetime(2024, 1, 2, tzinfo=timezone.utc)
CRAWL_END = datetime(2024, 12, 30, 23, 59, 59, tzinfo=timezone.utc)
USER_AGENT = "KilnSampleBot/1.0 (+https://kiln-sample.test/bot; bot@kiln-sample.test)"


def variant_url(url: str, k: int, rng: Random) -> str:
    """The same resource, spelt the way trackers and crawlers spell it."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    sep = "&" if parts.query else "?"
    port = 443 if parts.scheme == "https" else 80
    forms = (
        f"{url}{sep}utm_source=newsletter&utm_medium=email&utm_campaign=spring_{rng.randint(1, 40)}",
        f"{url}#section-{rng.randint(2, 6)}",
        # Upper-case host + default port.  The scheme stays lower case: warcio
        # only parses HTTP headers of records whose URI starts with "http".
        f"{parts.scheme}://{parts.netloc.upper()}:{port}{path}",
        (url[:-1] if parts.path.endswith("/") and not parts.query else url + ("/" if not parts.query else "")),
        f"{url}{sep}ref=twitter&fbclid=IwAR{rng.getrandbits(64):016x}",
        f"{url}{sep}utm_source=twitter&utm_medium=social#comments",
        f"{url}{sep}gclid=Cj0K{rng.getrandbits(48):012x}",
    )
    return forms[k % len(forms)]


def assign_url(page: Page, index: int, used: set[str], rng: Random) -> None:
    site = page.site
    slug = slugify(page.title, f"{page.kind.replace('_', '-')}-{index}")
    section = page.section or site.sections[0]
    if site.url_style == "dated":
        # Blog-style URLs carry the publication month, which precedes the capture.
        published = (page.date or CRAWL_END) - timedelta(days=rng.randint(0, 900))
        path = f"/{published:%Y/%m}/{slug}/"
    elif site.url_style == "query":
        path = f"/{section}.php?t={10000 + index}&title={slug}"
    elif site.url_style == "lang":
        path = f"/{page.lang.lower().replace('_', '-')}/{section}/{slug}.html"
    else:
        path = f"/{section}/{slug}.html"
    url = f"{site.scheme}://{site.host}{path}"
    n = 2
    while url in used:
        url = f"{site.scheme}://{site.host}{path.rstrip('/').removesuffix('.html')}-{n}" + (
            ".html" if path.endswith(".html") else "/")
        n += 1
    used.add(url)
    page.url, page.slug = url, slug


def random_date(rng: Random, start: datetime = CRAWL_START, end: datetime = CRAWL_END) -> datetime:
    span = int((end - start).total_seconds())
    return start + timedelta(seconds=rng.randint(0, span))


def _warc_date(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _record_id(rng: Random) -> str:
    return f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}>"


def _content_type(page: Page) -> str:
    if page.content_type:
        return page.content_type
    if page.charset_in_header:
        label = page.site.ct_case if page.codec == "utf-8" else page.charset
        return f"text/html; charset={label}"
    return "text/html"


def order_captures(pages: list[Page], rng: Random) -> list[Page]:
    """Shuffle captures; copies are never next to their source, and URL
    revisits come after their original (in file order and in WARC-Date)."""
    variants = [p for p in pages if p.kind == "url_variant"]
    rest = [p for p in pages if p.kind != "url_variant"]
    rng.shuffle(rest)
    for _ in range(10):  # break up neighbouring members of one family
        moved = False
        for i in range(len(rest) - 1):
            if rest[i].family >= 0 and rest[i].family == rest[i + 1].family:
                j = (i + len(rest) // 2) % len(rest)
                rest[i + 1], rest[j] = rest[j], rest[i + 1]
                moved = True
        if not moved:
            break
    for v in variants:
        pos = next(i for i, p in enumerate(rest) if p.family == v.family)
        lo = min(pos + 2, len(rest))
        rest.insert(rng.randint(lo, len(rest)), v)
    return rest


def capture_records(pages: list[Page], seed: int) -> list[Record]:
    """A ``warcinfo`` record, then a request, a response and a metadata record per capture."""
    ids = rng_for(seed, "record-ids")
    timing = rng_for(seed, "fetch-times")
    hosts = sorted({urlsplit(p.url).hostname or "" for p in pages})
    ips = {h: f"{('192.0.2', '198.51.100', '203.0.113')[i % 3]}.{10 + i}" for i, h in enumerate(hosts)}
    info_id = _record_id(ids)
    # "software" names the builder's first module, kiln.curation.sample: kept when it
    # moved to kiln.demo, so that the move left every byte of the sample unchanged.
    fields = (f"software: kiln.curation.sample\r\n"
              f"format: WARC File Format 1.1\r\n"
              f"conformsTo: https://iipc.github.io/warc-specifications/specifications/warc-format/warc-1.1/\r\n"
              f"isPartOf: KILN-SAMPLE-2024\r\n"
              f"description: Synthetic Common-Crawl-like sample for the kiln demo (seed={seed})\r\n"
              f"operator: kiln sample builder\r\n"
              f"robots: classic\r\n").encode()
    records = [Record("warcinfo", "", fields, {"WARC-Date": _warc_date(CRAWL_START), "WARC-Record-ID": info_id,
                                               "WARC-Filename": WARC_FILENAME},
                      content_type="application/warc-fields")]
    for page in pages:
        parts = urlsplit(page.url)
        host = parts.hostname or ""
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        date = _warc_date(page.date)
        req_id, resp_id, meta_id = _record_id(ids), _record_id(ids), _record_id(ids)
        common = {"WARC-Date": date, "WARC-Warcinfo-ID": info_id, "WARC-IP-Address": ips[host]}

        request = http_request(target, [
            ("Host", host), ("User-Agent", USER_AGENT),
            ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
            ("Accept-Language", "en-US,en;q=0.5"), ("Accept-Encoding", "br,gzip"),
            ("Connection", "close")])
        records.append(Record("request", page.url, b"", {"WARC-Record-ID": req_id, **common}, http=request))

        body = page.body or b""
        reason = {200: "OK", 404: "Not Found"}[page.status]
        resp_headers = [("Date", format_datetime(page.date, usegmt=True)), ("Server", page.site.server),
                        ("Content-Type", _content_type(page)), ("Content-Length", str(len(body))),
                        ("Cache-Control", "max-age=600"), ("Connection", "close")]
        resp_headers_dict = {"WARC-Record-ID": resp_id, **common, "WARC-Concurrent-To": req_id}
        if body:
            resp_headers_dict["WARC-Identified-Payload-Type"] = _content_type(page).split(";")[0]
        records.append(Record("response", page.url, body, resp_headers_dict,
                              http=http_response(page.status, reason, resp_headers)))

        meta = f"fetchTimeMs: {timing.randint(40, 2500)}\r\n".encode()
        records.append(Record("metadata", page.url, meta,
                              {"WARC-Record-ID": meta_id, **common, "WARC-Concurrent-To": resp_id},
                              content_type="application/warc-fields"))
    return records
