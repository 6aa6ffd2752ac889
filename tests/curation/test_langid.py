"""Language ID through Spark: fastText lid.176 labels, keep/threshold drops, bad models."""

from __future__ import annotations

import pandas as pd
import pytest

from kiln.config import ConfigError
from kiln.curation.langid import LangIdConfig, LangIdStage, load_fasttext, resolve_model_path
from kiln.curation.stage import run_stage
from tests.conftest import docstrings, locale_sentences

LANGS = ["de", "fr", "es", "ru", "ja", "zh_CN", "it"]


def corpus() -> list[tuple[str, str, str]]:
    """(id, text, expected lang) with five real paragraphs per language."""
    rows = []
    for lang in LANGS:
        sents = locale_sentences(lang, min_chars=40 if lang in ("ja", "zh_CN") else 60, limit=40)
        for i in range(5):
            rows.append((f"{lang}-{i}", " ".join(sents[i * 8:(i + 1) * 8]), lang.split("_")[0]))
    for i, doc in enumerate(docstrings("argparse")[:5]):
        rows.append((f"en-{i}", doc, "en"))
    return rows


def frame(spark, rows):
    return spark.createDataFrame(pd.DataFrame({"id": [r[0] for r in rows], "text": [r[1] for r in rows]}),
                                 "id string, text string").repartition(3)


def test_labels_match_in_process_fasttext(spark):
    rows = corpus()
    result = run_stage(spark, LangIdStage(), frame(spark, rows), None)
    got = {r["id"]: (r["lang"], r["lang_score"]) for r in result.result.collect()}
    result.unpersist()
    model = load_fasttext(resolve_model_path())
    for id_, text, expected in rows:
        labels, scores = model.predict(" ".join(text.split()), k=1)
        assert got[id_][0] == labels[0].removeprefix("__label__") == expected, id_
        assert got[id_][1] == pytest.approx(float(scores[0]), abs=1e-6)
    assert result.stats.kept == len(rows) and result.stats.dropped == {}


def test_keep_languages_and_threshold(spark):
    rows = corpus() + [("noise", "12 34 56 78 90 ## -- == ++ 00 11", "?")]
    stage = LangIdStage(LangIdConfig(keep_languages=["en", "de"], min_score=0.5))
    result = run_stage(spark, stage, frame(spark, rows), None)
    reasons = {r["id"]: r["drop_reason"] for r in result.result.collect()}
    result.unpersist()
    assert reasons["noise"] == "lang_low_score"
    assert {k for k, v in reasons.items() if v is None} == {f"{lang}-{i}" for lang in ("en", "de") for i in range(5)}
    assert result.stats.dropped == {"lang_not_kept": 30, "lang_low_score": 1}
    assert result.stats.docs_in == result.stats.kept + 31


def test_unreadable_and_missing_models_fail_with_path(spark, tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a fasttext model" * 10)
    with pytest.raises(ConfigError, match="garbage.bin: cannot load as a fastText model"):
        LangIdStage(LangIdConfig(model_path=str(garbage))).prepare(spark, None)
    with pytest.raises(ConfigError, match="missing.ftz: fastText language-ID model not found"):
        LangIdStage(LangIdConfig(model_path=str(tmp_path / "missing.ftz")))


def test_a_model_of_the_wrong_kind_fails_with_path(spark, tmp_path):
    import random
    import subprocess
    import sys

    # A two-class quality model, as the quality-classifier issue will produce: loadable, not LID.
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    lines = [f"__label__{'good' if i % 2 else 'bad'} "
             + " ".join(rng.choice(vocab[:300] if i % 2 else vocab[200:]) for _ in range(20)) for i in range(2000)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    # Trained in a fresh process: fasttext-numpy2-wheel 0.9.2's train_supervised hits
    # "Encountered NaN" in a process whose heap has been reused (it reads memory it did
    # not initialise); a new interpreter starts with zeroed pages.
    subprocess.run([sys.executable, "-c", "import fasttext, sys; "
                    "fasttext.train_supervised(sys.argv[1], verbose=0).save_model(sys.argv[2])",
                    str(tmp_path / "train.txt"), str(tmp_path / "q.bin")], check=True)
    with pytest.raises(ConfigError, match=r"q.bin: not a language-ID model \(its labels: __label__"):
        LangIdStage(LangIdConfig(model_path=str(tmp_path / "q.bin"))).prepare(spark, None)
