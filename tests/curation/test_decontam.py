"""Decontamination: 13-gram matches against two evaluation sets, planted in real text.

The evaluation items are cut from standard-library docstrings: a 20-word question, a
13-word answer (the next 13 words of the same docstring) and short choices, so each
long item indexes exactly 8 + 1 distinct 13-grams. The documents are other modules'
docstrings and gettext catalogues with item words planted in them.
"""

from __future__ import annotations

import gzip
import json
import re

import pyarrow.parquet as pq
import pytest

from kiln.config import ConfigError
from kiln.curation.decontam import DecontamConfig, DecontamStage, ngram_words
from kiln.curation.stage import run_stage
from kiln.formats.stats import StageStats
from tests.conftest import docstrings, locale_sentences


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def items_from(module: str, n_long: int, short: list[str]) -> list[dict]:
    """Long items from the module's docstrings, then one short item per `short` question."""
    long_docs = [w for w in map(words, docstrings(module)) if len(w) >= 45][:n_long]
    items = [{"question": " ".join(w[:20]) + "?", "answer": " ".join(w[20:33]) + ".",
              "choices": [" ".join(w[33 + 3 * k:36 + 3 * k]) for k in range(4)], "id": i}
             for i, w in enumerate(long_docs)]
    items += [{"question": q, "answer": "yes", "choices": ["yes", "no"], "id": len(items) + k}
              for k, q in enumerate(short)]
    return items


TRIVIA = items_from("shutil", 4, ["What does copyfileobj copy?", "Which function removes a tree?"])
READING = items_from("textwrap", 3, ["Is dedent idempotent?"])


def q(item: dict) -> list[str]:
    return words(item["question"])


def a(item: dict) -> list[str]:
    return words(item["answer"])


@pytest.fixture
def eval_files(tmp_path):
    trivia = tmp_path / "trivia.jsonl"
    # A blank line is not an item.
    trivia.write_text("\n".join(json.dumps(i) for i in TRIVIA[:3]) + "\n\n"
                      + "\n".join(json.dumps(i) for i in TRIVIA[3:]) + "\n")
    reading = tmp_path / "reading-comp.jsonl.gz"
    reading.write_bytes(gzip.compress("".join(json.dumps(i) + "\n" for i in READING).encode()))
    return [str(trivia), str(reading)]


DE, FR = locale_sentences("de", limit=12), locale_sentences("fr", limit=12)


def documents() -> dict[str, str | None]:
    return {
        # One 13-word window of a question, shouted and re-punctuated, between German sentences.
        "shouted": f"{DE[0]}. {'; '.join(w.upper() for w in q(TRIVIA[2])[3:16])}!! {DE[1]}",
        "only-12": f"{DE[2]} {' '.join(q(TRIVIA[2])[3:15])} {FR[0]}",
        "both-sets": f"{DE[3]} {' '.join(a(TRIVIA[1]))} {FR[1]} ({' '.join(q(READING[0])[5:18])}) {FR[2]}",
        # The last 7 words of a question run on into the first 6 of its answer: the docstring
        # reads that way, the benchmark item does not.
        "across-fields": f"{DE[4]} {' '.join(q(TRIVIA[3])[13:] + a(TRIVIA[3])[:6])} {FR[3]}",
        "whole-question": f"{FR[4]}\n{TRIVIA[0]['question']}\n{DE[5]}",
        "same-window-twice": f"{DE[6]} {' '.join(q(TRIVIA[3])[0:13])}. {FR[5]} {' '.join(q(TRIVIA[3])[0:13])}.",
        "answer-only": f"{FR[6]} {READING[1]['answer'].title()} {DE[7]}",
        "argparse-0": docstrings("argparse")[0],
        "argparse-1": docstrings("argparse")[7],
        "german": " ".join(DE[8:12]),
        "french": " ".join(FR[7:12]),
        "empty": None,
    }


MATCHED = {
    "shouted": ["trivia"],
    "both-sets": ["trivia", "reading-comp"],
    "whole-question": ["trivia"],
    "same-window-twice": ["trivia"],
    "answer-only": ["reading-comp"],
}


def frame(spark, docs: dict):
    return spark.createDataFrame(list(docs.items()), "id string, text string").repartition(3)


def expected_sets(trivia_docs: int, reading_docs: int) -> dict:
    return {"trivia": {"items": 6, "ngrams": 4 * 9, "short_items": 2, "documents": trivia_docs},
            "reading-comp": {"items": 4, "ngrams": 3 * 9, "short_items": 1, "documents": reading_docs}}


def test_normalize_ignores_case_punctuation_and_spacing():
    assert ngram_words("Don't\tSTOP—now!\n(Straße, 2 ×3)") == ["don", "t", "stop", "now", "straße", "2", "3"]


def test_drop_mode(spark, eval_files):
    docs = documents()
    stage = DecontamStage(DecontamConfig(eval_sets=eval_files))
    result = run_stage(spark, stage, frame(spark, docs), None, log=lambda m: None)
    rows = {r["id"]: (r["contaminated_by"], r["drop_reason"]) for r in result.result.collect()}
    kept_ids = {r["id"] for r in result.kept.collect()}
    result.unpersist()
    assert rows == {id_: (MATCHED.get(id_, []), "eval_contamination" if id_ in MATCHED else None) for id_ in docs}
    assert kept_ids == set(docs) - set(MATCHED)
    stats = result.stats
    assert stats.dropped == {"eval_contamination": 5}
    assert stats.docs_in == len(docs) == stats.kept + stats.dropped_total
    assert stats.extra["metrics"] == {"contaminated_trivia": 4, "contaminated_reading-comp": 2}
    assert stats.extra["eval_sets"] == expected_sets(4, 2)


def test_flag_mode_keeps_everything_and_reports_in_stats_json(spark, eval_files, tmp_path):
    docs = documents()
    stage = DecontamStage(DecontamConfig(eval_sets=eval_files, mode="flag"))
    out = tmp_path / "decontam"
    result = run_stage(spark, stage, frame(spark, docs), str(out), write_dropped=True, log=lambda m: None)
    written = pq.read_table(str(out / "docs")).to_pylist()
    assert {r["id"]: r["contaminated_by"] for r in written} == {id_: MATCHED.get(id_, []) for id_ in docs}
    assert not (out / "dropped").exists()
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["docs_in"] == on_disk["kept"] == len(docs) and on_disk["dropped"] == {}
    assert on_disk["extra"]["eval_sets"] == result.stats.extra["eval_sets"] == expected_sets(4, 2)


def test_min_matches_counts_distinct_ngrams(eval_files):
    stage = DecontamStage(DecontamConfig(eval_sets=eval_files, min_matches=2))
    docs = documents()
    got = dict(zip(docs, stage.contaminated_by(list(docs.values()))))
    # Only the whole 20-word question shares 2+ distinct 13-grams; a window seen twice counts once.
    assert {k: v for k, v in got.items() if v} == {"whole-question": ["trivia"]}


def test_twelve_shared_words_match_only_with_12_word_ngrams(eval_files):
    stage = DecontamStage(DecontamConfig(eval_sets=eval_files, ngram=12))
    docs = documents()
    got = dict(zip(docs, stage.contaminated_by(list(docs.values()))))
    # The control for "only-12" above; "across-fields" still spans two fields at any length.
    assert {k: v for k, v in got.items() if v} == {**MATCHED, "only-12": ["trivia"]}


def test_fields_limit_what_is_indexed(eval_files):
    stage = DecontamStage(DecontamConfig(eval_sets=eval_files, fields=["question"]))
    docs = documents()
    got = dict(zip(docs, stage.contaminated_by(list(docs.values()))))
    # The answers are no longer evaluation text: matches through them go.
    assert {k: v for k, v in got.items() if v} == {"shouted": ["trivia"], "both-sets": ["reading-comp"],
                                                   "whole-question": ["trivia"], "same-window-twice": ["trivia"]}
    stats = StageStats(stage="decontam")
    stage.finish(stats)
    assert stats.extra["eval_sets"]["trivia"] == {"items": 6, "ngrams": 4 * 8, "short_items": 2, "documents": 0}


def test_a_set_with_no_long_item_fails(tmp_path):
    short = tmp_path / "tiny.jsonl"
    short.write_text("".join(json.dumps({"question": f"question number {i} is short", "answer": "no"}) + "\n"
                             for i in range(12)))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(short))}: all 12 items are shorter than 13 words, "
                                          "so none can be matched; lower ngram$"):
        DecontamStage(DecontamConfig(eval_sets=[str(short)])).build_index()
    # With 4-word n-grams every item indexes two.
    stage = DecontamStage(DecontamConfig(eval_sets=[str(short)], ngram=4))
    stage.build_index()
    assert (stage.sets[0].items, stage.sets[0].short_items, stage.sets[0].ngrams) == (12, 0, 12 + 12)


def test_malformed_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TRIVIA[0]) + "\n\n" + '{"question": "unterminated\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}:3: not JSON"):
        DecontamStage(DecontamConfig(eval_sets=[str(bad)])).build_index()
    bad.write_text(json.dumps(TRIVIA[0]) + "\n" + json.dumps(["a", "list"]) + "\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}:2: not a JSON object$"):
        DecontamStage(DecontamConfig(eval_sets=[str(bad)])).build_index()


def test_bad_configs_fail_before_any_work(tmp_path, eval_files):
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'gone.jsonl'))}: input path does not exist$"):
        DecontamStage(DecontamConfig(eval_sets=[str(tmp_path / "gone.jsonl")]))
    (tmp_path / "other").mkdir()
    copy = tmp_path / "other" / "trivia.jsonl.zst"
    copy.write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(copy))}: evaluation set name 'trivia' is also used by "
                                          rf"{re.escape(eval_files[0])}; rename one$"):
        DecontamStage(DecontamConfig(eval_sets=[eval_files[0], str(tmp_path / "other" / "*.zst")]))
    with pytest.raises(ConfigError, match=r"^decontam.mode: expected one of drop, flag, got 'remove'$"):
        DecontamStage(DecontamConfig(eval_sets=eval_files, mode="remove"))
    with pytest.raises(ConfigError, match=r"trivia.jsonl: no item has any of the fields prompt \(decontam.fields\)"):
        DecontamStage(DecontamConfig(eval_sets=eval_files, fields=["prompt"])).build_index()


def test_fingerprint_follows_eval_contents(eval_files):
    before = DecontamStage(DecontamConfig(eval_sets=eval_files)).fingerprint()
    assert DecontamStage(DecontamConfig(eval_sets=eval_files)).fingerprint() == before
    with open(eval_files[0], "a") as f:
        f.write(json.dumps({"question": "one more item appended to the benchmark"}) + "\n")
    assert DecontamStage(DecontamConfig(eval_sets=eval_files)).fingerprint() != before
