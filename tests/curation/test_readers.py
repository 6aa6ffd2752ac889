"""Readers on their own: a complete WARC gives exactly its records, a file cut short one
truncated_record, a file that is not a WARC one not_warc row, and a JSONL or Parquet
value of the wrong type a dropped row instead of an invented document or a crash."""

from __future__ import annotations

import gzip
import json
import zlib

import polars as pl
import pyarrow as pa
import pytest

from kiln.config import ConfigError
from kiln.curation.readers import ReadConfig, read_jsonl, read_raw, read_warc
from kiln.formats import schema
from tests.conftest import page, write_warc

URLS = [f"http://r.example.test/{i}" for i in range(5)]
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

@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("name,gzipped", [("x.warc", False), ("x.warc.gz", True), ("plain.warc.gz", False)])
def test_complete_warc_has_no_truncated_record(tmp_path, version, name, gzipped):
    # An uncompressed record ends with a blank line that warcio's record length leaves
    # out; a plain WARC named .warc.gz is read by its contents.
    written = write_warc(tmp_path / "src" / ("w.warc.gz" if gzipped else "w.warc"), records(), version=version)
    warc = tmp_path / name
    warc.write_bytes(written.read_bytes())
    rows = rows_of(warc)
    assert rows["drop_reason"].to_list() == [None] * 5
    assert rows["url"].to_list() == URLS


@pytest.mark.parametrize("name", ["x.warc", "x.warc.gz"])
@pytest.mark.parametrize("cut", [10, 150])  # into record 4's WARC headers; into its HTTP headers or payload
def test_warc_cut_mid_record_has_one_truncated_record(tmp_path, name, cut):
    warc = write_warc(tmp_path / name, records())
    start = record_offsets(warc)[3]
    warc.write_bytes(warc.read_bytes()[:start + cut])
    rows = rows_of(warc)
    assert rows["drop_reason"].to_list() == [None, None, None, "truncated_record"]
    assert rows["url"].to_list()[:3] == URLS[:3]
    assert rows["source"].to_list() == [str(warc)] * 4


@pytest.mark.parametrize("name", ["x.warc", "x.warc.gz"])
def test_every_cut_keeps_the_whole_records_and_counts_one_truncated_record(tmp_path, name):
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
        assert rows_of(cut_file)["drop_reason"].to_list() == expected, f"cut at byte {cut}"


def test_whole_warc_gzipped_at_once_is_read_record_by_record(tmp_path):
    """`gzip crawl.warc`: one gzip member holds every record (warcio refuses to read it)."""
    plain = write_warc(tmp_path / "w.warc", records())
    whole = gzip.compress(plain.read_bytes())
    warc = tmp_path / "whole.warc.gz"
    warc.write_bytes(whole)
    rows = rows_of(warc)
    assert rows["drop_reason"].to_list() == [None] * 5 and rows["url"].to_list() == URLS
    assert rows["html"].to_list() == rows_of(plain)["html"].to_list()
    # Cut anywhere: the records whole in what is left are kept, then one truncated_record.
    inflated = [len(zlib.decompressobj(31).decompress(whole[:cut])) for cut in range(len(whole) + 1)]
    ends = record_offsets(plain)[1:] + [len(plain.read_bytes())]
    for cut in range(1, len(whole)):
        warc.write_bytes(whole[:cut])
        # A record is whole without its closing blank line, as in the member-per-record layout.
        complete = sum(1 for end in ends if inflated[cut] >= end - 4)
        got = rows_of(warc)["drop_reason"].to_list()
        assert got == [None] * complete + ["truncated_record"], f"cut at byte {cut}"


# --------------------------------------------------------------------------- not a WARC

NOT_WARC = {
    "text.warc.gz": PROSE,  # lines of five words or more used to become ARC records
    "gzipped-text.warc.gz": gzip.compress(PROSE),  # used to seek to a negative offset
    "text.warc": PROSE,
    "json.warc": b'{"url": "http://x.test/", "html": "<html></html>"}\n' * 20,
}


@pytest.mark.parametrize("name", sorted(NOT_WARC))
def test_file_that_is_not_a_warc_is_one_not_warc_row(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(NOT_WARC[name])
    rows = rows_of(path)
    assert rows.select("drop_reason", "source", "html", "text", schema.IN_BYTES).rows() == [
        ("not_warc", str(path), None, None, 0)]


def test_damaged_first_member_is_a_bad_record_not_a_not_warc(tmp_path):
    warc = write_warc(tmp_path / "d.warc.gz", records())
    data = bytearray(warc.read_bytes())
    data[:3] = b"xxx"  # the gzip magic of record 1
    warc.write_bytes(bytes(data))
    rows = rows_of(warc)
    assert rows["drop_reason"].to_list() == ["bad_record", None, None, None, None]
    assert rows["url"].to_list()[1:] == URLS[1:]


def test_job_goes_on_past_files_that_are_not_warcs(spark, tmp_path):
    good = write_warc(tmp_path / "in" / "a.warc.gz", records())
    for name in ("text.warc.gz", "gzipped-text.warc.gz"):
        (tmp_path / "in" / name).write_bytes(NOT_WARC[name])
    raw = read_raw(spark, [str(tmp_path / "in")], ReadConfig(partitions=0)).to_df()
    got = pl.from_pandas(raw.select("url", "source", "drop_reason").toPandas())
    assert sorted(got.filter(pl.col("drop_reason").is_null())["url"].to_list()) == URLS
    assert got.filter(pl.col("source") == str(good))["drop_reason"].null_count() == 5
    bad = got.filter(pl.col("drop_reason").is_not_null()).sort("source")
    assert bad.select("source", "drop_reason").rows() == [
        (str(tmp_path / "in" / "gzipped-text.warc.gz"), "not_warc"), (str(tmp_path / "in" / "text.warc.gz"), "not_warc")]


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
    got = read_raw(spark, [str(tmp_path / "b.parquet")], ReadConfig(text_column="text")).select("url", "text", "drop_reason")
    assert sorted(tuple(r) for r in got.collect()) == [("a", "plain words", None), ("b", None, "undecodable")]


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value,message", [
    ("format", "warcs", "read.format must be one of auto, warc, jsonl, parquet, got 'warcs'"),
    ("max_html_bytes", 0, "read.max_html_bytes must be greater than 0, got 0"),
    ("partitions", -1, "read.partitions must not be negative, got -1"),
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
