"""`kiln probe` end to end on a corpus the test builds: a base trained by a recipe, a
planted good candidate (Spanish text, the eval set's distribution, given as JSONL
documents the probe tokenizes with Spark) and a planted bad one (uniformly random
tokens, given as shards), three paired seeds; a killed probe resumes to the same
numbers; every bad input fails before any training, naming its file and reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kiln.config import ConfigError
from kiln.formats.probe import read_verdict
from kiln.probe import config as probe_config
from kiln.probe.report import decisions, format_table
from kiln.probe.run import ProbeOptions, plan, run
from tests.conftest import locale_sentences
from tests.training.corpus import CORE, build_corpus, recipe_text
from tests.training.test_data import write_shards

TOKENS = 6_400  # 13 steps of 8 x 64 per arm


def probe_text(root: Path, output: Path, seeds: int = 3, extra: str = "", base_recipe: str = "base.toml") -> str:
    return f"""
[probe]
output = "{output}"
base_recipe = "{root / base_recipe}"
base_stage = "core"
base_step = 15
shards = "{root / 'shards'}"
default = {{ general = 0.6, code = 0.3, multilingual = 0.1 }}
ratio = 0.3
tokens = {TOKENS}
seq_len = 64
batch_size = 8
seeds = {seeds}
val_fraction = 0.05
eval_batches = 4
primary = "eval:es"
{extra}

[[candidate]]
name = "good"
documents = "{root / 'good.jsonl'}"

[[candidate]]
name = "random"
shards = "{root / 'random'}"

[[eval]]
name = "es"
text = "{root / 'es_eval.jsonl'}"

[[eval]]
name = "es_mc"
choices = "{root / 'es_mc.jsonl'}"
"""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory, spark) -> Path:
    from kiln.curation.tokenizer import load_tokenizer

    root = build_corpus(tmp_path_factory.mktemp("probe"), log=lambda m: None)
    (root / "base.toml").write_text(recipe_text(root, root / "base_run", CORE))
    (root / "never.toml").write_text(recipe_text(root, root / "never_run", CORE))
    spanish = locale_sentences("es", limit=200)
    write_jsonl(root / "good.jsonl", [{"text": " ".join(spanish[i:i + 4])} for i in range(0, 160, 4)])
    held = spanish[160:]
    write_jsonl(root / "es_eval.jsonl", [{"text": " ".join(held[i:i + 4])} for i in range(0, 40, 4)])
    mc = []
    for i, sentence in enumerate(held):
        words, other = sentence.split(), held[(i + 7) % len(held)].split()
        half = len(words) // 2
        choices = [" ".join(words[half:]), " ".join(other[len(other) // 2:])]
        mc.append({"context": " ".join(words[:half]), "choices": choices[::-1] if i % 2 else choices,
                   "answer": 1 if i % 2 else 0})
    write_jsonl(root / "es_mc.jsonl", mc)
    info = load_tokenizer(str(root / "tok"), log=lambda m: None)
    rng = np.random.default_rng(0)
    noise = {f"noise-{i}": rng.integers(1, info.vocab_size, 120).tolist() for i in range(60)}
    write_shards(root / "random", {"noise": noise}, tokenizer_hash=info.hash, vocab_size=info.vocab_size)
    return root


def load(root: Path, output: Path, **kw) -> probe_config.Probe:
    path = output.parent / f"{output.name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(probe_text(root, output, **kw))
    return probe_config.load(str(path))


@pytest.fixture(scope="module")
def probed(root) -> tuple[Path, dict]:
    out = root / "runs" / "full"
    verdict = run(load(root, out), ProbeOptions(log=lambda m: None))
    return out, verdict


def test_the_planted_good_candidate_helps_and_random_tokens_rank_below_it(probed):
    out, verdict = probed
    assert read_verdict(str(out / "verdict.json"))["ranking"] == verdict["ranking"] == ["good", "random"]
    good = verdict["candidates"]["good"]["eval:es"]
    assert good["verdict"] == "helps" and good["upper"] < 0 and good["method"] == "t" and good["seeds"] == 3
    assert verdict["candidates"]["random"]["eval:es"]["delta"] > good["delta"]
    results = pl.read_csv(out / "results.csv")
    assert results.columns == ["arm", "seed", "val:code", "val:general", "val:multilingual", "eval:es",
                               "eval:es_mc:accuracy", "eval:es_mc:p_correct"]
    assert results.select("arm", "seed").rows() == [(a, s) for s in range(3) for a in ("control", "good", "random")]
    assert results["eval:es_mc:accuracy"].is_between(0, 1).all() and results["eval:es_mc:p_correct"].is_between(0, 1).all()
    # verdict.json's delta is the mean paired difference of results.csv's columns
    rows = results.to_dicts()
    diffs = [g["eval:es"] - c["eval:es"] for c, g in zip(rows[0::3], rows[1::3])]
    assert good["delta"] == pytest.approx(sum(diffs) / 3, rel=1e-12)
    assert "ranking on eval:es: good > random" in format_table(verdict)
    assert (out / "verdict.png").stat().st_size > 0
    pairs = decisions(rows, "eval:es")
    assert [(d["better"], d["worse"]) for d in pairs] == [("good", "random")]


def test_the_arms_anneal_from_the_base_checkpoints_lr_linearly_to_zero(root, probed):
    _, verdict = probed
    from kiln.formats.checkpoint import read_checkpoint_meta
    from kiln.training.recipe import StageConfig, lr_at

    meta = read_checkpoint_meta(str(root / "base_run" / "01_core" / "checkpoints" / "step-00000015"))
    expected = lr_at(StageConfig(**meta["config"]["stage"]), meta["tokens"])
    assert verdict["lr"] == expected and 0 < expected < 3e-3
    arm = Path(verdict["arms"]["good/s1"])
    records = [json.loads(line) for line in (arm / "01_anneal" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in records if "train/lr" in r]
    assert lrs[0] == pytest.approx(expected) and lrs == sorted(lrs, reverse=True)
    resolved = json.loads((arm / "01_anneal" / "recipe_resolved.json").read_text())
    assert resolved["stage"]["schedule"] == "linear" and resolved["stage"]["warmup"] == 0.0
    assert resolved["stage"]["blend"] == {"candidate:good": 1.0} and resolved["stage"]["blend_ratio"] == 0.3


def test_a_killed_probe_resumes_to_the_same_numbers_and_a_rerun_trains_nothing(root, probed):
    full, _ = probed
    out = root / "runs" / "killed"
    own = f'arms = "{root / "killed_arms"}"'
    lines: list[str] = []
    assert run(load(root, out, seeds=1, extra=own), ProbeOptions(stop_after_steps=8, log=lines.append)) is None
    assert any("stopped during arm control seed 0" in line for line in lines)
    assert not (out / "results.csv").exists()
    run(load(root, out, seeds=1, extra=own), ProbeOptions(log=lambda m: None))
    again: list[str] = []
    run(load(root, out, seeds=1, extra=own), ProbeOptions(log=again.append))
    assert sum("(finished earlier)" in line for line in again) == 3
    resumed = pl.read_csv(out / "results.csv")
    uninterrupted = pl.read_csv(full / "results.csv").filter(pl.col("seed") == 0)
    assert resumed.equals(uninterrupted)


def test_probes_beside_each_other_share_their_arms(root, probed):
    """Outputs in one directory share arms/ there: the second probe trains nothing."""
    full, _ = probed
    out = root / "runs" / "shared"
    lines: list[str] = []
    run(load(root, out), ProbeOptions(log=lines.append))
    assert sum("(finished earlier)" in line for line in lines) == 9
    assert pl.read_csv(out / "results.csv").equals(pl.read_csv(full / "results.csv"))


# --------------------------------------------------------------------------- bad input, before any training


def failing(root: Path, tmp_path: Path, match: str, edit=None, **kw) -> None:
    path = tmp_path / "p.toml"
    path.write_text(probe_text(root, tmp_path / "out", base_recipe="never.toml", **kw))
    if edit:
        edit(root, tmp_path, path)
    with pytest.raises(ConfigError, match=match):
        run(probe_config.load(str(path)), ProbeOptions(log=lambda m: None))
    assert not (root / "never_run").exists() and not (tmp_path / "arms").exists()


def replace(old: str, new: str):
    def edit(_root, _tmp, path: Path) -> None:
        path.write_text(path.read_text().replace(old, new))
    return edit


def test_a_ratio_outside_zero_and_one_fails(root, tmp_path):
    failing(root, tmp_path, r"\[probe\] ratio: 1.0 is not in \(0, 1\)", replace("ratio = 0.3", "ratio = 1.0"))


def test_a_multiple_choice_line_without_answer_names_the_file_and_line(root, tmp_path):
    def edit(root, tmp, path):
        write_jsonl(tmp / "mc.jsonl", [{"context": "a", "choices": ["b", "c"], "answer": 0},
                                       {"context": "a", "choices": ["b", "c"]}])
        path.write_text(path.read_text().replace(str(root / "es_mc.jsonl"), str(tmp / "mc.jsonl")))
    failing(root, tmp_path, r"mc.jsonl:2: multiple-choice line without 'answer'", edit)


def test_an_eval_set_of_empty_texts_fails(root, tmp_path):
    def edit(root, tmp, path):
        write_jsonl(tmp / "empty.jsonl", [{"text": ""}, {"text": "   "}])
        path.write_text(path.read_text().replace(str(root / "es_eval.jsonl"), str(tmp / "empty.jsonl")))
    failing(root, tmp_path, r"empty.jsonl: eval set 'es' has no non-empty 'text' texts \(2 line\(s\) read\)", edit)


def test_a_candidate_of_another_tokenizer_fails(root, tmp_path):
    def edit(root, tmp, path):
        write_shards(tmp / "foreign", {"x": {"x-0": [1, 2, 3]}}, tokenizer_hash="f" * 64)
        path.write_text(path.read_text().replace(str(root / "random"), str(tmp / "foreign")))
    failing(root, tmp_path, r"\[\[candidate\]\] random: .*part-00000.json: tokenized with tokenizer ffffffffffffffff",
            edit)


def test_a_candidate_too_small_for_the_arm_says_how_many_epochs_and_max_epochs_allows_it(root, tmp_path):
    def edit(root, tmp, path):
        write_shards(tmp / "small", {"x": {f"x-{i}": [5, 6, 7, 8] for i in range(100)}},
                     tokenizer_hash=_corpus_hash(root), vocab_size=_corpus_vocab(root))
        path.write_text(path.read_text().replace(str(root / "random"), str(tmp / "small")))
    failing(root, tmp_path, r"random: 465 training tokens, but an arm draws about 1,950 from it \(4.19 epochs\); "
                            r".*max_epochs = 4.2", edit)
    path = tmp_path / "p.toml"
    path.write_text(path.read_text().replace("primary = ", "max_epochs = 4.2\nprimary = "))
    planned = plan(probe_config.load(str(path)), log=lambda m: None)
    assert planned.epochs["random"] == pytest.approx(1950 / 465)


def test_a_base_without_a_tokenizer_fails(root, tmp_path):
    def edit(root, tmp, path):
        recipe = (root / "never.toml").read_text().replace(f'tokenizer = "{root / "tok"}"\n', "")
        (tmp / "notok.toml").write_text(recipe)
        path.write_text(path.read_text().replace(str(root / "never.toml"), str(tmp / "notok.toml")))
    failing(root, tmp_path, r"notok.toml: \[run\] tokenizer is not set: a probe's base needs its tokenizer", edit)


def test_an_export_without_a_tokenizer_fails(root, probed, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(root / "base_run" / "01_core" / "final", export)
    (export / "tokenizer.json").unlink()
    path = tmp_path / "p.toml"
    text = probe_text(root, tmp_path / "out").replace(f'base_recipe = "{root / "base.toml"}"', f'base = "{export}"')
    path.write_text(text.replace('base_stage = "core"\nbase_step = 15\n', ""))
    with pytest.raises(ConfigError, match=r"base .*export: no tokenizer.json; a base needs its tokenizer"):
        run(probe_config.load(str(path)), ProbeOptions(log=lambda m: None))


def _corpus_hash(root: Path) -> str:
    from kiln.formats.hashing import content_sha256

    return content_sha256(str(root / "tok" / "tokenizer.json"))


def _corpus_vocab(root: Path) -> int:
    from kiln.curation.tokenizer import load_tokenizer

    return load_tokenizer(str(root / "tok"), log=lambda m: None).vocab_size


def test_kiln_probe_report_reprints_the_verdict_and_estimates_decisions(probed, capsys):
    from kiln.cli import main

    out, verdict = probed
    assert main(["probe", "report", str(out), "--decisions", "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert format_table(verdict) in printed
    assert "decision accuracy on eval:es" in printed and "good > random: bootstrap " in printed


def test_options_override_the_file_and_a_base_option_replaces_its_base_recipe(root, tmp_path, capsys):
    from kiln.cli import main
    from kiln.probe.cli import add_run_arguments, probe_for

    path = tmp_path / "p.toml"
    path.write_text(probe_text(root, tmp_path / "out"))
    import argparse

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    probe = probe_for(parser.parse_args([str(path), "--base", str(tmp_path / "final"), "--seeds", "5",
                                         "--set", "probe.default={general=0.5,code=0.5}"]))
    p = probe.probe
    assert (p.base, p.base_recipe, p.base_step, p.seeds) == (str(tmp_path / "final"), "", 0, 5)
    assert probe.default_mixture().active() == {"code": 0.5, "general": 0.5}
    assert main(["probe", "run", str(path), "--ratio", "1.5"]) == 2
    assert "[probe] ratio: 1.5 is not in (0, 1)" in capsys.readouterr().err
