"""Post-training stages of `kiln train`: the chat format and its masks token by token,
packed SFT against unpacked, format-token masking, the DPO reference cache, a reward
model that learns a planted preference, kill-and-resume of a DPO stage, the exports'
loaders, and bad input counted or refused with the file named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.config import ConfigError
from kiln.training import recipe as recipes
from kiln.training.post.data import IGNORE, ChatTokenizer, SFTSampler, read_pairs, read_sft
from kiln.training.train import RunOptions, train
from tests.training.corpus import build_corpus

MESSAGES = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "What does bisect do?\n"},
            {"role": "assistant", "content": "It keeps a list sorted."}, {"role": "user", "content": "And heapq?"},
            {"role": "assistant", "content": "A binary heap."}]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from kiln.demo.post import build_post_data
    from kiln.training.model import ModelConfig, build_model, resolve, save_hf

    root = build_corpus(tmp_path_factory.mktemp("post"), log=lambda m: None)
    tok = ChatTokenizer(str(root / "tok"))
    hf = build_model(resolve(ModelConfig(preset="debug"), vocab_size=tok.vocab_size), seed=0)
    save_hf(hf, str(root / "base"), str(root / "tok"))
    build_post_data(str(root / "post"))
    return root


def post_recipe(root: Path, out: Path, stages: str) -> str:
    return f"""
[run]
output = "{out}"
tokenizer = "{root / 'tok'}"
init = "{root / 'base'}"
seed = 0
log_every = 5

[model]
preset = "debug"

{stages}
"""


STAGES = """
[[stage]]
name = "sft"
kind = "sft"
data = "{post}/sft.jsonl"
epochs = 1
seq_len = 256
batch_size = 16
lr = 2e-3
checkpoint_every = 50
eval_every = 50

[[stage]]
name = "reward"
kind = "reward"
from = "sft"
data = "{post}/prefs.jsonl"
val_data = "{post}/prefs_eval.jsonl"
epochs = 3
seq_len = 256
batch_size = 16
lr = 2e-3
checkpoint_every = 100
eval_every = 100

[[stage]]
name = "dpo"
kind = "dpo"
from = "sft"
data = "{post}/prefs.jsonl"
holdout = 0.2
epochs = 1
seq_len = 256
batch_size = 16
beta = 0.1
nll_weight = 0.2
mask_format_tokens = true
lr = 1e-3
checkpoint_every = 6
eval_every = 100
"""


@pytest.fixture(scope="module")
def trained(root) -> tuple[Path, list[dict]]:
    out = root / "run"
    path = root / "post.toml"
    path.write_text(post_recipe(root, out, STAGES.format(post=root / "post")))
    summaries = train(recipes.load(str(path)))
    return out, summaries


def test_the_template_renders_what_the_trainer_tokenizes_and_masks_exactly_the_assistant_tokens(root):
    from transformers import AutoTokenizer

    tok = ChatTokenizer(str(root / "tok"))
    hf_tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    out = hf_tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, trained, fmt = tok.encode(MESSAGES)
    assert ids == out["input_ids"]
    assert trained == [bool(m) for m in out["assistant_masks"]]
    pieces = [hf_tok.decode([i]) for i, t in zip(ids, trained) if t]
    assert "".join(pieces) == "It keeps a list sorted.<|eot_id|>A binary heap.<|eot_id|>"
    headers = "".join(hf_tok.decode([i]) for i, f in zip(ids, fmt) if f)
    assert headers.count("<|start_header_id|>") == 5 and headers.count("<|eot_id|>") == 5
    assert "Be brief" not in headers and "heap" not in headers


def test_packed_sft_gives_the_unpacked_loss(root):
    from kiln.training.model import CausalLM

    tok = ChatTokenizer(str(root / "tok"))
    examples, _ = read_sft(str(root / "post" / "sft.jsonl"), tok, 256)
    examples = examples[:40]
    model = CausalLM(__import__("transformers").AutoModelForCausalLM.from_pretrained(str(root / "base")))
    totals = []
    for packing in (True, False):
        sampler = SFTSampler(examples, 256, 0, tok.pad_id, packing)
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, sampler.n, 8):
                b = sampler.batch_of(list(range(start, min(start + 8, sampler.n))))
                n = int((b.labels != IGNORE).sum())
                total += float(model(b.input_ids, b.labels, b.position_ids, b.segment_ids)) * n
                count += n
        totals.append((total, count))
    assert totals[0][1] == totals[1][1]
    assert totals[0][0] == pytest.approx(totals[1][0], rel=1e-5)
    assert SFTSampler(examples, 256, 0, tok.pad_id, True).n < len(examples)


def test_format_token_masking_removes_exactly_the_header_and_eot_positions(root):
    tok = ChatTokenizer(str(root / "tok"))
    path = str(root / "post" / "prefs.jsonl")
    plain, _ = read_pairs(path, tok, 256, mask_format_tokens=False)
    masked, _ = read_pairs(path, tok, 256, mask_format_tokens=True)
    for a, b in zip(plain[:20], masked[:20]):
        removed = [a.chosen.labels[i] for i in range(len(a.chosen.labels))
                   if a.chosen.labels[i] != IGNORE and b.chosen.labels[i] == IGNORE]
        text = tok.tok.decode(removed, skip_special_tokens=False)
        assert text == "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>"  # the reply's header and eot
        assert all(x == y for x, y in zip(a.chosen.labels, b.chosen.labels) if y != IGNORE)


def test_sft_reward_dpo_end_to_end_and_the_exports_load(trained):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out, summaries = trained
    assert [s["stage"] for s in summaries] == ["sft", "reward", "dpo"]
    reward = summaries[1]
    records = [json.loads(x) for x in (out / "02_reward" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["val/reward/accuracy"] for r in records if "val/reward/accuracy" in r][-1]
    assert accuracy >= 0.75, accuracy  # the planted preference (fluent answer vs salad, spam, fragment)
    dpo = [json.loads(x) for x in (out / "03_dpo" / "metrics.jsonl").read_text().splitlines()]
    assert "val/dpo/accuracy" in dpo[-1] and "train/accuracy" in dpo[-1]
    assert AutoModelForCausalLM.from_pretrained(str(out / "03_dpo" / "final")).config.vocab_size == 512
    rm = AutoModelForSequenceClassification.from_pretrained(str(out / "02_reward" / "final"))
    assert rm.config.num_labels == 1 and rm.score.weight.shape[0] == 1
    text = AutoTokenizer.from_pretrained(str(out / "01_sft" / "final")).apply_chat_template(MESSAGES[:2], tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert reward["final"].endswith("02_reward/final")
    report = json.loads((out / "01_sft" / "data_report.json").read_text())["data"]
    assert report["rows"] == report["kept"] + sum(report["dropped"].values())
    held = json.loads((out / "02_reward" / "data_report.json").read_text())
    val = held["val_data"]
    assert val["path"].endswith("prefs_eval.jsonl") and val["rows"] == val["kept"] + sum(val["dropped"].values())
    assert val["kept"] >= 50 and set(val["dropped"]) <= {"too_long"}  # a few replies exceed 256 tokens of this tokenizer


def test_the_cached_dpo_reference_equals_a_recomputed_one_and_is_reused(root, trained, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kiln.training.distributed import World
    from kiln.training.post.models import PreferenceLM
    from kiln.training.post.stages import reference_logps

    out, _ = trained
    cached = load_file(str(out / "03_dpo" / "ref_logps.safetensors"))
    tok = ChatTokenizer(str(root / "tok"))
    pairs, _ = read_pairs(str(root / "post" / "prefs.jsonl"), tok, 256, mask_format_tokens=True)
    model = PreferenceLM(AutoModelForCausalLM.from_pretrained(str(out / "01_sft" / "final")), 0.1, "sigmoid", 0.2)
    lines: list[str] = []
    fresh = reference_logps(model, pairs, tok.pad_id, 16, World(), str(tmp_path / "ref.safetensors"), "prefs", lines.append,
                            "dpo")
    assert torch.equal(fresh[0], cached["chosen"]) and torch.equal(fresh[1], cached["rejected"])
    again = reference_logps(model, pairs, tok.pad_id, 16, World(), str(tmp_path / "ref.safetensors"), "prefs",
                            lines.append, "dpo")
    assert torch.equal(again[0], fresh[0]) and "read from" in lines[-1]


def test_a_killed_dpo_stage_resumes_to_the_same_losses(root, trained):
    out, _ = trained
    path = root / "resume.toml"
    killed = root / "killed"
    stages = STAGES.format(post=root / "post").replace('init = ', 'init = ')
    path.write_text(post_recipe(root, killed, stages))
    recipe = recipes.load(str(path))
    # Reuse the finished SFT and reward stages; kill DPO after 8 steps (checkpoint at 6).
    import shutil

    killed.mkdir()
    for stage in ("01_sft", "02_reward"):
        shutil.copytree(out / stage, killed / stage)
    train(recipe, RunOptions(stop_after_steps=8))
    train(recipe)

    def losses(run):
        return [(r["step"], r["train/loss"]) for r in map(json.loads, (run / "03_dpo" / "metrics.jsonl").read_text()
                                                          .splitlines()) if "train/loss" in r]
    assert losses(killed) == losses(out)


# --------------------------------------------------------------------------- bad input


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bad_sft_rows_are_counted_by_reason(root, tmp_path):
    tok = ChatTokenizer(str(root / "tok"))
    long = "word " * 400
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn
        {"messages": [{"role": "robot", "content": "hi"}]},  # bad role
        "{not json",
        {"prompt": "Hello", "completion": "Hi there."},
        {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "Short."}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long}]},
    ])
    examples, report = read_sft(str(path), tok, 64, overflow="truncate")
    assert report.to_dict()["dropped"] == {"bad_messages": 1, "no_assistant_turn": 1, "not_json": 1, "too_long": 1}
    assert (report.kept, report.truncated, len(examples)) == (2, 1, 2)
    _, dropped = read_sft(str(path), tok, 64, overflow="drop")
    assert dropped.to_dict()["dropped"]["too_long"] == 2 and dropped.kept == 1
    none = write_jsonl(tmp_path / "none.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ConfigError, match=r"none.jsonl: 1 rows, 0 kept .*no_assistant_turn 1: no usable conversation"):
        read_sft(str(none), tok, 64)


def test_a_pair_whose_chosen_equals_rejected_is_counted(root, tmp_path):
    tok = ChatTokenizer(str(root / "tok"))
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "same", "rejected": " same "},
                                              {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 0.5},
                                              {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": "x"}])
    pairs, report = read_pairs(str(path), tok, 64)
    assert report.to_dict()["dropped"] == {"bad_messages": 1, "chosen_equals_rejected": 1}
    assert len(pairs) == 1 and pairs[0].margin == 0.5


def test_a_reward_stage_on_a_two_label_classifier_and_a_foreign_vocabulary_are_refused(root, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from kiln.training.post.stages import load_start

    two = tmp_path / "two"
    AutoModelForSequenceClassification.from_pretrained(str(root / "base"), num_labels=2).save_pretrained(str(two))
    with pytest.raises(ConfigError, match=r"two: a sequence classifier with 2 labels; a reward stage needs one"):
        load_start("reward", str(two), 512)
    with pytest.raises(ConfigError, match=r"base: its vocabulary has 512 tokens, the tokenizer 8192"):
        load_start("sft", str(root / "base"), 8192)


SFT_EMA = """
[[stage]]
name = "sft"
kind = "sft"
data = "{post}/sft.jsonl"
tokens = 40_960
seq_len = 256
batch_size = 16
lr = 2e-3
checkpoint_every = 4
eval_every = 100
{ema}
"""


def exported(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "01_sft" / "final" / "model.safetensors"))


def test_an_ema_stage_exports_the_average_and_resumes_it(root):
    def run(name: str, ema: str, stop: int = 0) -> Path:
        out = root / name
        path = root / f"{name}.toml"
        path.write_text(post_recipe(root, out, SFT_EMA.format(post=root / "post", ema=ema)))
        if stop:
            train(recipes.load(str(path)), RunOptions(stop_after_steps=stop))
        train(recipes.load(str(path)))
        return out

    last = exported(run("plain", ""))
    nearly_last = exported(run("ema_fast", 'average = "ema"\nema_decay = 1e-9'))
    for k, v in last.items():
        torch.testing.assert_close(nearly_last[k], v, atol=1e-6, rtol=0)
    averaged = exported(run("ema", 'average = "ema"\nema_decay = 0.8'))
    assert any(not torch.equal(averaged[k], v) for k, v in last.items())
    resumed = exported(run("ema_killed", 'average = "ema"\nema_decay = 0.8', stop=6))
    assert all(torch.equal(resumed[k], v) for k, v in averaged.items())
