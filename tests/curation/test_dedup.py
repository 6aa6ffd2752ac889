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


# ----------------------------------------------------------------- line dedup

from kiln.curation.dedup import LineDedupConfig, LineDedupStage, normalize_line  # noqa: E402

BOILER = "Subscribe to our newsletter for weekly updates!"
BODY = [f"This paragraph talks about {w}, a different subject, with enough words to matter here."
        for w in ("rivers", "bridges", "markets", "schools", "mills", "bells", "roads", "farms", "floods",
                  "hills", "libraries", "trains")]


def test_normalize_line_ignores_case_digits_punctuation():
    assert normalize_line("  Page 3 of 10. ") == normalize_line("page 4 of 12") == "page 0 of 00"


def line_docs():
    rows = []
    for i in range(7):  # BOILER in 7 documents (> 6): removed from all of them
        rows.append((f"b{i}", f"http://x.test/b{i}", f"{BODY[i]}\n{BOILER}\nPage {i} of 9", day(1)))
    rows.append(("only", "http://x.test/only", BOILER, day(1)))  # nothing left
    rows.append(("short", "http://x.test/short", f"Hi there.\n{BOILER}", day(1)))  # too short after
    rows.append(("clean", "http://x.test/clean", BODY[10], day(1)))
    return rows


def test_line_dedup_removes_exactly_lines_over_the_threshold(spark):
    out, stats = run(spark, LineDedupStage(LineDedupConfig(max_count=6, min_chars=20)), line_docs())
    assert out == {**{f"b{i}": None for i in range(7)}, "only": "line_dedup_empty",
                   "short": "line_dedup_too_short", "clean": None}
    # BOILER sits in 9 documents and "page N of 9" in 7: both over 6, so both go everywhere.
    assert stats.extra["metrics"] == {"lines_removed": 9 + 7,
                                      "chars_removed": 9 * len(BOILER) + 7 * len("Page 0 of 9")}


def test_line_dedup_keeps_lines_at_the_threshold(spark):
    rows = [r for r in line_docs() if r[0] not in ("b0", "b1", "b2")]  # BOILER in 6 docs, "page" line in 4
    out, stats = run(spark, LineDedupStage(LineDedupConfig(max_count=6, min_chars=20)), rows)
    assert all(v is None for v in out.values())
    assert stats.extra["metrics"] == {"lines_removed": 0, "chars_removed": 0}


def test_line_counts_are_per_bucket(spark):
    from collections import Counter

    from pyspark.sql import functions as F

    rows = line_docs()
    # 10 documents, bucket_docs=1: ten buckets by abs(xxhash64(id)) % 10. A line is removed
    # (max_count=1) only where two documents of one bucket share it.
    buckets = {r["id"]: r["b"] for r in spark.createDataFrame([(r[0],) for r in rows], "id string")
               .select("id", (F.abs(F.xxhash64("id")) % 10).alias("b")).collect()}
    per_bucket = Counter()
    for id_, _, text, _ in rows:
        for line in {normalize_line(x) for x in text.split("\n")}:
            per_bucket[(buckets[id_], line)] += 1
    expected = sum(n for n in per_bucket.values() if n > 1)
    assert expected < 16  # fewer than with one bucket: the buckets do split the counts
    out, stats = run(spark, LineDedupStage(LineDedupConfig(bucket_docs=1, max_count=1, min_chars=0)), rows)
    assert stats.extra["metrics"]["lines_removed"] == expected


# ----------------------------------------------------------------- MinHash

from kiln.curation.dedup import MinHashDedupStage, connected_components  # noqa: E402
from tests.conftest import docstrings, locale_sentences  # noqa: E402


def test_connected_components_follow_transitive_chains(spark):
    edges = spark.createDataFrame([("b", "a"), ("c", "b"), ("e", "d"), ("g", "f"), ("h", "g")], "src string, dst string")
    got = {r["id"]: r["component"] for r in connected_components(edges).collect()}
    # a~b and b~c put a and c in one component although no edge joins them
    assert got == {"a": "a", "b": "a", "c": "a", "d": "d", "e": "d", "f": "f", "g": "f", "h": "f"}


def _edit(text: str, every: int) -> str:
    words = text.split()
    return " ".join(w.upper() + "x" if i % every == 0 else w for i, w in enumerate(words))


def minhash_docs():
    bases = [d for d in docstrings("argparse") + docstrings("difflib") if len(d.split()) > 120][:6]
    rows = []
    for i, text in enumerate(bases):
        rows.append((f"d{i}0", f"http://m.test/{i}/0", text, day(1)))
        rows.append((f"d{i}1", f"http://m.test/{i}/1", _edit(text, 60), day(2)))  # ~3 % of words changed
    zh = "".join(locale_sentences("zh_CN", min_chars=20, limit=30))
    rows.append(("z0", "http://m.test/zh/0", zh, day(1)))
    rows.append(("z1", "http://m.test/zh/1", zh[:-3] + "。", day(1)))  # unsegmented script: char n-grams
    rows.append(("empty", "http://m.test/empty", "", day(1)))
    return rows


def test_minhash_finds_near_duplicates_and_keeps_the_smallest_id(spark):
    rows = minhash_docs()
    expected = {r[0]: ("minhash_duplicate" if r[0].endswith("1") else None) for r in rows}
    for partitions in (1, 5):
        out, stats = run(spark, MinHashDedupStage(), rows, partitions)
        assert out == expected
        assert stats.dropped == {"minhash_duplicate": 7}


def test_minhash_cluster_column(spark):
    df = spark.createDataFrame(minhash_docs(), SCHEMA)
    result = run_stage(spark, MinHashDedupStage(), df, None, log=lambda m: None)
    clusters = {r["id"]: r["minhash_cluster"] for r in result.result.collect()}
    result.unpersist()
    assert clusters["d31"] == "d30" and clusters["d30"] == "d30" and clusters["empty"] == "empty"


def test_minhash_verification_and_cluster_sizes(spark):
    from kiln.curation.dedup import MinHashConfig

    rows = minhash_docs()
    out, stats = run(spark, MinHashDedupStage(MinHashConfig(verify=True, verify_threshold=0.5)), rows)
    assert stats.dropped == {"minhash_duplicate": 7}  # the planted pairs are all above 0.5
    assert stats.extra["metrics"] == {"clusters_size_1": 1, "clusters_size_2": 7, "clusters_size_3_to_4": 0,
                                      "clusters_size_5_to_16": 0, "clusters_size_17_up": 0}
    # Verified at 0.99, the English pairs (about 0.8-0.9) are rejected; the Chinese pair,
    # three characters apart in a long text, is still one cluster.
    out, stats = run(spark, MinHashDedupStage(MinHashConfig(verify=True, verify_threshold=0.99)), rows)
    assert {k for k, v in out.items() if v} == {"z1"}
    assert stats.extra["metrics"]["clusters_size_1"] == len(rows) - 2


def test_bands_and_rows_from_a_threshold():
    from datasketch.lsh import _optimal_param

    from kiln.curation.dedup import MinHashConfig

    assert MinHashConfig().band_rows() == (14, 8)
    assert MinHashConfig(threshold=0.7).band_rows() == _optimal_param(0.7, 112, 0.5, 0.5)


def test_minhash_single_document_and_all_identical(spark):
    out, stats = run(spark, MinHashDedupStage(), [("only", "http://x.test/", "A single document here.", day(1))])
    assert out == {"only": None}
    # One band bucket holds the whole corpus: a star of 199 edges, one component, one survivor.
    text = " ".join(docstrings("argparse")[:2])
    rows = [(f"id{i:03d}", f"http://x.test/{i}", text, day(1)) for i in range(200)]
    out, stats = run(spark, MinHashDedupStage(), rows, partitions=8)
    assert [k for k, v in out.items() if v is None] == ["id000"]
    assert stats.dropped == {"minhash_duplicate": 199}
    assert stats.extra["metrics"]["clusters_size_17_up"] == 1
