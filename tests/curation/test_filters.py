"""Filters: exact reason strings per rule, and kiln's Spark stage agreeing with datatrove."""

from __future__ import annotations

import math

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)

from kiln.config import ConfigError
from kiln.curation.filters import FilterConfig, FilterStage, filter_specs
from kiln.curation.filters.llama3 import (DirtyWordsFilter, DuplicatedNgramLineFilter, TokenKLFilter,
                                          load_word_list, reference_from_counts, tokens)
from tests.conftest import docstrings

PROSE = docstrings("argparse") + docstrings("textwrap") + docstrings("difflib") + docstrings("inspect")


def only(*keys: str, **overrides) -> FilterStage:
    """A filter stage with just `keys` enabled, applied to every language."""
    table = {k: {"enabled": False} for k in
             ["dup_ngram_lines", "dirty_words", "gopher_repetition", "gopher_quality", "c4_quality",
              "fineweb_quality", "token_kl"]}
    for k in keys:
        table[k] = {"languages": [], **overrides.get(k, {})}
    return FilterStage(FilterConfig.from_table(table))


def reason(stage: FilterStage, text: str, lang: str = "en") -> str | None:
    return stage.run_chain(Document(text=text, id="x", metadata={"lang": lang}), lang)


# Plain prose that passes every rule (written for the test: real docstrings carry code).
LONG_GOOD = """The river town grew slowly over two centuries, and its people learned to live with the water.
Every spring the floods came down from the hills, and the farmers moved their animals to higher ground.
The old bridge was built of stone in the year the first school opened, and it still carries the road today.
Children walk across it every morning on their way to the lessons that their grandparents also attended.
In the summer the market fills the square with fruit, bread and cheese from the farms around the valley.
Visitors often say that the town feels unchanged, but the people who live there know how much has moved.
The mill closed a long time ago, and the building now holds a library with a reading room by the river.
On quiet evenings the bells of the church ring over the roofs, and the light fades slowly behind the hills."""


# ----------------------------------------------------------------- datatrove rules via kiln

def test_gopher_quality_reasons():
    stage = only("gopher_quality")
    assert reason(stage, "The cat sat on the mat and that was all.") == "gopher_short_doc"
    assert reason(stage, " ".join(["#python programming with the language"] * 60)) == "gopher_too_many_hashes"
    assert reason(stage, " ".join(["xyzzy plugh"] * 60)) == "gopher_enough_stop_words"
    assert reason(stage, LONG_GOOD) is None


def test_gopher_repetition_reasons():
    stage = only("gopher_repetition")
    para = "The parser reads arguments and the values that follow them."
    assert reason(stage, "\n\n".join([para] * 5 + ["A different closing paragraph here."])) == "dup_para_frac"
    assert reason(stage, LONG_GOOD) is None


def test_c4_reasons_and_line_removal():
    stage = only("c4_quality")
    lines = [s.strip() + "." for s in LONG_GOOD.replace("\n", " ").split(".") if len(s.split()) > 4][:8]
    assert reason(stage, "\n".join(lines + ["Lorem ipsum dolor sit amet, consectetur adipiscing."])) == "lorem_ipsum"
    assert reason(stage, "\n".join(lines + ["Use a dict like {a: 1} for the options here."])) == "curly_bracket"
    assert reason(stage, "Too short.\nStill short.") == "too_few_sentences"
    doc = Document(text="\n".join(lines + ["Menu", "Enable javascript to view this page properly."]), id="x")
    assert stage.run_chain(doc, "en") is None
    assert doc.text == "\n".join(lines)  # C4 keeps the page but drops the menu and javascript lines


def test_fineweb_reasons():
    stage = only("fineweb_quality")
    assert reason(stage, "\n".join(["Home", "Products", "About us", "Contact"] * 5)) == "line_punct_ratio"
    assert reason(stage, LONG_GOOD) is None


def test_languages_scope_filters():
    stage = only("gopher_quality", gopher_quality={"languages": ["en"]})
    assert reason(stage, "Kurzer Text.", lang="de") is None
    assert reason(stage, "Short text.", lang="en") == "gopher_short_doc"


# ----------------------------------------------------------------- Llama 3 filters

LOG = [f"2024-03-0{d} 12:{m:02d}:{s:02d} ERROR [worker-3] connection reset by peer while reading block {m * 60 + s}"
       for d in (1, 2) for m in range(3) for s in (7, 31)]


def test_dup_ngram_removes_log_lines_exactly():
    f = DuplicatedNgramLineFilter(n=4, max_line_coverage=0.6, min_line_words=8, max_removed_fraction=0.5)
    prose = LONG_GOOD.split("\n")
    doc = Document(text="\n".join(prose[:4] + LOG[:3] + prose[4:]), id="x")
    assert f.filter(doc) is True
    assert doc.text == "\n".join(prose)  # exactly the three log lines are gone


def test_dup_ngram_drops_log_dump():
    doc = Document(text="\n".join(LONG_GOOD.split("\n")[:2] + LOG), id="x")
    assert DuplicatedNgramLineFilter().filter(doc) == (False, "dup_ngram_coverage")


def test_dirty_words_counts_hits():
    words = sorted(w for w in load_word_list() if " " not in w)[:3]
    assert len(words) == 3
    base = LONG_GOOD
    f = DirtyWordsFilter(min_hits=3, min_ratio=0.005)
    assert f.filter(Document(text=f"{base} {words[0]}", id="x")) is True  # one hit is not enough
    assert f.filter(Document(text=f"{base} {' '.join(words)}", id="x")) == (False, "dirty_words")


def test_dirty_words_local_list(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("zorgle\nblip blop\n")
    f = DirtyWordsFilter(min_hits=2, min_ratio=0.0, word_list_path=str(path))
    assert f.filter(Document(text="a zorgle and a Blip blop here", id="x")) == (False, "dirty_words")
    assert f.filter(Document(text="a zorgle and a blip here", id="x")) is True


def test_token_kl_value_and_reason():
    ref = reference_from_counts({"en": {"a": 6, "b": 3}}, {"en": 10}, alpha=1.0)
    f = TokenKLFilter(max_kl=0.5, min_tokens=2, reference=ref)
    # q: a=7/13, b=4/13, other=2/13; doc "a a b c": p a=1/2, b=1/4, other=1/4
    expected = 0.5 * math.log(0.5 / (7 / 13)) + 0.25 * math.log(0.25 / (4 / 13)) + 0.25 * math.log(0.25 / (2 / 13))
    assert f.kl("a a b c", "en") == pytest.approx(expected, rel=1e-12)
    assert f.filter(Document(text="a a b c", id="x", metadata={"lang": "en"})) is True
    assert f.filter(Document(text="c d e f", id="x", metadata={"lang": "en"})) == (False, "token_kl_outlier")
    assert f.kl("a", "en") is None  # shorter than min_tokens: not judged
    assert f.kl("a a b c", "de") is None  # no reference for the language


def test_tokens_split_cjk_per_character():
    assert tokens("Hello, World 你好世界 ok") == ["hello", "world", "你", "好", "世", "界", "ok"]


# ----------------------------------------------------------------- recipe strictness

def test_unknown_filter_and_key_are_errors():
    with pytest.raises(ConfigError, match="unknown filter 'gopher_qualty'"):
        filter_specs({"gopher_qualty": {}})
    with pytest.raises(ConfigError, match="filter.gopher_quality: unknown key 'min_words'"):
        filter_specs({"gopher_quality": {"min_words": 3}})
    specs = {s.key: s for s in filter_specs({"gopher_quality": {"min_doc_words": 10, "enabled": False}})}
    assert specs["gopher_quality"].params == {"min_doc_words": 10} and not specs["gopher_quality"].enabled


@pytest.mark.parametrize("table, message", [
    # a string where the constructor's default is an int: every document would fail as gopher_quality_error
    ({"gopher_quality": {"min_doc_words": "50"}},
     "filter.gopher_quality.min_doc_words: expected int (the default is 50), got '50'"),
    ({"gopher_quality": {"min_doc_words": 50.5}}, "filter.gopher_quality.min_doc_words: expected int"),
    ({"c4_quality": {"filter_curly_bracket": 0}}, "filter.c4_quality.filter_curly_bracket: expected bool"),
    ({"gopher_repetition": {"top_n_grams": 2}}, "filter.gopher_repetition.top_n_grams: expected list"),
    ({"dirty_words": {"min_hits": -1}}, "filter.dirty_words.min_hits: must not be negative, got -1"),
    ({"gopher_quality": {"max_symbol_word_ratio": 1.5}},
     "filter.gopher_quality.max_symbol_word_ratio: expected a ratio between 0 and 1, got 1.5"),
    ({"fineweb_quality": {"line_punct_thr": -0.1}},
     "filter.fineweb_quality.line_punct_thr: expected a ratio between 0 and 1, got -0.1"),
])
def test_filter_arguments_are_checked_against_the_constructor_defaults(table, message):
    with pytest.raises(ConfigError) as e:
        filter_specs(table)
    assert str(e.value).startswith(message)


def test_accepted_filter_arguments():
    specs = {s.key: s for s in filter_specs({"gopher_quality": {"max_non_alpha_words_ratio": 0.6},
                                             "token_kl": {"max_kl": 4}, "c4_quality": {"filter_curly_bracket": False}})}
    assert specs["token_kl"].params == {"max_kl": 4} and specs["gopher_quality"].params == {"max_non_alpha_words_ratio": 0.6}


# ----------------------------------------------------------------- Spark == datatrove

def _corpus() -> list[Document]:
    """Real prose plus variants that trip each datatrove rule."""
    docs = []
    for i, text in enumerate(PROSE):
        docs.append(text)
        lines = text.split("\n")
        docs.append("\n".join(lines[: max(1, len(lines) // 4)]))  # shortened
        docs.append("\n\n".join([text] * 2))  # repeated paragraphs
        docs.append(text + "\n{ curly } appears here.")
        docs.append("\n".join(f"- {w}" for w in text.split()[:40]))  # bullet list
    return [Document(text=t, id=f"d{i}") for i, t in enumerate(docs)]


def test_spark_stage_matches_datatrove(spark):
    import pandas as pd

    docs = _corpus()
    chain = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()]
    expected = {}
    for d in docs:
        doc = Document(text=d.text, id=d.id)
        verdict = None
        for f in chain:
            res = f.filter(doc)
            keep, why = res if isinstance(res, tuple) else (res, None)
            if not keep:
                verdict = why
                break
        expected[d.id] = (verdict, doc.text if verdict is None else None)

    from kiln.curation.stage import run_stage

    stage = only("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")
    df = spark.createDataFrame(pd.DataFrame({"id": [d.id for d in docs], "url": None, "text": [d.text for d in docs]})
                               .astype({"url": "object"}), "id string, url string, text string").repartition(3)
    result = run_stage(spark, stage, df, out_dir=None)
    got = {r["id"]: (r["drop_reason"], r["text"] if r["drop_reason"] is None else None)
           for r in result.result.select("id", "drop_reason", "text").collect()}
    result.unpersist()
    assert got == expected
    reasons = {v[0] for v in expected.values()}
    assert len(reasons) >= 5, reasons  # the corpus exercises several distinct rules
    stats = result.stats
    assert stats.docs_in == len(docs) == stats.kept + sum(stats.dropped.values())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's mean of no words
def test_empty_giant_and_crashing_documents_are_counted():
    stage = only("gopher_repetition", "gopher_quality", gopher_quality={"max_doc_words": 2000})
    assert reason(stage, "") == "empty"
    giant = "\n\n".join(p.replace("\n", " ") for p in LONG_GOOD.split("\n")) + "\n\n" + " ".join(
        w for doc in PROSE for w in doc.split())
    assert len(giant.split()) > 2000
    assert reason(only("gopher_quality", gopher_quality={"max_doc_words": 2000}), giant) == "gopher_long_doc"
    # datatrove divides by the word count: with its minimum switched off, a blank page
    # raises ZeroDivisionError. kiln counts it instead of failing the job.
    crashing = only("gopher_quality", gopher_quality={"min_doc_words": 0})
    assert reason(crashing, "\n\n") == "gopher_quality_error"
