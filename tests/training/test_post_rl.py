"""Post-training II: rejection sampling (best-of-K, a committee, filters, pairs), the
[rounds] block, RLOO and distillation stages, on a debug model and the demo's
post-training data; bad input refused before any sampling or training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kiln.config import ConfigError
from kiln.training import recipe as recipes
from kiln.training.post.rejection import RewardScorer, Sample, choose, filter_reason
from kiln.training.train import train
from tests.training.corpus import build_corpus


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from transformers import AutoModelForSequenceClassification

    from kiln.demo.post import build_post_data
    from kiln.training.model import ModelConfig, build_model, resolve, save_hf
    from kiln.training.post.data import ChatTokenizer

    root = build_corpus(tmp_path_factory.mktemp("post_rl"), log=lambda m: None)
    tok = ChatTokenizer(str(root / "tok"))
    cfg = resolve(ModelConfig(preset="debug"), vocab_size=tok.vocab_size)
    for name, seed in (("base", 0), ("other", 1)):
        save_hf(build_model(cfg, seed=seed), str(root / name), str(root / "tok"))
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(str(root / "base"), num_labels=1)
    save_hf(rm, str(root / "rm"), str(root / "tok"))
    build_post_data(str(root / "post"))
    rows = [json.loads(x) for x in (root / "post" / "prefs.jsonl").read_text().splitlines()]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:10]))
    return root


def recipe(root: Path, out: Path, stages: str, extra: str = "", shards: bool = False) -> str:
    return f"""
[run]
output = "{out}"
tokenizer = "{root / 'tok'}"
init = "{root / 'base'}"
{f'shards = "{root / "shards"}"' if shards else ''}
seed = 0
log_every = 1

[model]
preset = "debug"

{stages}
{extra}
"""


RS = """
[[stage]]
name = "rs"
kind = "rejection_sampling"
prompts = "{root}/prompts.jsonl"
holdout = 0.2
committee = {committee}
reward = ["{root}/rm"]
samples = 3
max_new_tokens = 12
temperature = 1.0
exclude_truncated = false   # an untrained model never says <|eot_id|>
"""

DPO = """
[[stage]]
name = "dpo"
kind = "dpo"
data = "@rs/pairs.jsonl"
holdout = 0.0
epochs = 1
seq_len = 256
batch_size = 2
lr = 1e-3
checkpoint_every = 50
eval_every = 50
"""


def load(path: Path, text: str):
    path.write_text(text)
    return recipes.load(str(path))


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def rounds_run(root) -> Path:
    out = root / "rounds"
    stages = RS.format(root=root, committee="[]") + DPO
    r = load(root / "rounds.toml", recipe(root, out, stages, '[rounds]\ncount = 2\nstages = ["rs", "dpo"]'))
    train(r)
    return out


def test_best_of_k_keeps_the_argmax_and_pairs_it_with_the_worst():
    cfg = recipes.StageConfig(kind="rejection_sampling", min_length=2, forbid="spam")
    samples = [Sample("m", "fine answer", 5, False, 0.5), Sample("m", "best but truncated", 9, True, 2.0),
               Sample("m", "good answer", 4, False, 1.0), Sample("m", "spam spam", 2, False, 3.0),
               Sample("m", "x", 1, False, -1.0)]
    for s in samples:
        s.filtered = filter_reason(s, cfg)
    assert [s.filtered for s in samples] == ["", "truncated", "", "forbidden", "too_short"]
    kept, pair, why = choose(samples, cfg)
    assert kept == [2] and pair == (2, 4) and why == ""  # the best eligible; the worst of all drawn
    top = recipes.StageConfig(kind="rejection_sampling", keep="top_n", top_n=2, threshold=0.7)
    for s in samples:
        s.filtered = filter_reason(s, top)
    assert [s.filtered for s in samples] == ["below_threshold", "truncated", "", "", "below_threshold"]
    assert choose(samples, top)[0] == [3, 2]
    same = [Sample("m", "same", 3, False, 1.0), Sample("m", " same ", 3, False, 0.0)]
    assert choose(same, recipes.StageConfig())[1:] == (None, "all_equal")


def test_a_rejection_sampling_round_keeps_the_reward_argmax_of_each_prompt(root, rounds_run):
    rs = rounds_run / "01_rs_r1"
    stats = json.loads((rs / "stats.json").read_text())
    samples = rows(rs / "samples" / "00_base.jsonl")
    assert len(samples) == 8 and all(len(r["completions"]) == 3 for r in samples)  # 10 prompts, 2 held out
    assert stats["drawn"] == 24 == stats["eligible"] + sum(stats["filtered"].values())
    scorer = RewardScorer([str(root / "rm")], str(root / "tok"), torch.device("cpu"), "test")
    kept = {r["id"]: r for r in rows(rs / "sft.jsonl")}
    for row in samples:
        eligible = [c for c in row["completions"] if c["text"].strip()]  # truncated ones count here
        if not eligible:
            assert row["id"] not in kept
            continue
        scores = scorer.score([row["prompt"] + [{"role": "assistant", "content": c["text"]}]
                               for c in eligible]).mean(0)
        best = eligible[int(scores.argmax())]
        assert kept[row["id"]]["messages"][-1]["content"] == best["text"].strip() or \
            kept[row["id"]]["messages"][-1]["content"] == best["text"]
        assert kept[row["id"]]["score"] == pytest.approx(float(scores.max()), abs=1e-5)
    pairs = rows(rs / "pairs.jsonl")
    assert all(p["score_chosen"] >= p["score_rejected"] for p in pairs)
    assert stats["pairs"] == len(pairs) and stats["kept"] == len(kept)
    assert stats["samples_per_kept"] == pytest.approx(24 / len(kept))
    assert stats["reward_gain"] >= 0 and "heldout_reward" in stats


def test_the_rounds_loop_starts_each_round_from_the_previous_rounds_model(rounds_run):
    names = sorted(p.name for p in rounds_run.iterdir() if p.is_dir() and p.name[:2].isdigit())
    assert names == ["01_rs_r1", "02_dpo_r1", "03_rs_r2", "04_dpo_r2"]
    r1 = json.loads((rounds_run / "01_rs_r1" / "final" / "kiln_stage.json").read_text())
    r2 = json.loads((rounds_run / "03_rs_r2" / "final" / "kiln_stage.json").read_text())
    assert r1["policy"].endswith("base")
    assert r2["policy"] == str(rounds_run / "02_dpo_r1" / "final")
    dpo2 = json.loads((rounds_run / "04_dpo_r2" / "recipe_resolved.json").read_text())
    assert dpo2["stage"]["data"] == str(rounds_run / "03_rs_r2" / "pairs.jsonl")
    summary = json.loads((rounds_run / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in summary] == [1, 2]
    assert summary[0]["heldout_after"] == summary[1]["heldout_before"]
    assert summary[1]["heldout_after"] is not None and summary[0]["heldout_before"] != summary[1]["heldout_before"]


def test_a_committee_draws_k_from_each_member(root, tmp_path):
    out = tmp_path / "committee"
    r = load(tmp_path / "c.toml", recipe(root, out, RS.format(root=root,
                                                            committee=f'["{root}/base", "{root}/other"]')))
    train(r)
    stats = json.loads((out / "01_rs" / "stats.json").read_text())
    assert stats["drawn_per_member"] == {"00_base": 24, "01_other": 24}
    a, b = rows(out / "01_rs" / "samples" / "00_base.jsonl"), rows(out / "01_rs" / "samples" / "01_other.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [c["text"] for c in a[0]["completions"]] != [c["text"] for c in b[0]["completions"]]
    assert {r["model"] for r in rows(out / "01_rs" / "sft.jsonl")} <= {"00_base", "01_other"}


def with_other_tokenizer(model: Path, out: Path) -> Path:
    """A copy of `model` whose tokenizer.json differs in one special token."""
    shutil.copytree(model, out)
    data = json.loads((out / "tokenizer.json").read_text())
    data["added_tokens"][-1]["content"] = "<|other|>"
    (out / "tokenizer.json").write_text(json.dumps(data))
    return out


def test_a_reward_model_of_another_tokenizer_is_refused_before_sampling(root, tmp_path):
    rm = with_other_tokenizer(root / "rm", tmp_path / "rm")
    out = tmp_path / "bad"
    r = load(tmp_path / "b.toml", recipe(root, out, RS.format(root=root, committee="[]").replace(
        f"{root}/rm", str(rm))))
    with pytest.raises(ConfigError, match="another tokenizer"):
        train(r)
    assert not (out / "01_rs" / "samples" / "00_base.jsonl").exists()


def test_pairs_from_one_sample_is_refused_in_the_recipe(root, tmp_path):
    text = recipe(root, tmp_path / "o", RS.format(root=root, committee="[]").replace("samples = 3", "samples = 1"))
    with pytest.raises(ConfigError, match="at least 2 completions"):
        load(tmp_path / "k1.toml", text)


def test_rounds_blocks_must_be_consecutive_and_references_earlier(root, tmp_path):
    stages = RS.format(root=root, committee="[]") + DPO
    with pytest.raises(ConfigError, match="consecutive"):
        load(tmp_path / "a.toml", recipe(root, tmp_path / "o", stages, '[rounds]\ncount = 2\nstages = ["dpo", "rs"]'))
    with pytest.raises(ConfigError, match="later stage"):
        load(tmp_path / "b.toml", recipe(root, tmp_path / "o", DPO.replace("@rs/", "@dpo/")))


RLOO = """
[[stage]]
name = "rl"
kind = "rloo"
prompts = "{root}/prompts.jsonl"
holdout = 0.2
reward = ["{root}/rm"]
samples = 2
max_new_tokens = 8
batch_size = 2
kl_coef = 0.05
md_coef = 0.1
inner_steps = 2
tokens = 1536
seq_len = 256
lr = 1e-3
checkpoint_every = 2
eval_every = 100
"""


def test_rloo_logs_reward_kl_and_entropy_and_starts_at_zero_kl(root, tmp_path):
    out = tmp_path / "rloo"
    train(load(tmp_path / "r.toml", recipe(root, out, RLOO.format(root=root))))
    records = rows(out / "01_rl" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("train/reward", "train/kl", "train/entropy", "train/md_kl", "train/length"):
        assert all(key in r for r in records), key
    assert records[0]["train/kl"] == 0.0  # the policy is the reference before its first step
    assert records[0]["train/md_kl"] == 0.0  # and the sampling policy
    assert records[1]["train/md_kl"] > 0  # the rollout's second step: moved away from the sampler
    assert records[1]["train/reward"] == records[0]["train/reward"]  # the same rollout for inner_steps = 2
    assert records[2]["train/reward"] != records[1]["train/reward"]
    assert "val/rloo/reward" in records[-1]


DISTILL = """
[[stage]]
name = "{name}"
kind = "distill"
teacher = "{root}/base"
loss = "{loss}"
alpha = {alpha}
top_k = {top_k}
teacher_cache = {cache}
weights = {{general = 0.5, code = 0.5}}
tokens = 8192
seq_len = 64
batch_size = 8
lr = 3e-3
schedule = "cosine"
checkpoint_every = 100
eval_every = 8
"""


@pytest.fixture(scope="module")
def teacher(root) -> Path:
    """The base model pretrained a little: a teacher with something to teach."""
    out = root / "teacher"
    core = """
[[stage]]
name = "core"
weights = {general = 0.5, code = 0.5}
tokens = 16384
seq_len = 64
batch_size = 8
lr = 3e-3
checkpoint_every = 100
eval_every = 100
"""
    train(load(root / "teacher.toml", recipe(root, out, core, shards=True)))
    return out / "01_core" / "final"


def distill_recipe(root: Path, out: Path, teacher: Path, **kw) -> str:
    params = dict(name="student", loss="kl", alpha=0.9, top_k=0, cache="false") | kw
    # a fresh student ([run] init would start it from the base)
    return recipe(root, out, DISTILL.format(root=root, **params), shards=True).replace(
        f'init = "{root / "base"}"\n', "").replace(f'teacher = "{root}/base"', f'teacher = "{teacher}"')


def test_distillation_ends_closer_to_the_teacher_than_labels_alone(root, teacher, tmp_path):
    kl = {}
    for name, loss, alpha in (("kl", "kl", 0.9), ("labels", "top1_mix", 0.0)):
        out = tmp_path / name
        train(load(tmp_path / f"{name}.toml", distill_recipe(root, out, teacher, loss=loss, alpha=alpha)))
        kl[name] = rows(out / "01_student" / "metrics.jsonl")[-1]["val/distill/kl"]
    assert kl["kl"] < 0.8 * kl["labels"], kl


def test_the_teacher_cache_gives_the_resident_teachers_losses(root, teacher, tmp_path):
    losses = []
    for cache in ("false", "true"):
        out = tmp_path / cache
        train(load(tmp_path / f"{cache}.toml", distill_recipe(root, out, teacher, top_k=16, cache=cache)))
        losses.append([r["train/loss"] for r in rows(out / "01_student" / "metrics.jsonl")])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert (tmp_path / "true" / "01_student" / "teacher" / "rank0" / "index.json").exists()


def test_a_teacher_of_another_tokenizer_is_refused(root, tmp_path):
    teacher = with_other_tokenizer(root / "base", tmp_path / "teacher")
    text = distill_recipe(root, tmp_path / "o", teacher)
    with pytest.raises(ConfigError, match="another tokenizer"):
        train(load(tmp_path / "t.toml", text))


def _model_with_vocab(root: Path, out: Path, vocab: int) -> Path:
    from kiln.training.model import ModelConfig, build_model, resolve, save_hf

    save_hf(build_model(resolve(ModelConfig(preset="debug", vocab_size=vocab)), seed=3), str(out), str(root / "tok"))
    return out


def test_a_teacher_padded_to_a_larger_vocabulary_is_allowed_and_a_smaller_one_refused(root, tmp_path):
    padded = _model_with_vocab(root, tmp_path / "padded", 576)
    out = tmp_path / "ok"
    train(load(tmp_path / "ok.toml", distill_recipe(root, out, padded).replace("tokens = 8192", "tokens = 1024")))
    assert "val/distill/kl" in rows(out / "01_student" / "metrics.jsonl")[-1]
    small = _model_with_vocab(root, tmp_path / "small", 448)
    with pytest.raises(ConfigError, match="fewer than the tokenizer's 512"):
        train(load(tmp_path / "small.toml", distill_recipe(root, tmp_path / "no", small)))


def test_a_committee_member_of_another_vocabulary_is_refused_before_sampling(root, tmp_path):
    padded = _model_with_vocab(root, tmp_path / "padded", 576)
    out = tmp_path / "c"
    text = recipe(root, out, RS.format(root=root, committee=f'["{root}/base", "{padded}"]'))
    with pytest.raises(ConfigError, match="must share one vocabulary"):
        train(load(tmp_path / "c.toml", text))
    assert not (out / "01_rs" / "samples").exists() or not any((out / "01_rs" / "samples").iterdir())


def test_distillation_on_sft_rows_trains_on_the_assistant_tokens(root, teacher, tmp_path):
    out = tmp_path / "sft"
    stage = f"""
[[stage]]
name = "student"
kind = "distill"
teacher = "{teacher}"
loss = "top1_mix"
alpha = 0.9
data = "{root}/post/sft.jsonl"
holdout = 0.1
epochs = 0.25
seq_len = 256
batch_size = 8
lr = 1e-3
checkpoint_every = 100
eval_every = 100
"""
    train(load(tmp_path / "s.toml", recipe(root, out, stage)))
    records = rows(out / "01_student" / "metrics.jsonl")
    assert records[-1]["val/distill/kl"] > 0 and "val/distill/agreement" in records[-1]
    assert json.loads((out / "01_student" / "final" / "kiln_stage.json").read_text())["steps"] == len(records)


def test_rounds_with_average_last_start_from_the_average_of_the_last_rounds(root, tmp_path):
    out = tmp_path / "avg"
    stages = RS.format(root=root, committee="[]").replace("samples = 3", "samples = 2") + DPO
    r = load(tmp_path / "avg.toml", recipe(root, out, stages,
                                           '[rounds]\ncount = 3\nstages = ["rs", "dpo"]\naverage_last = 2'))
    train(r)
    r3 = json.loads((out / "05_rs_r3" / "final" / "kiln_stage.json").read_text())
    assert r3["policy"] == str(out / "rounds" / "average_r3")
    averaged = json.loads((out / "rounds" / "average_r3" / "kiln_average.json").read_text())
    assert [Path(m["path"]).parent.name for m in averaged["models"]] == ["02_dpo_r1", "04_dpo_r2"]
    r2 = json.loads((out / "03_rs_r2" / "final" / "kiln_stage.json").read_text())
    assert r2["policy"] == str(out / "02_dpo_r1" / "final")  # one round behind it: nothing to average


def test_a_killed_rloo_stage_resumes_to_the_uninterrupted_losses(root, tmp_path):
    from kiln.training.train import RunOptions

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    text = RLOO.format(root=root).replace("tokens = 1536", "tokens = 2048")
    train(load(tmp_path / "w.toml", recipe(root, whole, text)))
    resumed = load(tmp_path / "p.toml", recipe(root, parts, text))
    train(resumed, RunOptions(stop_after_steps=2))
    assert not (parts / "01_rl" / "final").exists()
    train(resumed)
    keys = ("train/loss", "train/reward", "train/kl", "train/md_kl")
    assert [[r[k] for k in keys] for r in rows(parts / "01_rl" / "metrics.jsonl")] == \
        [[r[k] for k in keys] for r in rows(whole / "01_rl" / "metrics.jsonl")]
