"""Readers on their own: a complete WARC gives exactly its records, a file cut short one
truncated_record, a file that is not a WARC one not_warc row, and a JSONL or Parquet
value of the wrong type a dropped row instead of an invented document or a crash.
Every WARC case holds for both WARC parsers (`warc_reader`), and fastwarc gives
warcio's rows exactly, on the demo sample and on hundreds of damaged files."""

from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from kiln.config import ConfigError
from kiln.curation import readers
from kiln.curation.readers import ReadConfig, read_jsonl, read_raw, read_warc
from kiln.demo.warc import Record, http_request, http_response
from kiln.demo.warc import write_warc as write_records
from kiln.formats import schema
from tests.conftest import page, write_warc

URLS = [f"http://r.example.test/{i}" for i in range(5)]
READERS = ["warcio", "fastwarc"]
SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample.warc.gz"
PROSE = "".join(f"line {i} of a plain text file that is not a crawl\n" for i in range(500)).encode()


def records() -> list[dict]:
    return [{"url": u, "body": page(f"Page {i}", [f"Paragraph {i} of the page."]).encode()}
            for i, u in enumerate(URLS)]


def rows_of(path, cfg: ReadConfig | None = None) -> pl.DataFrame:
    reader = read_jsonl if str(path).endswith(".jsonl") else read_warc
    return pl.from_arrow(pa.Table.from_batches(list(reader(str(path), cfg or ReadConfig())), schema=schema.RAW))


def record_offsets(path) -> list[int]:
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        it = ArchiveIterator(f)
        return [it.get_record_offset() for _ in it]


# --------------------------------------------------------------------------- end of a WARC

@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("name,gzipped", [("x.warc", False), ("x.warc.gz", True), ("plain.warc.gz", False)])
def test_complete_warc_has_no_truncated_record(tmp_path, version, name, gzipped, reader):
    # An uncompressed record ends with a blank line that warcio's record length leaves
    # out; a plain WARC named .warc.gz is read by its contents.
    written = write_warc(tmp_path / "src" / ("w.warc.gz" if gzipped else "w.warc"), records(), version=version)
    warc = tmp_path / name
    warc.write_bytes(written.read_bytes())
    rows = rows_of(warc, ReadConfig(warc_reader=reader))
    assert rows["drop_reason"].to_list() == [None] * 5
    assert rows["url"].to_list() == URLS


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", ["x.warc", "x.warc.gz"])
@pytest.mark.parametrize("cut", [10, 150])  # into record 4's WARC headers; into its HTTP headers or payload
def test_warc_cut_mid_record_has_one_truncated_record(tmp_path, name, cut, reader):
    warc = write_warc(tmp_path / name, records())
    start = record_offsets(warc)[3]
    warc.write_bytes(warc.read_bytes()[:start + cut])
    rows = rows_of(warc, ReadConfig(warc_reader=reader))
    assert rows["drop_reason"].to_list() == [None, None, None, "truncated_record"]
    assert rows["url"].to_list()[:3] == URLS[:3]
    assert rows["source"].to_list() == [str(warc)] * 4


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", ["x.warc", "x.warc.gz"])
def test_every_cut_keeps_the_whole_records_and_counts_one_truncated_record(tmp_path, name, reader):
    warc = write_warc(tmp_path / name, records()[:2])
    data = warc.read_bytes()
    starts = record_offsets(warc) + [len(data)]  # record i is data[starts[i]:starts[i + 1]]
    unzip = (lambda b: zlib.decompressobj(31).decompress(b)) if name.endswith(".gz") else (lambda b: b)
    cut_file = tmp_path / ("cut-" + name)
    for cut in range(1, len(data)):
        i = max(j for j in range(len(starts)) if starts[j] <= cut)
        if cut == starts[i]:
            expected = [None] * i
        else:
            # A cut that loses only a record's closing blank line loses nothing of it; a
            # gzip member without its trailer is cut all the same, so it is counted.
            whole = len(unzip(data[starts[i]:cut])) >= len(unzip(data[starts[i]:starts[i + 1]])) - 4
            if not whole:
                expected = [None] * i + ["truncated_record"]
            else:
                expected = [None] * (i + 1) + (["truncated_record"] if name.endswith(".gz") else [])
        cut_file.write_bytes(data[:cut])
        assert rows_of(cut_file, ReadConfig(warc_reader=reader))["drop_reason"].to_list() == expected, \
            f"cut at byte {cut}"


@pytest.mark.parametrize("reader", READERS)
def test_whole_warc_gzipped_at_once_is_read_record_by_record(tmp_path, reader):
    """`gzip crawl.warc`: one gzip member holds every record (warcio refuses to read it)."""
    cfg = ReadConfig(warc_reader=reader)
    plain = write_warc(tmp_path / "w.warc", records())
    whole = gzip.compress(plain.read_bytes())
    warc = tmp_path / "whole.warc.gz"
    warc.write_bytes(whole)
    rows = rows_of(warc, cfg)
    assert rows["drop_reason"].to_list() == [None] * 5 and rows["url"].to_list() == URLS
    assert rows["html"].to_list() == rows_of(plain)["html"].to_list()
    # Cut anywhere: the records whole in what is left are kept, then one truncated_record.
    inflated = [len(zlib.decompressobj(31).decompress(whole[:cut])) for cut in range(len(whole) + 1)]
    ends = record_offsets(plain)[1:] + [len(plain.read_bytes())]
    for cut in range(1, len(whole)):
        warc.write_bytes(whole[:cut])
        # A record is whole without its closing blank line, as in the member-per-record layout.
        complete = sum(1 for end in ends if inflated[cut] >= end - 4)
        got = rows_of(warc, cfg)["drop_reason"].to_list()
        assert got == [None] * complete + ["truncated_record"], f"cut at byte {cut}"


# --------------------------------------------------------------------------- fastwarc reads as warcio does

def raw_table(path, reader: str) -> pa.Table:
    return pa.Table.from_batches(list(read_warc(str(path), ReadConfig(warc_reader=reader))), schema=schema.RAW)


@pytest.fixture(scope="module")
def sample_warc(tmp_path_factory):
    """The demo sample (`make demo` writes it; built here, in about 10 s, when missing)."""
    if SAMPLE.exists():
        return SAMPLE
    from kiln.demo import build_sample

    path = tmp_path_factory.mktemp("sample") / "sample.warc.gz"
    build_sample(path)
    return path


def test_fastwarc_gives_warcios_rows_on_the_sample(sample_warc, monkeypatch):
    handovers = []  # (offset, records read before) each time warcio takes over
    original = readers._read_warcio

    def recording(f, path, cfg, rows, offset, records, gz):
        handovers.append((offset, records))
        return (yield from original(f, path, cfg, rows, offset, records, gz))

    monkeypatch.setattr(readers, "_read_warcio", recording)
    fast = raw_table(sample_warc, "fastwarc")
    offsets = record_offsets(sample_warc)
    # fastwarc read every record but the last, which warcio rereads to see how the file ends
    assert handovers == [(offsets[-1], len(offsets) - 1)]
    assert raw_table(sample_warc, "auto").equals(fast)
    handovers.clear()
    slow = raw_table(sample_warc, "warcio")
    assert handovers == [(0, 0)]
    assert fast.num_rows == slow.num_rows > 900
    assert fast.equals(slow)  # ids, URLs, dates, HTML bytes, charsets, drops, byte counts


def mixed_records() -> list[Record]:
    """warcinfo, then a request, a response and a metadata record per page, as Common Crawl writes them."""
    out = [Record("warcinfo", "", b"software: kiln-test\r\n",
                  {"WARC-Date": "2024-01-01T00:00:00Z", "WARC-Record-ID": "<urn:uuid:i>"},
                  content_type="application/warc-fields")]
    for i in range(3):
        url, date = f"http://f.example.test/{i}", "2024-01-02T00:00:00Z"
        out.append(Record("request", url, b"", {"WARC-Date": date, "WARC-Record-ID": f"<urn:uuid:q{i}>"},
                          http=http_request(f"/{i}", [("Host", "f.example.test"), ("Accept", "*/*")])))
        out.append(Record("response", url, page(f"Page {i}", [f"Paragraph {i}."]).encode(),
                          {"WARC-Date": date, "WARC-Record-ID": f"<urn:uuid:r{i}>"},
                          http=http_response(200, "OK", [("Content-Type", "text/html; charset=utf-8"),
                                                         ("Server", "x")])))
        out.append(Record("metadata", url, b"fetchTimeMs: 12\r\n",
                          {"WARC-Date": date, "WARC-Record-ID": f"<urn:uuid:m{i}>"},
                          content_type="application/warc-fields"))
    return out


def gzip_members(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj(31)
        d.decompress(data[pos:])
        end = len(data) - len(d.unused_data)
        out.append(data[pos:end])
        pos = end
    return out


# Ways a header line goes wrong; each is applied to every line of a record's WARC and
# HTTP headers. Most of them warcio and fastwarc read differently.
LINE_DAMAGE = {
    "LF only": lambda line: line.replace(b"\r\n", b"\n"),
    "whitespace line after": lambda line: line + b"   \r\n",
    "deleted": lambda line: b"",
    "doubled": lambda line: line + line,
    "lower case": lambda line: line.lower(),
    "continuation after": lambda line: line + b" more\r\n",
    "latin-1 byte": lambda line: line[:-2] + b"\xe9\r\n",
    "no space after colon": lambda line: line.replace(b": ", b":", 1),
    "space before colon": lambda line: line.replace(b":", b" :", 1),
    "no colon": lambda line: line.replace(b":", b"", 1),
    "CR only": lambda line: line[:-2] + b"\r",
    "value in angle brackets": lambda line: line.replace(b": ", b": <", 1)[:-2] + b">\r\n",
    "space inside": lambda line: line[:len(line) // 2] + b" " + line[len(line) // 2:],
}


def damaged_warcs(members: list[bytes]) -> list[tuple[str, bytes]]:
    cases = []
    for r in (1, 2, 3):  # a request, a response, a metadata record
        text = zlib.decompressobj(31).decompress(members[r])
        head_end = text.index(b"\r\n\r\n") + 4
        end = text.index(b"\r\n\r\n", head_end) + 4 if b"application/http" in text[:head_end] else head_end
        lines = [line + b"\r\n" for line in text[:end].split(b"\r\n")[:-1]]
        for i, line in enumerate(lines):
            for name, damage in LINE_DAMAGE.items():
                new = b"".join(lines[:i]) + damage(line) + b"".join(lines[i + 1:]) + text[end:]
                cases.append((f"record {r}, line {i}: {name}", members[:r] + [gzip.compress(new)] + members[r + 1:]))
        length = int(re.search(rb"Content-Length: (\d+)", text).group(1))
        for delta in (-50, -1, 1, 50):
            new = text.replace(b"Content-Length: %d" % length, b"Content-Length: %d" % (length + delta), 1)
            cases.append((f"record {r}: Content-Length {delta:+d}",
                          members[:r] + [gzip.compress(new)] + members[r + 1:]))
    two = gzip.compress(b"".join(zlib.decompressobj(31).decompress(m) for m in members[2:4]))
    cases += [("two records in one member", members[:2] + [two] + members[4:]),
              ("junk between members", members[:3] + [b"junk"] + members[3:]),
              ("a member of one blank line", members[:3] + [gzip.compress(b"\r\n")] + members[3:]),
              ("an empty member", members[:3] + [gzip.compress(b"")] + members[3:]),
              ("a CRC flipped", members[:2] + [members[2][:-8] + bytes([members[2][-8] ^ 1]) + members[2][-7:]]
               + members[3:])]
    data = b"".join(members)
    rng = random.Random(0)
    for pos in sorted(rng.sample(range(len(data)), 200)):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        cases.append((f"bit flipped at byte {pos}", [bytes(flipped)]))
    return [(name, b"".join(parts)) for name, parts in cases]


def test_fastwarc_gives_warcios_rows_on_damaged_warcs(tmp_path):
    members = gzip_members(write_records(tmp_path / "w.warc.gz", mixed_records()).read_bytes())
    cases = damaged_warcs(members)
    assert len(cases) > 600
    reasons = Counter()
    path = tmp_path / "case.warc.gz"
    for name, data in cases:
        path.write_bytes(data)
        slow = raw_table(path, "warcio")
        assert raw_table(path, "fastwarc").equals(slow), name
        reasons.update(slow.column(schema.DROP_REASON).to_pylist())
    # the cases reach every way warcio reads damage
    assert {None, "bad_record", "truncated_record"} <= set(reasons)


# --------------------------------------------------------------------------- not a WARC

NOT_WARC = {
    "text.warc.gz": PROSE,  # lines of five words or more used to become ARC records
    "gzipped-text.warc.gz": gzip.compress(PROSE),  # used to seek to a negative offset
    "text.warc": PROSE,
    "json.warc": b'{"url": "http://x.test/", "html": "<html></html>"}\n' * 20,
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", sorted(NOT_WARC))
def test_file_that_is_not_a_warc_is_one_not_warc_row(tmp_path, name, reader):
    path = tmp_path / name
    path.write_bytes(NOT_WARC[name])
    rows = rows_of(path, ReadConfig(warc_reader=reader))
    assert rows.select("drop_reason", "source", "html", "text", schema.IN_BYTES).rows() == [
        ("not_warc", str(path), None, None, 0)]


@pytest.mark.parametrize("reader", READERS)
def test_damaged_first_member_is_a_bad_record_not_a_not_warc(tmp_path, reader):
    warc = write_warc(tmp_path / "d.warc.gz", records())
    data = bytearray(warc.read_bytes())
    data[:3] = b"xxx"  # the gzip magic of record 1
    warc.write_bytes(bytes(data))
    rows = rows_of(warc, ReadConfig(warc_reader=reader))
    assert rows["drop_reason"].to_list() == ["bad_record", None, None, None, None]
    assert rows["url"].to_list()[1:] == URLS[1:]


@pytest.mark.parametrize("reader", READERS)
def test_job_goes_on_past_files_that_are_not_warcs(spark, tmp_path, reader):
    good = write_warc(tmp_path / "in" / "a.warc.gz", records())
    for name in ("text.warc.gz", "gzipped-text.warc.gz"):
        (tmp_path / "in" / name).write_bytes(NOT_WARC[name])
    raw = read_raw(spark, [str(tmp_path / "in")], ReadConfig(partitions=0, warc_reader=reader)).to_df()
    got = pl.from_pandas(raw.select("url", "source", "drop_reason").toPandas())
    assert sorted(got.filter(pl.col("drop_reason").is_null())["url"].to_list()) == URLS
    assert got.filter(pl.col("source") == str(good))["drop_reason"].null_count() == 5
    bad = got.filter(pl.col("drop_reason").is_not_null()).sort("source")
    assert bad.select("source", "drop_reason").rows() == [
        (str(tmp_path / "in" / "gzipped-text.warc.gz"), "not_warc"),
        (str(tmp_path / "in" / "text.warc.gz"), "not_warc")]


# --------------------------------------------------------------------------- value types

VALUES = {  # url -> the column's value; "missing" has no such key
    "str": "<html><body><p>A page of text.</p></body></html>",
    "int": 12345,
    "list": ["a", "list"],
    "dict": {"a": "dict"},
    "bool": True,
    "float": 1.5,
    "null": None,
    "missing": ...,
}


def write_jsonl(path, column: str):
    lines = [json.dumps({"url": url} if value is ... else {"url": url, column: value}) for url, value in VALUES.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("column,reason,kept", [("html", "bad_html_type", "html"), ("text", "bad_text_type", "text")])
def test_jsonl_value_that_is_not_a_string_is_dropped(tmp_path, column, reason, kept):
    cfg = ReadConfig(text_column="text") if column == "text" else ReadConfig()
    rows = rows_of(write_jsonl(tmp_path / "v.jsonl", column), cfg)
    assert dict(rows.select("url", "drop_reason").rows()) == {
        "str": None, "int": reason, "list": reason, "dict": reason, "bool": reason, "float": reason,
        "null": "empty_page", "missing": "empty_page"}
    content = dict(rows.select("url", kept).rows())
    expected = VALUES["str"].encode() if column == "html" else VALUES["str"]
    assert content == {url: expected if url == "str" else None for url in VALUES}  # nothing invented


def test_parquet_column_of_another_type_is_dropped(spark, tmp_path):
    pl.DataFrame({"url": ["a", "b"], "html": [12345, 7], "text": [1, 2]}).write_parquet(tmp_path / "n.parquet")
    for cfg, reason in ((ReadConfig(), "bad_html_type"), (ReadConfig(text_column="text"), "bad_text_type")):
        got = read_raw(spark, [str(tmp_path / "n.parquet")], cfg).select("url", "text", "html", "drop_reason")
        assert sorted(tuple(r) for r in got.collect()) == [("a", None, None, reason), ("b", None, None, reason)]


def test_parquet_binary_text_is_decoded_or_undecodable(spark, tmp_path):
    pl.DataFrame({"url": ["a", "b"], "text": [b"plain words", b"\xff\xfe bytes"]}).write_parquet(tmp_path / "b.parquet")
    got = read_raw(spark, [str(tmp_path / "b.parquet")], ReadConfig(text_column="text")).select(
        "url", "text", "drop_reason")
    assert sorted(tuple(r) for r in got.collect()) == [("a", "plain words", None), ("b", None, "undecodable")]


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value,message", [
    ("format", "warcs", "read.format must be one of auto, warc, jsonl, parquet, got 'warcs'"),
    ("max_html_bytes", 0, "read.max_html_bytes must be greater than 0, got 0"),
    ("partitions", -1, "read.partitions must not be negative, got -1"),
    ("warc_reader", "fast", "read.warc_reader must be one of auto, fastwarc, warcio, got 'fast'"),
])
def test_read_config_range_checks(field, value, message):
    with pytest.raises(ConfigError) as e:
        ReadConfig(**{field: value})
    assert str(e.value) == message


def test_jsonl_of_broken_lines_is_counted_and_a_bom_is_ignored(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b'{"text": "cut\n[1, 2\nnot json at all\n')
    rows = rows_of(broken, ReadConfig(text_column="text"))
    assert rows["drop_reason"].to_list() == ["bad_record"] * 3  # not a "no record has the column" error
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"url": "http://b.test/", "text": "first record"}\n{"text": "second"}\n')
    rows = rows_of(bom, ReadConfig(text_column="text"))
    assert rows["drop_reason"].to_list() == [None, None]
    assert rows["text"].to_list() == ["first record", "second"] and rows["url"].to_list()[0] == "http://b.test/"
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match="no record has the column 'text'"):
        rows_of(wrong, ReadConfig(text_column="text"))
