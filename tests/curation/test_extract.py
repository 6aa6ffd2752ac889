"""Readers and extraction: WARC/JSONL/Parquet in, trafilatura's main content out,
every bad input counted under its own reason."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import zstandard

from kiln.config import ConfigError
from kiln.formats import schema
from kiln.curation.extract import ExtractConfig, ExtractStage, decode_html, extract_main_content
from kiln.curation.pipeline import parse_recipe, run
from kiln.curation.readers import ReadConfig, read_raw, read_warc
from kiln.curation.spark import _local_cores, local_master
from kiln.curation.stage import run_stage
from tests.conftest import docstrings, locale_sentences, page, read_dropped, write_warc

PARAS = [d.split("\n\n") for d in docstrings("argparse") + docstrings("textwrap") + docstrings("pathlib")]


def html_records(n: int) -> list[dict]:
    return [{"url": f"http://docs.example.test/page/{i}", "body": page(f"Page number {i}", PARAS[i]).encode(),
             "date": f"2024-02-{i % 28 + 1:02d}T08:00:00Z"} for i in range(n)]


def extract(spark, inputs, tmp_path, read: dict | None = None, extract_cfg: dict | None = None):
    recipe = parse_recipe({"pipeline": {"input": [str(p) for p in inputs], "output": str(tmp_path / "out"),
                                        "stages": ["extract"], "write_dropped": True, "resume": False},
                           "read": read or {}, "extract": extract_cfg or {}})
    stats = run(spark, recipe, stage_dirs=False)[0]
    docs = pl.read_parquet(str(tmp_path / "out" / "docs" / "*.parquet"))
    return stats, docs


def test_warc_extract_is_trafilatura_main_content(spark, tmp_path):
    records = html_records(12)
    records.insert(3, {"url": "http://docs.example.test/req", "body": b"GET / HTTP/1.1\r\n\r\n", "rec_type": "request"})
    warc = write_warc(tmp_path / "x.warc.gz", records)
    stats, docs = extract(spark, [warc], tmp_path)
    assert stats.docs_in == 12 and stats.kept == 12 and stats.dropped == {}
    assert {"id", "url", "text", "title", "crawl_date", "source", "charset"} <= set(docs.columns)
    by_url = {r["url"]: r for r in docs.iter_rows(named=True)}
    for r in records:
        if r.get("rec_type") == "request":
            continue
        text, title = extract_main_content(r["body"].decode(), r["url"], **ExtractConfig().trafilatura_kwargs())
        got = by_url[r["url"]]
        assert got["text"] == text
        assert got["title"] == title
        assert got["source"] == str(warc)
        assert got["crawl_date"].isoformat().startswith(r["date"][:19])
    # the boilerplate is not main content
    assert not any("uses cookies" in t for t in docs["text"])
    assert docs["id"].n_unique() == 12


def test_plain_warc_1_0_and_parquet_html(spark, tmp_path):
    records = html_records(5)
    warc = write_warc(tmp_path / "old.warc", records, version="1.0")
    assert warc.read_bytes().startswith(b"WARC/1.0")
    stats, docs = extract(spark, [warc], tmp_path / "w")
    expected = sorted(extract_main_content(r["body"].decode(), r["url"], **ExtractConfig().trafilatura_kwargs())[0]
                      for r in records)
    assert stats.docs_in == 5 and stats.kept == 5 and stats.dropped == {}  # no truncated_record at the end
    assert sorted(docs["text"].to_list()) == expected
    pl.DataFrame({"page": [r["body"].decode() for r in records], "link": [r["url"] for r in records]}) \
        .write_parquet(tmp_path / "pages.parquet")
    stats, docs = extract(spark, [tmp_path / "pages.parquet"], tmp_path / "p",
                          read={"html_column": "page", "url_column": "link"})
    assert stats.kept == 5 and sorted(docs["text"].to_list()) == expected
    assert sorted(docs["url"].to_list()) == sorted(r["url"] for r in records)


def test_bad_warc_records_are_counted(spark, tmp_path):
    big = page("Big table", ["<table>" + "<tr><td>cell value</td></tr>" * 120_000 + "</table>"]).encode()
    records = html_records(6) + [
        {"url": "http://x.test/img.png", "body": b"\x89PNG\r\n\x1a\n" + bytes(64), "content_type": "image/png"},
        {"url": "http://x.test/empty", "body": b""},
        {"url": "http://x.test/big", "body": big},
        {"url": "http://x.test/missing", "body": page("Gone", ["Not found."]).encode(), "status": 404},
        {"url": "http://x.test/garbage", "body": random.Random(0).randbytes(3000),
         "content_type": "text/html; charset=utf-8"},
        {"url": "http://x.test/script", "body": b"<html><body><div> </div><script>var x = 1;</script></body></html>"},
    ]
    warc = write_warc(tmp_path / "bad.warc.gz", records)
    stats, docs = extract(spark, [warc], tmp_path, read={"max_html_bytes": 1_000_000})
    assert stats.dropped == {"not_html": 1, "empty_page": 1, "html_too_large": 1, "http_not_ok": 1,
                             "undecodable": 1, "extract_empty": 1}
    assert stats.kept == 6 and stats.docs_in == len(records)
    dropped = read_dropped(tmp_path / "out")
    assert sorted(dropped["drop_reason"].to_list()) == sorted(
        ["not_html", "empty_page", "html_too_large", "http_not_ok", "undecodable", "extract_empty"])


def _member_offsets(path) -> list[int]:
    from warcio.archiveiterator import ArchiveIterator

    offsets = []
    with open(path, "rb") as f:
        it = ArchiveIterator(f)
        for _ in it:
            offsets.append(it.get_record_offset())
    return offsets


@pytest.mark.parametrize("reader", ["warcio", "fastwarc"])
def test_corrupt_member_is_skipped_and_reading_resumes(tmp_path, reader):
    warc = write_warc(tmp_path / "c.warc.gz", html_records(8))
    data = bytearray(warc.read_bytes())
    offsets = _member_offsets(warc)
    start = offsets[3]
    data[start + 20:start + 60] = bytes(40)  # damage the deflate stream of record 4
    warc.write_bytes(bytes(data))
    rows = pl.concat([pl.from_arrow(b) for b in read_warc(str(warc), ReadConfig(warc_reader=reader))])
    assert rows["drop_reason"].to_list().count("bad_record") == 1
    ok = rows.filter(pl.col("drop_reason").is_null())
    assert sorted(ok["url"].to_list()) == sorted(f"http://docs.example.test/page/{i}" for i in range(8) if i != 3)


@pytest.mark.parametrize("reader", ["warcio", "fastwarc"])
def test_truncated_warc_keeps_what_came_before(tmp_path, reader):
    warc = write_warc(tmp_path / "t.warc.gz", html_records(8))
    offsets = _member_offsets(warc)
    warc.write_bytes(warc.read_bytes()[: offsets[6] + 100])  # cut inside record 7
    rows = pl.concat([pl.from_arrow(b) for b in read_warc(str(warc), ReadConfig(warc_reader=reader))])
    assert rows["drop_reason"].to_list().count("truncated_record") == 1
    assert rows.filter(pl.col("drop_reason").is_null()).height == 6


def test_extraction_timeout_is_counted(spark, tmp_path):
    # 40k paragraphs (4.8 MB) take trafilatura seconds here, five times the 0.5 s limit; the
    # pages after it must still be extracted by a fresh sandbox child.
    slow = {"url": "http://slow.test/", "body": page("Slow", [f"word {i} " * 12 for i in range(40_000)]).encode()}
    warc = write_warc(tmp_path / "x.warc.gz", [slow] + html_records(3))
    stats, docs = extract(spark, [warc], tmp_path, read={"partitions": 1, "max_html_bytes": 8_000_000},
                          extract_cfg={"timeout_s": 0.5})
    assert stats.dropped == {"extract_timeout": 1} and stats.kept == 3


def test_charset_detection():
    ru = " ".join(locale_sentences("ru", limit=8))
    ja = " ".join(locale_sentences("ja", limit=8))
    cp1251 = page("Новости", [ru], charset="windows-1251").encode("cp1251")
    assert decode_html(cp1251, None) == (cp1251.decode("cp1251"), "cp1251")  # from <meta> only
    sjis = page("ニュース", [ja]).replace('<meta charset="utf-8">', "").encode("shift_jis")
    text, codec = decode_html(sjis, None)  # no declaration anywhere: detected
    assert codec == "shift_jis" and ja in text
    assert decode_html(sjis, "utf-8")[1] == "shift_jis"  # a wrong header does not win
    assert decode_html(random.Random(1).randbytes(2000), "utf-8") is None


def test_jsonl_inputs_with_bad_lines(spark, tmp_path):
    rows = [{"url": f"http://j.test/{i}", "html": page(f"J {i}", PARAS[i]), "crawl_date": "2024-05-01T00:00:00Z"}
            for i in range(5)]
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"url": "http://j.test/none"})]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines[:2]).encode()))
    stats, docs = extract(spark, [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.zst"], tmp_path)
    assert stats.docs_in == 9 and stats.kept == 7
    assert stats.dropped == {"bad_record": 1, "empty_page": 1}


def test_text_column_input_skips_extraction(spark, tmp_path):
    texts = ["First document text.", "Second one, plain.", ""]
    pl.DataFrame({"content": texts, "link": ["a", "b", "c"]}).write_parquet(tmp_path / "t.parquet")
    stats, docs = extract(spark, [tmp_path / "t.parquet"], tmp_path,
                          read={"text_column": "content", "url_column": "link"})
    assert sorted(docs["text"].to_list()) == sorted(texts[:2])
    assert stats.dropped == {"empty_page": 1}


def test_missing_path_and_column_fail_at_once(spark, tmp_path):
    with pytest.raises(ConfigError, match="nope.warc.gz: input path does not exist"):
        extract(spark, [tmp_path / "nope.warc.gz"], tmp_path)
    pl.DataFrame({"body": ["x"]}).write_parquet(tmp_path / "p.parquet")
    with pytest.raises(ConfigError, match="has no column 'html'"):
        extract(spark, [tmp_path / "p.parquet"], tmp_path)


def test_single_warc_is_spread_over_partitions(spark, tmp_path):
    warc = write_warc(tmp_path / "x.warc.gz", html_records(4))
    source = read_raw(spark, [str(warc)], ReadConfig())
    assert source.to_df().rdd.getNumPartitions() == 2 * spark.sparkContext.defaultParallelism
    result = run_stage(spark, ExtractStage(), source, None)
    assert result.stats.kept == 4
    result.unpersist()
    assert schema.TEXT in result.kept.columns and schema.HTML not in result.kept.columns


def test_trafilatura_failure_is_an_extract_error_at_once():
    import functools

    from datatrove.pipeline.extractors.base import ExtractorSandbox

    from kiln.curation.extract import _extract_or_error

    # trafilatura raising inside the sandbox (here: an option it does not know) must come
    # back as that error straight away, not kill the child and wait out the timeout.
    fn = functools.partial(_extract_or_error, no_such_option=True)
    with ExtractorSandbox(timeout=30) as sandbox:
        with pytest.raises(TypeError, match="no_such_option"):
            sandbox.process_document((page("T", PARAS[0]), None), fn)
        assert sandbox.process.is_alive()  # the child survived: no timeout was waited out


def test_timeout_must_be_positive():
    # 0 or less would drop every page as extract_timeout.
    for timeout in (0.0, -1.0):
        with pytest.raises(ConfigError) as e:
            ExtractConfig(timeout_s=timeout)
        assert str(e.value) == f"extract.timeout_s must be greater than 0, got {timeout}"
    with pytest.raises(ConfigError) as e:  # from a recipe, before any Spark work
        parse_recipe({"pipeline": {"input": ["x.warc"], "output": "out", "stages": ["extract"]},
                      "extract": {"timeout_s": 0}})
    assert str(e.value) == "extract.timeout_s must be greater than 0, got 0.0"


# A Python worker killed with SIGKILL (executor lost, OOM killer) must not leave its
# sandbox child behind: the orphan holds the worker's socket to the JVM, and Spark
# waits for that task forever.
WORKER = """
import sys, time
from kiln.curation.extract import ExtractStage
from kiln.curation.readers import ReadConfig, read_jsonl
out = ExtractStage().process_partition(read_jsonl(sys.argv[1], ReadConfig()))
assert next(out).column("drop_reason").to_pylist() == [None]  # extracted: the sandbox child is up
print("ready", flush=True)
time.sleep(600)
"""


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie waiting for init to reap it is dead."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_sandbox_child_dies_with_a_killed_worker(tmp_path):
    pages = tmp_path / "p.jsonl"
    pages.write_text(json.dumps({"url": "http://k.test/", "html": page("K", PARAS[0])}) + "\n")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(pages)], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = []
    try:
        assert worker.stdout.readline() == "ready\n", worker.stderr.read()
        children = _children(worker.pid)
        assert len(children) == 1 and _alive(children[0])
        worker.kill()
        worker.wait()
        assert _wait_for(lambda: not _alive(children[0]), 10)
    finally:
        worker.kill()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_local_master_retries_failed_tasks(monkeypatch):
    monkeypatch.delenv("KILN_SPARK_MASTER", raising=False)
    assert local_master() == "local[*,4]"  # local[*] would try each task once
    assert local_master("local[2]") == "local[2]"
    monkeypatch.setenv("KILN_SPARK_MASTER", "local[3]")
    assert local_master() == "local[3]"
    assert _local_cores("local[*,4]") == os.cpu_count()
    assert _local_cores("local[3,4]") == 3
