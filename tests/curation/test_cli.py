"""`kiln curate`: options derived from the config dataclasses, --set, and the one stage registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.cli import build_parser, main
from kiln.config import ConfigError, field_help
from kiln.curation.cli import recipe_for
from kiln.curation.langid import LangIdConfig
from kiln.curation.registry import STAGES

JOBS = Path(__file__).resolve().parents[2] / "kiln" / "curation" / "jobs"


def parse(*argv: str):
    argv = ["curate", *argv]
    return build_parser(argv).parse_args(argv)


def test_stage_options_reach_the_recipe(tmp_path):
    args = parse("langid", "--input", "in", "--output", "out", "--keep-languages", "en", "de",
                 "--min-score", "0.5", "--write-dropped")
    recipe = recipe_for(args)
    assert recipe.stages["langid"] == LangIdConfig(keep_languages=["en", "de"], min_score=0.5)
    assert (recipe.pipeline.input, recipe.pipeline.output, recipe.pipeline.stages) == (["in"], "out", ["langid"])
    assert recipe.pipeline.write_dropped is True and recipe.pipeline.resume is False


def test_bools_dicts_and_read_options(tmp_path):
    recipe = recipe_for(parse("dedup-exact", "--input", "in", "--output", "out", "--no-lowercase"))
    assert recipe.stages["dedup_exact"].lowercase is False and recipe.stages["dedup_exact"].collapse_whitespace
    recipe = recipe_for(parse("domain", "--input", "in", "--output", "out", "--topic-rates", "sports=0.3", "news=1"))
    assert recipe.stages["domain"].topic_rates == {"sports": 0.3, "news": 1.0}
    # extract reads raw pages: it takes the [read] section's options too
    recipe = recipe_for(parse("extract", "--input", "in", "--output", "out", "--html-column", "page",
                              "--max-html-bytes", "1000", "--timeout-s", "2"))
    assert (recipe.read.html_column, recipe.read.max_html_bytes, recipe.stages["extract"].timeout_s) == ("page", 1000, 2.0)
    recipe = recipe_for(parse("filter", "--input", "in", "--output", "out", "--disable", "token_kl", "dirty_words"))
    enabled = {s.key: s.enabled for s in recipe.stages["filter"].specs()}
    assert enabled["token_kl"] is False and enabled["dirty_words"] is False and enabled["gopher_quality"] is True


def test_precedence_recipe_then_set_then_options(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text('[langid]\nmin_score = 0.2\nmax_chars = 500\n[filter.gopher_quality]\nmin_doc_words = 10\n')
    recipe = recipe_for(parse("langid", "--input", "in", "--output", "out", "--recipe", str(r),
                              "--set", "langid.min_score=0.3", "--set", "langid.keep_languages=['fr']",
                              "--set", "filter.gopher_quality.min_doc_words=40", "--min-score", "0.4"))
    assert recipe.stages["langid"] == LangIdConfig(keep_languages=["fr"], min_score=0.4, max_chars=500)
    params = {s.key: s.params for s in recipe.stages["filter"].specs()}
    assert params["gopher_quality"] == {"min_doc_words": 40}
    # --set values are TOML, else strings; a bare path needs no quotes
    recipe = recipe_for(parse("pipeline", str(r), "--set", "tokenize.tokenizer=models/tok"))
    assert recipe.stages["tokenize"].tokenizer == "models/tok"


def test_set_is_checked_like_a_recipe(tmp_path, capsys):
    assert main(["curate", "langid", "--input", "in", "--output", "out", "--set", "langid.min_scor=0.3"]) == 2
    assert "options: [langid]: unknown key 'min_scor'" in capsys.readouterr().err
    assert main(["curate", "langid", "--input", "in", "--output", "out", "--set", "langid.min_score='high'"]) == 2
    assert "options: [langid].min_score: expected float, got 'high'" in capsys.readouterr().err
    # a negative value where the default is not negative: every page would time out
    assert main(["curate", "extract", "--input", "in", "--output", "out", "--timeout-s", "-1"]) == 2
    assert "options: [extract].timeout_s: must not be negative, got -1.0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        recipe_for(parse("langid", "--input", "in", "--output", "out", "--set", "min_score=0.3"))
    with pytest.raises(ConfigError, match=r"options: \[filter\]: disable: unknown filter 'gopher' "):
        recipe_for(parse("filter", "--input", "in", "--output", "out", "--disable", "gopher"))


def test_help_is_the_field_comment_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["curate", "langid", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    comment = field_help(LangIdConfig)["min_score"]
    assert comment == "documents whose top language scores lower are dropped as lang_low_score"
    assert f"--min-score MIN_SCORE {comment} (default: 0.0)" in text


def test_every_registered_stage_has_a_command_a_job_and_a_summary(capsys):
    assert list(STAGES)[0] == "extract" and list(STAGES)[-1] == "tokenize"
    for name, (config, stage) in STAGES.items():
        assert stage.name == name
        assert stage.__doc__ and stage.__doc__.strip(), name
        job = JOBS / ("tokenize_shards.py" if name == "tokenize" else f"{name}.py")
        assert f'"curate", "{name.replace("_", "-")}"' in job.read_text(), job
        with pytest.raises(SystemExit) as e:
            main(["curate", name.replace("_", "-"), "--help"])
        assert e.value.code == 0
        assert f"[{name}] options" in capsys.readouterr().out
