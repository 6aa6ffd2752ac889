"""The pipeline and the CLI: chained stages, funnel accounting, resume, spark-submit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from kiln.cli import main
from kiln.formats.stats import StageStats
from tests.conftest import docstrings, locale_sentences, page, read_dropped, write_warc

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def warc(tmp_path_factory) -> Path:
    """English prose, other languages, spam, a short page and non-HTML: each stage drops something."""
    records = []
    prose = docstrings("argparse") + docstrings("textwrap") + docstrings("difflib")
    for i, doc in enumerate(prose[:16]):
        records.append({"url": f"http://en.test/{i}", "body": page(f"Doc {i}", doc.split("\n\n")).encode()})
    for lang in ("de", "fr", "ru"):
        sents = locale_sentences(lang, limit=24)
        for i in range(3):
            records.append({"url": f"http://{lang}.test/{i}",
                            "body": page(f"{lang} {i}", sents[i * 8:(i + 1) * 8]).encode()})
    spam = " ".join(["Buy cheap watches now, best price, cheap watches online, buy now."] * 30)
    records.append({"url": "http://spam.test/", "body": page("Cheap", [spam]).encode()})
    records.append({"url": "http://short.test/", "body": page("Hi", ["Hello there."]).encode()})
    records.append({"url": "http://img.test/a.png", "body": b"\x89PNG\r\n\x1a\n" + bytes(32),
                    "content_type": "image/png"})
    return write_warc(tmp_path_factory.mktemp("warc") / "in.warc.gz", records)


def recipe(path: Path, warc: Path, out: Path, extra: str = "") -> Path:
    path.write_text(f"""
[pipeline]
input = ["{warc}"]
output = "{out}"
write_dropped = true

[langid]
keep_languages = ["en", "de"]
{extra}
""")
    return path


def stage_stats(out: Path) -> list[StageStats]:
    return [StageStats.from_json((d / "stats.json").read_text()) for d in sorted(out.iterdir()) if d.is_dir()]


def test_pipeline_accounts_for_every_document(spark, warc, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["curate", "pipeline", str(recipe(tmp_path / "r.toml", warc, out))]) == 0
    stats = stage_stats(out)
    assert [s.stage for s in stats] == ["extract", "langid", "filter"]
    assert stats[0].docs_in == 28  # every response record, the PNG included
    for prev, cur in zip(stats, stats[1:]):
        assert cur.docs_in == prev.kept  # stages chain without losing anything
    for s, d in zip(stats, sorted(p for p in out.iterdir() if p.is_dir())):
        assert s.docs_in == s.kept + sum(s.dropped.values())
        if (d / "docs").exists():
            assert pl.read_parquet(str(d / "docs" / "*.parquet")).height == s.kept
        else:  # an intermediate stage of a fused group (kiln.curation.fused) writes no docs/
            assert s.stage in s.extra["fused"][:-1]
        dropped = read_dropped(d) if s.dropped else pl.DataFrame({"drop_reason": []})
        assert dropped["drop_reason"].value_counts().sort("drop_reason").rows() == sorted(s.dropped.items())
    assert stats[0].dropped == {"not_html": 1}
    assert stats[1].dropped == {"lang_not_kept": 6}
    assert "gopher_short_doc" in stats[2].dropped
    assert json.loads((out / "funnel.json").read_text())[2]["kept"] == stats[2].kept
    printed = capsys.readouterr().out
    assert "kiln funnel" in printed and "lang_not_kept" in printed


def test_relaunch_reuses_finished_stages(spark, warc, tmp_path, capsys):
    out = tmp_path / "out"
    r = recipe(tmp_path / "r.toml", warc, out)
    assert main(["curate", "pipeline", str(r)]) == 0
    first = stage_stats(out)
    capsys.readouterr()
    assert main(["curate", "pipeline", str(r)]) == 0
    assert capsys.readouterr().err.count("reusing finished output") == 3
    # A changed filter setting recomputes the filter stage only.
    r = recipe(tmp_path / "r.toml", warc, out, "[filter.gopher_quality]\nmin_doc_words = 10\n")
    assert main(["curate", "pipeline", str(r)]) == 0
    err = capsys.readouterr().err
    assert err.count("reusing finished output") == 2 and "[filter] running" in err
    assert stage_stats(out)[:2] == first[:2]


def test_bad_recipe_fails_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[langid]\nkeep_language = ["en"]\n')
    assert main(["curate", "pipeline", str(bad)]) == 2
    assert "bad.toml: [langid]: unknown key 'keep_language'" in capsys.readouterr().err
    assert main(["curate", "pipeline", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: recipe file does not exist" in capsys.readouterr().err


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["curate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for stage in ("extract", "langid", "filter", "pipeline", "sample"):
        assert stage in text


def test_spark_submit_runs_the_same_job(warc, tmp_path):
    spark_submit = Path(sys.executable).parent / "spark-submit"
    out = tmp_path / "out"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    proc = subprocess.run(
        [str(spark_submit), "--master", "local[1]", str(REPO / "kiln/curation/jobs/extract.py"),
         "--input", str(warc), "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = StageStats.from_json((out / "stats.json").read_text())
    assert stats.docs_in == 28 and stats.kept == 27 and stats.dropped == {"not_html": 1}
    assert pl.read_parquet(str(out / "docs" / "*.parquet")).height == 27


def test_pipeline_from_warc_to_token_shards(spark, warc, tmp_path, capsys):
    import shutil

    from kiln.curation.classify import FastTextTrainConfig, train_fasttext
    from kiln.curation.tokenizer import load_tokenizer, train_tokenizer
    from kiln.formats.shards import iter_documents, shard_indexes

    prose = docstrings("argparse") + docstrings("textwrap") + docstrings("difflib")
    code = [" ".join(Path(f"{os.path.dirname(os.__file__)}/{m}.py").read_text().splitlines()[i:i + 12])
            for m in ("shutil", "tarfile") for i in range(0, 600, 20)]
    train_fasttext(prose + code, ["general"] * len(prose) + ["code"] * len(code), str(tmp_path / "domain.bin"),
                   FastTextTrainConfig(val_fraction=0))
    train_tokenizer(prose, str(tmp_path / "tok"), vocab_size=400)
    extra = f"""
[domain]
model_path = "{tmp_path / 'domain.bin'}"
[tokenize]
tokenizer = "{tmp_path / 'tok'}"
"""
    out = tmp_path / "out"
    r = recipe(tmp_path / "r.toml", warc, out, extra)
    text = r.read_text().replace('write_dropped = true', 'write_dropped = true\nstages = ["extract", "langid", "domain", "tokenize"]')
    r.write_text(text)
    assert main(["curate", "pipeline", str(r)]) == 0
    stats = stage_stats(out)
    assert [s.stage for s in stats] == ["extract", "langid", "domain", "tokenize"]
    assert stats[3].docs_in == stats[2].kept == stats[1].kept == 21  # 18 en + 3 de pages
    availability = json.loads((out / "04_tokenize" / "shards" / "availability.json").read_text())
    assert availability["domains"]["multilingual"]["documents"] == 3  # the German pages, by lang
    assert availability["total_documents"] == 21 and availability["total_tokens"] == stats[3].extra["metrics"]["tokens"]
    tok = load_tokenizer(str(tmp_path / "tok")).tokenizer
    docs = pl.read_parquet(str(out / "04_tokenize" / "docs" / "*.parquet"))
    texts = dict(zip(docs["id"], docs["text"]))
    for index in shard_indexes(str(out / "04_tokenize" / "shards")):
        ids = json.loads(Path(index).read_text())["doc_ids"]
        for doc_id, tokens in zip(ids, iter_documents(index)):
            assert tokens.tolist() == tok.encode(texts[doc_id], add_special_tokens=False).ids
    capsys.readouterr()
    assert main(["curate", "pipeline", str(r)]) == 0
    assert capsys.readouterr().err.count("reusing finished output") == 4
    shutil.rmtree(out / "04_tokenize" / "shards")  # a reused stage must still have its shards
    assert main(["curate", "pipeline", str(r)]) == 0
    err = capsys.readouterr().err
    assert err.count("reusing finished output") == 3 and "has lost its side outputs: recomputing" in err
    assert json.loads((out / "04_tokenize" / "shards" / "availability.json").read_text()) == availability
