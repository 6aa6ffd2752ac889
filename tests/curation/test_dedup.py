"""URL and exact dedup: the normalization rules, the winner rules, partition independence."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from kiln.curation.dedup import ExactDedupConfig, ExactDedupStage, UrlDedupStage, normalize_url
from kiln.curation.stage import run_stage

SCHEMA = "id string, url string, text string, crawl_date timestamp"


def day(d: int) -> datetime:
    return datetime(2024, 3, d, tzinfo=timezone.utc)


@pytest.mark.parametrize("url, expected", [
    ("HTTP://Docs.Example.COM:80/a/b/?utm_source=x&b=2&a=1#part", "http://docs.example.com/a/b?a=1&b=2"),
    ("https://x.test:443/", "https://x.test"),
    ("https://x.test:8443/p/", "https://x.test:8443/p"),
    ("http://x.test/p?fbclid=abc&gclid=1&utm_medium=mail", "http://x.test/p"),
    ("http://x.test/p?q=", "http://x.test/p?q="),
    ("  ", None),
])
def test_normalize_url(url, expected):
    assert normalize_url(url) == expected


def run(spark, stage, rows, partitions=3):
    df = spark.createDataFrame(rows, SCHEMA).repartition(partitions)
    result = run_stage(spark, stage, df, None, log=lambda m: None)
    out = {r["id"]: r["drop_reason"] for r in result.result.collect()}
    stats = result.stats
    result.unpersist()
    assert stats.docs_in == len(rows) == stats.kept + sum(stats.dropped.values())
    return out, stats


def test_url_dedup_keeps_newest(spark):
    rows = [
        ("a", "http://x.test/page", "old", day(1)),
        ("b", "HTTP://X.TEST:80/page/?utm_source=feed", "new", day(9)),
        ("c", "http://x.test/page#top", "mid", day(5)),
        ("d", "http://x.test/other", "other", day(2)),
        ("e", None, "no url", day(3)),
        ("f", None, "no url either", day(3)),
        ("g", "http://x.test/tie", "t1", day(4)),
        ("h", "http://x.test/tie/", "t2", day(4)),  # same date: smallest id wins
        ("i", "http://x.test/tie", "t3", None),  # no date: loses to any dated page
    ]
    expected = {"a": "url_duplicate", "b": None, "c": "url_duplicate", "d": None, "e": None, "f": None,
                "g": None, "h": "url_duplicate", "i": "url_duplicate"}
    for partitions in (1, 4):
        out, stats = run(spark, UrlDedupStage(), rows, partitions)
        assert out == expected
        assert stats.dropped == {"url_duplicate": 4}


def test_exact_dedup_keeps_first_crawl(spark):
    rows = [
        ("a", "u1", "The same text.\nTwice.", day(5)),
        ("b", "u2", "  the SAME   text. twice. ", day(2)),
        ("c", "u3", "The same text.\nTwice.", day(2)),  # same date as b: smallest id wins
        ("d", "u4", "Different text.", day(1)),
        ("e", "u5", None, day(1)),
    ]
    out, stats = run(spark, ExactDedupStage(), rows)
    assert out == {"a": "exact_duplicate", "b": None, "c": "exact_duplicate", "d": None, "e": None}
    out, _ = run(spark, ExactDedupStage(ExactDedupConfig(lowercase=False)), rows, partitions=1)
    assert out == {"a": "exact_duplicate", "b": None, "c": None, "d": None, "e": None}


def test_all_identical_documents_leave_one(spark):
    rows = [(f"id{i:03d}", f"http://x.test/{i}", "Same page everywhere.", day(1 + i % 20)) for i in range(200)]
    out, stats = run(spark, ExactDedupStage(), rows, partitions=8)
    assert [k for k, v in out.items() if v is None] == ["id000"]
    assert stats.dropped == {"exact_duplicate": 199}
