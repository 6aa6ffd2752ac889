"""Stage outputs are owned: a stage writes only into an absent or empty directory or an
earlier output of the same stage, never into its own input, and a bad input or output
is refused before Spark starts and before anything is touched."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

import kiln.curation.spark
from kiln.cli import main
from tests.conftest import page, write_warc


def stage_dir(root: Path, stage: str, texts: list[str]) -> Path:
    """A finished stage output as kiln writes it: docs/ (Parquet), dropped/ and stats.json."""
    (root / "docs").mkdir(parents=True)
    pl.DataFrame({"id": [f"d{i}" for i in range(len(texts))], "text": texts}).write_parquet(root / "docs" / "part-0.parquet")
    (root / "dropped").mkdir()
    (root / "dropped" / "keep.txt").write_text("dropped rows")
    (root / "stats.json").write_text(json.dumps({"stage": stage, "docs_in": len(texts), "kept": len(texts)}))
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_spark(monkeypatch):
    """Every refusal here must come before a Spark session is asked for."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("Spark was started")

    monkeypatch.setattr(kiln.curation.spark, "get_spark", refuse)


def test_output_equal_to_input_is_refused_untouched(tmp_path, capsys, no_spark):
    x = stage_dir(tmp_path / "x", "extract", ["some text", "more text"])
    before = snapshot(x)
    assert main(["curate", "langid", "--input", str(x), "--output", str(x)]) == 2
    assert f"input {x} and output {x} contain one another" in capsys.readouterr().err
    assert snapshot(x) == before


def test_output_inside_input_and_input_inside_output_are_refused(tmp_path, capsys, no_spark):
    x = stage_dir(tmp_path / "x", "extract", ["some text"])
    before = snapshot(x)
    assert main(["curate", "langid", "--input", str(x), "--output", str(x / "docs" / "sub")]) == 2
    assert "contain one another" in capsys.readouterr().err
    recipe = tmp_path / "r.toml"
    recipe.write_text('[pipeline]\nstages = ["langid"]\n')
    assert main(["curate", "pipeline", str(recipe), "--input", str(x), "--output", str(tmp_path)]) == 2
    assert f"and output {tmp_path} contain one another" in capsys.readouterr().err
    assert snapshot(x) == before


def test_another_stages_output_is_refused_untouched(tmp_path, capsys, no_spark):
    warc = write_warc(tmp_path / "a.warc.gz", [{"url": "http://a.test/", "body": page("A", ["words"]).encode()}])
    other = stage_dir(tmp_path / "langid_out", "langid", ["kept text"])
    before = snapshot(other)
    assert main(["curate", "extract", "--input", str(warc), "--output", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"{other}: holds the output of the 'langid' stage; refusing to write the extract stage there" in err
    assert snapshot(other) == before


def test_foreign_files_are_refused(tmp_path, capsys, no_spark):
    warc = write_warc(tmp_path / "a.warc.gz", [{"url": "http://a.test/", "body": page("A", ["words"]).encode()}])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert main(["curate", "extract", "--input", str(warc), "--output", str(mine)]) == 2
    assert "holds 1 entries that are not a kiln output (notes.txt)" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "my notes"


def test_missing_input_is_reported_before_spark_starts(tmp_path, capsys, no_spark):
    assert main(["curate", "extract", "--input", str(tmp_path / "nope.warc.gz"), "--output", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'nope.warc.gz'}: input path does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_and_a_rerun_of_the_same_stage_is_allowed(spark, tmp_path):
    records = [{"url": f"http://a.test/{i}", "body": page(f"Page {i}", [f"Paragraph {i} " * 30]).encode()}
               for i in range(3)]
    warc = write_warc(tmp_path / "a.warc.gz", records)
    out = stage_dir(tmp_path / "out", "langid", ["old"])
    args = ["curate", "extract", "--input", str(warc), "--output", str(out), "--master", "local[2]"]
    assert main(args) == 2  # another stage's output
    assert main([*args, "--overwrite"]) == 0
    assert (out / ".kiln-stage").read_text() == "extract\n"
    assert json.loads((out / "stats.json").read_text())["kept"] == 3
    assert not (out / "dropped").exists()  # replaced: this run dropped nothing
    assert main(args) == 0  # now the extract stage's own output
    assert json.loads((out / "stats.json").read_text())["docs_in"] == 3
