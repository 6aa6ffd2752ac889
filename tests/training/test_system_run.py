"""One published pipeline run tiny in the suite (make recipes-tiny runs all five on the
demo's data): `kiln recipe run` of the system's mix, training and post-training parts,
its recipe files unchanged, in a directory laid out as the tiny overlays expect, with
this suite's own token shards, tokenizer and post-training data in the demo's places."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kiln.cli import main
from kiln.training import recipe as recipes
from tests.conftest import docstrings
from tests.training.corpus import build_corpus
from tests.training.test_data import write_shards

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = "qwen2"  # SFT, offline DPO and a round of online DPO after three pretraining stages


def shards_dir(system: Path) -> str:
    """Where the system's tiny pretraining reads its shards (its curation's tokenize output)."""
    return recipes.load(str(system / "pretrain.toml"), "tiny").run.shards


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from kiln.curation.tokenizer import load_tokenizer
    from kiln.demo.post import build_post_data

    work = tmp_path_factory.mktemp("system")
    corpus = build_corpus(work / "corpus", log=lambda m: None)
    system = work / "recipes" / SYSTEM
    shutil.copytree(ROOT / "recipes" / SYSTEM, system)
    # the demo's four domains: this corpus's three and a math domain of its own
    info = load_tokenizer(str(corpus / "tok"), log=lambda m: None)
    texts = {"math": docstrings("statistics") + docstrings("fractions") + docstrings("decimal")}
    shards = work / shards_dir(system)
    shutil.copytree(corpus / "shards", shards)
    docs = {d: {f"{d}-{i}": info.tokenizer.encode(t, add_special_tokens=False).ids for i, t in enumerate(ts)}
            for d, ts in texts.items()}
    write_shards(shards, docs, parts=1, tokenizer_hash=info.hash, vocab_size=info.vocab_size)
    (work / "out/demo/models").mkdir(parents=True)
    shutil.copytree(corpus / "tok", work / "out/demo/models/tokenizer")
    build_post_data(str(work / "data/post"))
    return work


def test_a_system_runs_tiny_end_to_end_and_resumes(workdir, monkeypatch, capfd):
    monkeypatch.chdir(workdir)
    system = f"recipes/{SYSTEM}"
    assert main(["recipe", "run", system, "--scale", "tiny", "--parts", "mix", "pretrain", "post"]) == 0
    out = capfd.readouterr().out
    for part in ("pretrain", "post"):
        recipe = recipes.load(f"{system}/{part}.toml", "tiny")
        finished = sorted(p.parent.parent.name for p in Path(recipe.run.output).glob("*/final/kiln_stage.json"))
        assert finished == [f"{i + 1:02d}_{s.name}" for i, s in enumerate(recipe.stages)], part
    # the exported policy is the family's own transformers class
    from transformers import AutoConfig

    post = recipes.load(f"{system}/post.toml", "tiny")
    last = sorted(Path(post.run.output).glob("*/final/config.json"))[-1]
    assert AutoConfig.from_pretrained(last.parent).model_type == "qwen2"
    assert f"| {SYSTEM} | post |" in out and "dpo/accuracy" in out
    # a relaunch reuses every finished stage
    assert main(["recipe", "run", system, "--scale", "tiny", "--parts", "pretrain", "post"]) == 0
    again = capfd.readouterr()
    assert "finished earlier" in again.out + again.err
