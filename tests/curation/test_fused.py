"""Fused stages: one Spark pass for consecutive per-document stages, with the same
outputs and per-stage accounting as one pass per stage; a killed Python worker's task
retried with identical results; a relaunch after a crash inside a group redoes only it."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from kiln.cli import main
from kiln.config import ConfigError
from tests.conftest import docstrings, read_dropped
from tests.curation.test_pipeline import warc  # noqa: F401 (the module's WARC fixture)

STAGES = '["extract", "langid", "filter", "dedup_exact", "decontam"]'


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory) -> Path:
    """An eval set quoting every English page of the WARC: decontam flags them."""
    path = tmp_path_factory.mktemp("evals") / "quotes.jsonl"
    prose = docstrings("argparse") + docstrings("textwrap") + docstrings("difflib")
    rows = [{"prompt": doc.split("\n\n")[0]} for doc in prose[:16]] + [{"prompt": "too short"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(path: Path, warc: Path, out: Path, eval_set: Path, extra: str = "") -> Path:
    path.write_text(f"""
[pipeline]
input = ["{warc}"]
output = "{out}"
stages = {STAGES}
write_dropped = true
{extra}

[langid]
keep_languages = ["en", "de"]

[filter]
disable = ["token_kl"]   # its reference pass needs the whole input: it would start a group of its own

[decontam]
eval_sets = ["{eval_set}"]
ngram = 8
mode = "flag"
""")
    return path


def outputs(out: Path) -> dict:
    """Per stage: stats.json without timings and the fused marker, dropped ids by reason;
    the kept ids of every stage that wrote docs/."""
    result = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        stats = json.loads((d / "stats.json").read_text())
        for key in ("seconds", "fused", "task_seconds", "input_seconds", "task_cpu_seconds", "input_cpu_seconds",
                    "setup_seconds", "setup_cpu_seconds"):
            stats["extra"].pop(key, None)
        dropped = read_dropped(d) if stats["dropped"] else None
        result[d.name] = {
            "stats": stats,
            "dropped": sorted(dropped.select("id", "drop_reason").rows()) if dropped is not None else [],
            "docs": sorted(pl.read_parquet(str(d / "docs" / "*.parquet"))["id"].to_list())
            if (d / "docs").exists() else None}
    return result


@pytest.fixture(scope="module")
def unfused(spark, warc, eval_set, tmp_path_factory) -> dict:  # noqa: F811
    tmp = tmp_path_factory.mktemp("unfused")
    assert main(["curate", "pipeline", str(recipe(tmp / "r.toml", warc, tmp / "out", eval_set)), "--no-fuse"]) == 0
    return outputs(tmp / "out")


def test_fused_runs_give_the_unfused_outputs_and_stats(spark, warc, eval_set, unfused, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert main(["curate", "pipeline", str(recipe(tmp_path / "r.toml", warc, out, eval_set))]) == 0
    log = capsys.readouterr().err
    assert "[fused] extract -> langid -> filter: one pass" in log
    fused = outputs(out)
    assert list(fused) == list(unfused) == ["01_extract", "02_langid", "03_filter", "04_dedup_exact", "05_decontam"]
    for name in fused:
        assert fused[name]["stats"] == unfused[name]["stats"], name
        assert fused[name]["dropped"] == unfused[name]["dropped"], name
    # Only a group's last stage writes docs/ (dedup_exact and decontam each run alone here)
    assert [fused[n]["docs"] is None for n in fused] == [True, True, False, False, False]
    for name in ("03_filter", "04_dedup_exact", "05_decontam"):
        assert fused[name]["docs"] == unfused[name]["docs"]
    decontam = unfused["05_decontam"]["stats"]  # its metric, computed by Spark there and in Python when fused
    assert decontam["extra"]["metrics"]["contaminated_quotes"] > 0
    stats = json.loads((out / "02_langid" / "stats.json").read_text())
    assert stats["extra"]["fused"] == ["extract", "langid", "filter"]
    assert {"task_cpu_seconds", "setup_cpu_seconds", "setup_seconds"} <= set(stats["extra"])


def test_stage_open_loads_the_model_before_the_first_batch_and_is_timed_apart(tmp_path):
    """A fused group calls each stage's `open` before any batch (langid: its fastText
    model, through load_once) and books that time as the stage's set-up, not its task."""
    import pyarrow as pa

    from kiln.curation import spark as kiln_spark
    from kiln.curation.fused import FusedGroup, _Counts
    from kiln.curation.langid import LangIdStage

    stage = LangIdStage()
    kiln_spark._LOADED.clear()
    group = FusedGroup([stage], pa.schema([("id", pa.string()), ("text", pa.string())]), str(tmp_path))
    counts = [_Counts()]
    group._open(counts)
    assert [key[1] for key in kiln_spark._LOADED] == [stage._shipped_name]
    assert counts[0].setup.cpu > 0 and counts[0].time.cpu == 0
    loaded = dict(kiln_spark._LOADED)
    group._open(counts)  # a later task of the same worker finds it loaded
    assert kiln_spark._LOADED == loaded


def test_a_killed_worker_is_retried_with_identical_results(spark, warc, eval_set, unfused, tmp_path,  # noqa: F811
                                                           monkeypatch, capsys):
    monkeypatch.setenv("KILN_FAULT_KILL", "langid:0")
    out = tmp_path / "out"
    assert main(["curate", "pipeline", str(recipe(tmp_path / "r.toml", warc, out, eval_set))]) == 0
    fused = outputs(out)
    for name in fused:
        assert fused[name]["stats"] == unfused[name]["stats"], name
        assert fused[name]["dropped"] == unfused[name]["dropped"], name
    assert fused["03_filter"]["docs"] == unfused["03_filter"]["docs"]


def test_a_killed_worker_in_an_unfused_stage_is_retried_too(spark, warc, eval_set, unfused, tmp_path,  # noqa: F811
                                                            monkeypatch):
    monkeypatch.setenv("KILN_FAULT_KILL", "decontam:0")
    out = tmp_path / "out"
    assert main(["curate", "pipeline", str(recipe(tmp_path / "r.toml", warc, out, eval_set)), "--no-fuse"]) == 0
    fused = outputs(out)
    assert fused["05_decontam"] == unfused["05_decontam"]


def test_a_relaunch_after_a_crash_in_a_group_redoes_only_that_group(spark, warc, eval_set, tmp_path,  # noqa: F811
                                                                    capsys):
    out = tmp_path / "out"
    path = recipe(tmp_path / "r.toml", warc, out, eval_set)
    assert main(["curate", "pipeline", str(path)]) == 0
    first = outputs(out)
    # A crash inside the first group, before its stats.json files were all written
    (out / "01_extract" / "stats.json").unlink()
    capsys.readouterr()
    assert main(["curate", "pipeline", str(path)]) == 0
    log = capsys.readouterr().err
    assert "[fused] extract -> langid -> filter: one pass" in log
    assert "reusing" not in log  # after a recomputed group, everything is recomputed
    assert outputs(out) == first
    # A crash in the stage after the group: the group is reused whole
    (out / "04_dedup_exact" / "stats.json").unlink()
    assert main(["curate", "pipeline", str(path)]) == 0
    log = capsys.readouterr().err
    assert "[extract] reusing" in log and "[langid] reusing" in log and "[filter] reusing" in log
    assert "[dedup_exact] reusing" not in log and "[fused]" not in log
    assert outputs(out) == first


def test_fusing_across_a_corpus_wide_stage_is_refused(spark, warc, eval_set, tmp_path):  # noqa: F811
    path = recipe(tmp_path / "r.toml", warc, tmp_path / "out", eval_set,
                  'fuse_groups = [["filter", "dedup_exact", "decontam"]]')
    with pytest.raises(ConfigError, match="'dedup_exact' cannot be fused: it needs the whole corpus"):
        from kiln.curation.pipeline import load_recipe, plan

        plan(load_recipe(str(path)))
