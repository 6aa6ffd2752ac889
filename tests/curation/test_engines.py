"""Extraction engines: resiliparse's main content inside the extract stage, counted as
trafilatura's is, sandboxed as trafilatura is; engine names and engine-only settings
checked when the recipe is read, before any Spark work."""

from __future__ import annotations

import json
import random
import time

import pytest

from kiln.config import ConfigError
from kiln.curation.extract import ExtractConfig, ExtractStage, resiliparse_main_content
from kiln.curation.pipeline import parse_recipe
from kiln.curation.readers import ReadConfig, read_jsonl
from tests.conftest import page, write_warc
from tests.curation.test_extract import PARAS, extract

BOILERPLATE = ("About us", "All rights reserved", "uses cookies")  # conftest.page's nav and footer


def test_resiliparse_engine_extracts_main_content_and_counts_every_page(spark, tmp_path):
    articles = [{"url": f"http://docs.example.test/r/{i}", "body": page(f"Resiliparse page {i}", PARAS[i]).encode()}
                for i in range(5)]
    records = articles + [
        {"url": "http://x.test/nothing", "body": b"<html><body><div> </div><script>var x = 1;</script></body></html>"},
        {"url": "http://x.test/garbage", "body": random.Random(0).randbytes(3000),
         "content_type": "text/html; charset=utf-8"},
        {"url": "http://x.test/img.png", "body": b"\x89PNG\r\n\x1a\n" + bytes(64), "content_type": "image/png"},
    ]
    warc = write_warc(tmp_path / "r.warc.gz", records)
    stats, docs = extract(spark, [warc], tmp_path, extract_cfg={"engine": "resiliparse"})
    assert stats.docs_in == 8 and stats.kept == 5
    assert stats.dropped == {"extract_empty": 1, "undecodable": 1, "not_html": 1}
    assert stats.docs_in == stats.kept + sum(stats.dropped.values())
    options = ExtractConfig(engine="resiliparse").engine_kwargs()
    by_url = {r["url"]: r for r in docs.iter_rows(named=True)}
    assert set(by_url) == {r["url"] for r in articles}
    for i, r in enumerate(articles):
        got = by_url[r["url"]]
        assert (got["text"], got["title"]) == resiliparse_main_content(r["body"].decode(), **options)
        assert got["title"] == f"Resiliparse page {i}" and got["charset"] == "utf-8"
        flat = " ".join(got["text"].split())
        assert all(" ".join(p.split()) in flat for p in PARAS[i])  # every paragraph of the article
        assert not any(b in got["text"] for b in BOILERPLATE)  # and nothing of the nav or footer


def test_resiliparse_runs_in_the_sandbox_with_its_timeout(tmp_path):
    # resiliparse's main-content pass is quadratic in the nesting depth: 30,000 nested
    # <div>s (a 330 kB page) take it about 10 s, in C++ that no signal interrupts.
    deep = "<html><body>" + "<div>" * 30_000 + "deep text" + "</div>" * 30_000 + "</body></html>"
    pages = [{"url": "http://deep.test/", "html": deep}] + [
        {"url": f"http://ok.test/{i}", "html": page(f"OK {i}", PARAS[i])} for i in range(2)]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in pages) + "\n")
    stage = ExtractStage(ExtractConfig(engine="resiliparse", timeout_s=0.5))
    start = time.monotonic()
    out = list(stage.process_partition(read_jsonl(str(path), ReadConfig())))
    assert time.monotonic() - start < 5
    assert [r for b in out for r in b.column("drop_reason").to_pylist()] == ["extract_timeout", None, None]
    texts = [t for b in out for t in b.column("text").to_pylist()]
    assert texts[0] is None and all(" ".join(PARAS[i][0].split()) in " ".join(texts[i + 1].split()) for i in range(2))


def test_unknown_engine_is_a_config_error_naming_the_engines():
    with pytest.raises(ConfigError) as e:
        ExtractConfig(engine="justext")
    assert str(e.value) == "extract.engine must be one of trafilatura, resiliparse, got 'justext'"
    with pytest.raises(ConfigError) as e:  # from a recipe, before any Spark work
        parse_recipe({"pipeline": {"input": ["x.warc"], "output": "out", "stages": ["extract"]},
                      "extract": {"engine": "Resiliparse"}})
    assert str(e.value) == "extract.engine must be one of trafilatura, resiliparse, got 'Resiliparse'"


def test_trafilatura_only_settings_are_refused_with_resiliparse():
    for name in ("favor_precision", "favor_recall", "deduplicate"):
        with pytest.raises(ConfigError) as e:
            ExtractConfig(engine="resiliparse", **{name: True})
        assert str(e.value) == f"extract.{name} applies to the trafilatura engine only (engine = 'resiliparse')"
    assert ExtractConfig(engine="trafilatura", favor_precision=True).favor_precision


COMMENTED = ("<html><head><title>T</title></head><body><nav><a href='/'>Home</a> <a href='/about'>About us</a></nav>"
             "<main><h1>Heading</h1><p>{para}</p><table><tr><td>cell value one</td><td>cell value two</td></tr>"
             "</table><p>{para2}</p><div id='comments'><h3>Comments</h3><p>Great post, thanks a lot!</p></div>"
             "</main><footer>All rights reserved.</footer></body></html>")


def test_resiliparse_page_without_title_or_text():
    options = ExtractConfig(engine="resiliparse").engine_kwargs()
    para = " ".join(PARAS[0][0].split())
    assert resiliparse_main_content(f"<html><body><main><p>{para}</p></main></body></html>", **options) == (para, None)
    assert resiliparse_main_content("<html><head><title>Only a title</title></head><body></body></html>",
                                    **options) is None


def test_shared_settings_mean_the_same_with_resiliparse():
    html = COMMENTED.format(para=" ".join(PARAS[0][0].split()), para2=" ".join(PARAS[1][0].split()))

    def text(**settings):
        return resiliparse_main_content(html, **ExtractConfig(engine="resiliparse", **settings).engine_kwargs())[0]

    default = text()
    assert "cell value one" in default and "Great post" not in default and "About us" not in default
    assert "cell value one" not in text(include_tables=False)
    assert "Great post, thanks a lot!" in text(include_comments=True)
    assert ExtractConfig(engine="resiliparse").engine_kwargs() == {
        "main_content": True, "alt_texts": False, "comments": False, "skip_elements": None}
