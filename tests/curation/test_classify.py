"""fastText quality and domain classifiers: training, Spark application, bad input."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from kiln.config import ConfigError
from kiln.curation.classify import (DomainConfig, DomainStage, FastTextTrainConfig, QualityConfig, QualityStage,
                                    keep_draw, positive_probability, predict_labels, train_fasttext)
from kiln.curation.labelled import read_labelled
from kiln.curation.langid import load_fasttext, resolve_model_path
from kiln.curation.stage import run_stage
from tests.conftest import docstrings, locale_sentences


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    from kiln.demo import build_labels

    out = tmp_path_factory.mktemp("labels")
    build_labels(out, seed=1)
    return out


@pytest.fixture(scope="module")
def quality_model(labels, tmp_path_factory):
    data = read_labelled([str(labels / "quality_pos.jsonl")], label="hq")
    data.extend(read_labelled([str(labels / "quality_neg.jsonl")], label="lq"))
    path = str(tmp_path_factory.mktemp("q") / "quality.bin")
    info = train_fasttext(data.texts, data.labels, path, kind="quality", positive_label="hq")
    return path, info


@pytest.fixture(scope="module")
def domain_model(labels, tmp_path_factory):
    data = read_labelled([str(labels / "domain.jsonl")])
    path = str(tmp_path_factory.mktemp("d") / "domain.bin")
    info = train_fasttext(data.texts, data.labels, path, kind="domain")
    return path, info


def frame(spark, ids, texts, langs=None):
    data = {"id": ids, "text": texts}
    ddl = "id string, text string"
    if langs is not None:
        data["lang"] = langs
        ddl += ", lang string"
    return spark.createDataFrame(pd.DataFrame(data), ddl).repartition(3)


def docs():
    """Documents the classifiers never saw: other generators' seed, plus plain docstrings."""
    from kiln.demo.labels import plain_text
    from kiln.demo.pages import code_pages, rng_for, spam_pages
    from kiln.demo.sources import stdlib_modules

    mods = stdlib_modules()
    good = [plain_text(p) for p in code_pages(mods, rng_for(7, "code"))[:10]]
    good += docstrings("argparse")[:10]
    bad = [plain_text(p) for p in spam_pages(rng_for(7, "spam"))[:10]]
    texts = good + bad
    return [f"d{i}" for i in range(len(texts))], texts


def test_training_reports_held_out_accuracy(quality_model, domain_model):
    _, q = quality_model
    _, d = domain_model
    assert q["class_rows"] == {"hq": 531, "lq": 531} and q["val_rows"] == 106 and q["train_rows"] == 956
    assert q["validation"]["accuracy"] >= 0.9
    assert q["validation"]["classes"]["hq"]["recall"] >= 0.95  # good pages are not thrown away
    assert d["labels"] == ["code", "general", "math"] and d["val_rows"] == 53
    assert d["validation"]["accuracy"] >= 0.95
    for c in ("code", "general", "math"):
        assert d["validation"]["classes"][c]["recall"] >= 0.8, c


def test_training_is_reproducible(labels, tmp_path):
    data = read_labelled([str(labels / "domain.jsonl")], max_rows=200)
    cfg = FastTextTrainConfig(epoch=5)
    train_fasttext(data.texts, data.labels, str(tmp_path / "a.bin"), cfg)
    train_fasttext(data.texts, data.labels, str(tmp_path / "b.bin"), cfg)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_quality_in_spark_equals_in_process(spark, quality_model):
    path, _ = quality_model
    ids, texts = docs()
    german = locale_sentences("de", limit=10)
    stage = QualityStage(QualityConfig(model_path=path, min_score=0.5))
    # German pages are not judged by an English classifier: null score, kept.
    df = frame(spark, ids + ["de"], texts + [" ".join(german)], ["en"] * len(ids) + ["de"])
    result = run_stage(spark, stage, df, None)
    rows = {r["id"]: r for r in result.result.collect()}
    result.unpersist()
    assert (rows.pop("de")["quality_score"], result.stats.docs_in) == (None, 31)
    expected = positive_probability(load_fasttext(path), texts, "hq", True, 10_000)
    for id_, score in zip(ids, expected):
        assert rows[id_]["quality_score"] == pytest.approx(score, abs=1e-6)
        assert rows[id_]["drop_reason"] == (None if score >= 0.5 else "quality_low_score")
    low = sum(s < 0.5 for s in expected)
    assert result.stats.dropped == ({"quality_low_score": low} if low else {})
    assert result.stats.docs_in == result.stats.kept + low == len(ids) + 1
    # The spam pages (the last ten) score low, the source listings (the first ten) high;
    # bare docstrings, shorter than any training page, fall either side.
    assert all(s < 0.5 for s in expected[20:]) and all(s >= 0.5 for s in expected[:10])


def test_keep_top_fraction_uses_the_corpus_quantile(spark, quality_model, tmp_path):
    path, _ = quality_model
    ids, texts = docs()
    ids, texts = ids + ["empty"], texts + ["  \n "]
    stage = QualityStage(QualityConfig(model_path=path, keep_top_fraction=0.25))
    result = run_stage(spark, stage, frame(spark, ids, texts), str(tmp_path / "q"))
    scores = positive_probability(load_fasttext(path), texts[:-1], "hq", True, 10_000)
    ranked = sorted(scores)
    # percentile_approx(p): the smallest value with at least p of the values <= it.
    threshold = ranked[math.ceil(0.75 * len(ranked)) - 1]
    stats = json.loads((tmp_path / "q" / "stats.json").read_text())
    assert stats["extra"]["quality_threshold"] == pytest.approx(threshold, abs=1e-6)
    kept = {r["id"] for r in result.kept.collect()}
    assert kept == {i for i, s in zip(ids, scores) if s >= threshold}
    assert stats["dropped"] == {"quality_not_top_fraction": 30 - len(kept), "empty_document": 1}
    assert stats["docs_in"] == stats["kept"] + sum(stats["dropped"].values()) == 31


def test_domain_in_spark_equals_in_process_and_lang_decides_multilingual(spark, domain_model):
    path, _ = domain_model
    ids, texts = docs()
    ids, texts = ids[:20], texts[:20]
    langs = ["en"] * 20
    german = locale_sentences("de", limit=15)
    ids += ["de-0", "de-1", "nolang"]
    texts += [" ".join(german[:7]), " ".join(german[7:]), docstrings("subprocess", 500)[0]]
    langs += ["de", "de", None]
    result = run_stage(spark, DomainStage(DomainConfig(model_path=path)), frame(spark, ids, texts, langs), None)
    rows = {r["id"]: r for r in result.result.collect()}
    result.unpersist()
    model = load_fasttext(path)
    for i, id_ in enumerate(ids):
        if langs[i] == "de":
            assert (rows[id_]["domain"], rows[id_]["domain_score"]) == ("multilingual", None)
            continue
        label, prob = predict_labels(model, [texts[i]], True, 10_000)
        assert rows[id_]["domain"] == label[0], id_
        assert rows[id_]["domain_score"] == pytest.approx(prob[0], abs=1e-6)
    # Source listings are code; one of them is mostly docstring prose and reads as general.
    assert sum(rows[f"d{i}"]["domain"] == "code" for i in range(10)) >= 9
    assert result.stats.extra["metrics"] == {
        "docs_general": sum(r["domain"] == "general" for r in rows.values()),
        "docs_code": sum(r["domain"] == "code" for r in rows.values()),
        "docs_math": sum(r["domain"] == "math" for r in rows.values()), "docs_multilingual": 2}
    assert result.stats.kept == 23 and result.stats.dropped == {}


def test_topic_downsampling_is_deterministic_by_id(spark, domain_model):
    path, _ = domain_model  # its classes serve as topics here
    ids, texts = docs()
    cfg = DomainConfig(model_path=path, topic_model=path, topic_rates={"code": 0.0, "general": 0.5}, seed=3)
    result = run_stage(spark, DomainStage(cfg), frame(spark, ids, texts), None)
    rows = {r["id"]: r for r in result.result.collect()}
    result.unpersist()
    topics = predict_labels(load_fasttext(path), texts, True, 10_000)[0]
    expected = {}
    for id_, topic in zip(ids, topics):
        assert rows[id_]["topic"] == topic
        rate = {"code": 0.0, "general": 0.5}.get(topic, 1.0)
        expected[id_] = None if keep_draw(id_, 3) < rate else "topic_downsampled"
        assert rows[id_]["drop_reason"] == expected[id_], id_
    n_drop = sum(v is not None for v in expected.values())
    assert n_drop >= 10  # every code page at least
    assert result.stats.dropped == {"topic_downsampled": n_drop}


def test_bad_input_fails_with_file_and_reason(spark, labels, quality_model, domain_model, tmp_path):
    q_path, _ = quality_model
    d_path, _ = domain_model
    with pytest.raises(ConfigError, match=r"x.jsonl: only one class \('hq', 3 rows\)"):
        train_fasttext(["a b", "c d", "e f"], ["hq"] * 3, str(tmp_path / "m.bin"), where="x.jsonl")
    with pytest.raises(ConfigError, match="class 'b' has 1 row"):
        train_fasttext(["a b", "c d", "e f"], ["a", "a", "b"], str(tmp_path / "m.bin"))
    with pytest.raises(ConfigError, match=r"domain.bin: not a quality model: no label 'hq' \(its labels: "):
        QualityStage(QualityConfig(model_path=d_path))
    with pytest.raises(ConfigError, match=r"quality.bin: not a domain model for \['general', 'math', 'code'\]"):
        DomainStage(DomainConfig(model_path=q_path))
    with pytest.raises(ConfigError, match=r"lid.176.ftz: not a domain model"):
        DomainStage(DomainConfig(model_path=resolve_model_path()))
    with pytest.raises(ConfigError, match="missing.bin: quality model not found"):
        QualityStage(QualityConfig(model_path=str(tmp_path / "missing.bin")))
    with pytest.raises(ConfigError, match="topic_rates: 'sports' is not a topic"):
        DomainStage(DomainConfig(model_path=d_path, topic_model=d_path, topic_rates={"sports": 0.5}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": broken\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not JSON"):
        read_labelled([str(bad)])


def test_cli_trains_and_applies(spark, labels, tmp_path):
    from kiln.cli import main

    model = tmp_path / "models" / "quality.bin"
    assert main(["curate", "train-quality", "--positives", str(labels / "quality_pos.jsonl"),
                 "--negatives", str(labels / "quality_neg.jsonl"), "--output", str(model), "--epoch", "5"]) == 0
    info = json.loads((tmp_path / "models" / "quality.bin.json").read_text())
    assert info["kind"] == "quality" and info["settings"]["epoch"] == 5
    ids, texts = docs()
    spark.createDataFrame(pd.DataFrame({"id": ids, "text": texts})).write.parquet(str(tmp_path / "in"))
    assert main(["curate", "quality", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--model", str(model), "--min-score", "0.5", "--master", "local[2]"]) == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["docs_in"] == 30 and stats["kept"] + stats["dropped"].get("quality_low_score", 0) == 30
    assert main(["curate", "train-domain", "--input", str(labels / "quality_pos.jsonl"),
                 "--output", str(tmp_path / "x.bin")]) == 2  # no label column: a clean error, exit 2


def test_transformer_backend_for_domains(spark, labels, tmp_path):
    from kiln.curation.scorer import Scorer, ScorerTrainConfig, train_scorer
    from kiln.curation.tokenizer import train_tokenizer

    data = read_labelled([str(labels / "domain.jsonl")])
    train_tokenizer(data.texts, str(tmp_path / "tok"), vocab_size=512)
    cfg = ScorerTrainConfig(task="classification", tokenizer=str(tmp_path / "tok"), epochs=8, max_length=128)
    metrics = train_scorer(data.texts, data.labels, cfg, str(tmp_path / "clf"))
    assert metrics["accuracy"] >= 0.8  # held-out rows; the majority class alone is ~0.65
    ids, texts = docs()
    result = run_stage(spark, DomainStage(DomainConfig(backend="transformer", model_path=str(tmp_path / "clf"))),
                       frame(spark, ids, texts), None)
    rows = {r["id"]: r for r in result.result.collect()}
    result.unpersist()
    labels_, probs = Scorer.load(str(tmp_path / "clf")).classify(texts)
    for id_, label, p in zip(ids, labels_, probs):
        assert rows[id_]["domain"] == label
        assert rows[id_]["domain_score"] == pytest.approx(float(p.max()), abs=1e-5)
    assert result.stats.kept == 30
