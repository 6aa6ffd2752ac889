"""`kiln generate` and its sampler: prompts read with drops counted by reason, the
Gumbel-max sampler's distribution, batched cached sampling against a plain unbatched
uncached loop with the same noise, greedy decoding, reproducibility and independence
from batching, completions ending at <|eot_id|> or truncated, kill-and-resume, and the
CLI end to end with bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.cli import main
from kiln.config import ConfigError
from kiln.formats.chat import EOT
from kiln.training.post.data import ChatTokenizer
from kiln.training.post.generate import (Prompt, SamplingConfig, generate_file, load_causal_lm, prompt_ids,
                                         read_prompts, row_seed, sample, sampling_processors)
from tests.training.corpus import build_corpus

QUESTIONS = ["What does bisect do?", "Explain heapq in one sentence.", "What is the class `Path`?", "Hi",
             "What does `textwrap.fill` return, and what does its width argument mean?", "And difflib?"]
EOT_WEIGHT = 0.5  # the talker's <|eot_id|> logit is about 8 x this: p(<|eot_id|>) ~ 0.08 a token


def make_talker(hf, eot: int, dim: int = 0) -> None:
    """Make the random debug model end its answers: residual dimension `dim` holds 1 at
    every position (the embeddings set it and no sublayer writes it) and only
    <|eot_id|>'s output row reads it, so <|eot_id|> keeps a logit of about 8 x EOT_WEIGHT
    (the final RMSNorm of a stream whose other dimensions are ~0.02 turns the 1 into ~8),
    against ~0 for the other 511 tokens: answers end after a dozen tokens or so."""
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, dim] = 1.0
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight[dim] = 0
            layer.mlp.down_proj.weight[dim] = 0
        hf.lm_head.weight[:, dim] = 0
        hf.lm_head.weight[eot, dim] = EOT_WEIGHT


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """A debug model's matmuls are microseconds: on a shared 2-core machine two spinning
    OpenMP threads run them 20x slower than one (as in tests/curation/test_scorer.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """`tok`, `base` (the random debug model, which never says <|eot_id|>), `talker`
    (which does), and `prompts.jsonl` (QUESTIONS, ids q0...)."""
    from transformers import AutoModelForSequenceClassification

    from kiln.training.model import ModelConfig, build_model, hf_config, resolve, save_hf

    root = build_corpus(tmp_path_factory.mktemp("generate"), log=lambda m: None)
    tok = ChatTokenizer(str(root / "tok"))
    cfg = resolve(ModelConfig(preset="debug"), vocab_size=tok.vocab_size)
    hf = build_model(cfg, seed=0)
    save_hf(hf, str(root / "base"), str(root / "tok"))
    make_talker(hf, tok.tok.token_to_id(EOT))
    save_hf(hf, str(root / "talker"), str(root / "tok"))
    save_hf(hf, str(root / "no_tokenizer"))
    reward = hf_config(cfg)
    reward.num_labels = 1
    save_hf(AutoModelForSequenceClassification.from_config(reward), str(root / "reward"), str(root / "tok"))
    write_jsonl(root / "prompts.jsonl", [{"id": f"q{i}", "prompt": q} for i, q in enumerate(QUESTIONS)])
    return root


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def prompts_of(tok: ChatTokenizer, questions=QUESTIONS) -> list[Prompt]:
    out = []
    for i, q in enumerate(questions):
        messages = [{"role": "user", "content": q}]
        out.append(Prompt(f"q{i}", messages, prompt_ids(tok, messages)))
    return out


def load(root: Path, name: str):
    return load_causal_lm(str(root / name), "cpu"), ChatTokenizer(str(root / name))


def reference_sample(hf, prompt: Prompt, k: int, cfg: SamplingConfig, eot: int, salt: str = "") -> tuple[list, bool]:
    """Sample k of a prompt the plain way: one row, no KV cache, no padding, the model's
    whole forward per token, then temperature, top-p (transformers' warpers) and the
    row's Gumbel noise, drawn here from its own generator."""
    processors = sampling_processors(cfg, [0], "cpu")[:-1]  # the warpers, without the noise
    g = torch.Generator().manual_seed(row_seed(cfg.seed, salt, prompt.id, k))
    ids, new = list(prompt.ids), []
    for _ in range(cfg.max_new_tokens):
        scores = hf(torch.tensor([ids])).logits[:, -1].float()  # (1, V)
        for p in processors:
            scores = p(None, scores)
        u = torch.rand(scores.shape[-1], generator=g).clamp(min=torch.finfo(torch.float32).tiny)
        token = int(torch.argmax(scores[0] - torch.log(-torch.log(u))))
        if token == eot:
            return new, False
        new.append(token)
        ids.append(token)
    return new, True


# --------------------------------------------------------------------------- prompts


def test_read_prompts_renders_the_generation_prompt_and_counts_every_drop_by_reason(root, tmp_path):
    from transformers import AutoTokenizer

    tok = ChatTokenizer(str(root / "tok"))
    system = {"role": "system", "content": "Be brief."}
    rows = [
        {"id": "a", "prompt": "What does bisect do?"},  # a string: one user message
        {"id": 7, "prompt": [system, {"role": "user", "content": "And heapq?"}]},  # id 7 -> "7"
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},  # id "2"
        "not json {",
        "[1, 2]",  # JSON, not an object
        {"id": "b", "prompt": [{"role": "bot", "content": "?"}]},  # bad_messages: unknown role
        {"id": "c", "prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},  # ends with a reply
        {"id": "d", "completion": "no prompt"},  # bad_messages: neither prompt nor messages
        {"id": "e", "prompt": "   "},  # empty
        {"id": "f", "messages": [{"role": "assistant", "content": "only a reply"}]},  # empty once the reply is cut
        {"id": "g", "prompt": "word " * 400},  # prompt_too_long
        {"id": "a", "prompt": "the same id again"},  # duplicate_id
        {"id": None, "prompt": "a null id: the row number"},  # id "12"
    ]
    write_jsonl(tmp_path / "p.jsonl", rows)
    prompts, report = read_prompts(str(tmp_path / "p.jsonl"), tok, context=256, max_new_tokens=64)
    assert [p.id for p in prompts] == ["a", "7", "2", "12"]
    assert report.rows == 13 and report.kept == 4
    assert dict(report.dropped) == {"not_json": 2, "bad_messages": 3, "empty": 2, "prompt_too_long": 1,
                                    "duplicate_id": 1}
    assert prompts[2].messages == [{"role": "user", "content": "Hi"}]
    assert prompts[1].messages == [system, {"role": "user", "content": "And heapq?"}]
    hf_tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    for p in prompts:
        assert p.ids == hf_tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
    assert hf_tok.decode(prompts[0].ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # The length limit counts the tokens to generate: 64 more tokens of room keep "g".
    assert "g" in [p.id for p in read_prompts(str(tmp_path / "p.jsonl"), tok, 256 + 64 * 20, 64)[0]]

    write_jsonl(tmp_path / "bad.jsonl", ["nope", {"prompt": ""}])
    with pytest.raises(ConfigError, match=r"bad\.jsonl: 2 rows, 0 kept .*no usable prompt"):
        read_prompts(str(tmp_path / "bad.jsonl"), tok, 256, 64)
    with pytest.raises(ConfigError, match="missing.jsonl: post-training data not found"):
        read_prompts(str(tmp_path / "missing.jsonl"), tok, 256, 64)


# --------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_gumbel_noise_draws_from_the_tempered_top_p_softmax(top_p):
    """2000 rows of the same logits, each with its own noise: the argmax frequencies are
    softmax(z / T) restricted to the top-p set and renormalised. A fixed seed makes the
    test deterministic; the bound is 4 standard errors per token (|f - p| < 0.045 at
    p = 0.5, n = 2000)."""
    n, T = 2000, 0.8
    z = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    cfg = SamplingConfig(temperature=T, top_p=top_p, seed=11)
    processors = sampling_processors(cfg, [row_seed(cfg.seed, "", "x", k) for k in range(n)], "cpu")
    scores = z.repeat(n, 1)
    for p in processors:
        scores = p(None, scores)
    freq = torch.bincount(scores.argmax(-1), minlength=len(z)).double() / n
    probs = torch.softmax(z.double() / T, -1)
    keep = probs.cumsum(-1) - probs < top_p  # the smallest prefix of the (sorted) tokens reaching top_p
    expected = torch.where(keep, probs, 0.0)
    expected /= expected.sum()
    assert keep.sum() == (6 if top_p == 1.0 else 2)
    assert torch.all(freq[~keep] == 0)
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-12), (freq, expected)


def test_batched_cached_sampling_equals_a_plain_loop_and_ignores_the_batch(root):
    """Samples (ids and where they end) equal a one-row, no-cache, no-padding loop with
    the same noise; K=3 samples in batches of 4 rows split prompts across batches and pad
    prompts of 8 lengths to the left. Rerunning, batching differently or sampling a
    prompt alone gives the same ids (exactly here in fp32: left padding could flip a
    near-tie, and has not on this model)."""
    hf, tok = load(root, "talker")
    eot = tok.tok.token_to_id(EOT)
    prompts = prompts_of(tok)
    assert len({len(p.ids) for p in prompts}) == len(prompts)
    cfg = SamplingConfig(samples=3, temperature=0.9, top_p=0.95, max_new_tokens=16, seed=5, batch_size=4)
    lines = []
    out = list(sample(hf, tok, prompts, cfg, log=lines.append))
    assert [p.id for p, _ in out] == [p.id for p in prompts]
    for p, completions in out:
        assert len(completions) == 3
        for k, c in enumerate(completions):
            assert (c.ids, c.truncated) == reference_sample(hf, p, k, cfg, eot)
            assert c.text == tok.tok.decode(c.ids, skip_special_tokens=False)
    ends = [c.truncated for _, cs in out for c in cs]
    assert 0 < sum(ends) < len(ends)  # some end with <|eot_id|>, some run out of tokens
    assert lines[0].startswith("1/6 prompts") and lines[-1].startswith("6/6 prompts") and "tokens/s, eta" in lines[-1]

    ids = [[c.ids for c in cs] for _, cs in out]
    assert [[c.ids for c in cs] for _, cs in sample(hf, tok, prompts, cfg)] == ids
    wide = SamplingConfig(**{**cfg.__dict__, "batch_size": 18})
    assert [[c.ids for c in cs] for _, cs in sample(hf, tok, prompts, wide)] == ids
    alone = [[c.ids for c in cs] for p in prompts for _, cs in sample(hf, tok, [p], cfg)]
    assert alone == ids


def test_samples_differ_between_samples_salts_and_seeds(root):
    """On the random model (16 tokens, never <|eot_id|>) two different noises never give
    the same completion: a prompt's K samples differ, and so does every sample under
    another salt (a committee member) or another seed."""
    hf, tok = load(root, "base")
    cfg = SamplingConfig(samples=3, max_new_tokens=16, seed=5, batch_size=6)
    ids = []
    for _, cs in sample(hf, tok, prompts_of(tok), cfg):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # the caller's code between batches
        ids.append([tuple(c.ids) for c in cs])
    assert all(len(set(row)) == 3 for row in ids)
    for salt, seed in (("member-b", 5), ("", 6)):
        other = SamplingConfig(**{**cfg.__dict__, "seed": seed})
        changed = [[tuple(c.ids) for c in cs] for _, cs in sample(hf, tok, prompts_of(tok), other, salt=salt)]
        assert all(a != b for ra, rb in zip(ids, changed) for a, b in zip(ra, rb))


def test_temperature_zero_and_a_tiny_top_p_decode_greedily(root):
    hf, tok = load(root, "base")
    eot = tok.tok.token_to_id(EOT)
    prompts = prompts_of(tok)
    greedy = []
    for p in prompts:
        out = hf.generate(torch.tensor([p.ids]), do_sample=False, max_new_tokens=10, pad_token_id=tok.pad_id,
                          eos_token_id=eot)
        greedy.append(out[0, len(p.ids):].tolist())
    for cfg in (SamplingConfig(samples=2, temperature=0.0, max_new_tokens=10, batch_size=5),
                SamplingConfig(samples=2, temperature=0.7, top_p=1e-6, max_new_tokens=10, batch_size=5)):
        got = [[c.ids for c in cs] for _, cs in sample(hf, tok, prompts, cfg)]
        assert got == [[g, g] for g in greedy]


def test_truncated_when_no_eot_comes_within_max_new_tokens(root):
    hf, tok = load(root, "base")  # the random model never picks <|eot_id|> in 2 tokens
    out = list(sample(hf, tok, prompts_of(tok), SamplingConfig(samples=2, max_new_tokens=2)))
    assert all(c.truncated and len(c.ids) == 2 for _, cs in out for c in cs)
    hf, tok = load(root, "talker")  # greedy: <|eot_id|> is its most likely first token
    [(_, [c])] = sample(hf, tok, prompts_of(tok)[:1], SamplingConfig(samples=1, temperature=0, max_new_tokens=2))
    assert (c.ids, c.text, c.truncated) == ([], "", False)


def test_bad_sampling_settings_are_refused(root):
    hf, tok = load(root, "base")
    for bad, message in (({"samples": 0}, "samples must be at least 1, got 0"),
                         ({"temperature": -0.5}, r"temperature must be >= 0 \(0 = greedy\), got -0.5"),
                         ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
                         ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
                         ({"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
                         ({"batch_size": 0}, "batch_size must be at least 1, got 0")):
        with pytest.raises(ConfigError, match=message):
            list(sample(hf, tok, prompts_of(tok), SamplingConfig(**bad)))


# --------------------------------------------------------------------------- kiln generate


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_killed_run_resumes_to_the_uninterrupted_output(root, tmp_path):
    model, prompts = str(root / "talker"), str(root / "prompts.jsonl")
    cfg = SamplingConfig(samples=2, temperature=1.0, max_new_tokens=12, seed=3, batch_size=3)
    whole = tmp_path / "whole.jsonl"
    stats = generate_file(model, prompts, str(whole), cfg, log=lambda m: None)
    rows = read_out(whole)
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(6)]
    assert rows[0]["prompt"] == [{"role": "user", "content": QUESTIONS[0]}]
    assert {(r["model"], r["seed"], len(r["completions"])) for r in rows} == {(model, 3, 2)}
    completions = [c for r in rows for c in r["completions"]]
    assert set(completions[0]) == {"text", "tokens", "truncated"}
    assert stats["prompts"] == {"path": prompts, "rows": 6, "kept": 6, "dropped": {}, "prompt_truncated": 0}
    assert (stats["prompts_sampled"], stats["samples"], stats["resumed_prompts"], stats["this_run_prompts"]) == \
        (6, 12, 0, 6)
    assert stats["truncated"] == sum(c["truncated"] for c in completions)
    assert stats["generated_tokens"] == stats["this_run_tokens"] == sum(c["tokens"] for c in completions)
    assert json.loads((tmp_path / "whole.jsonl.parts" / "stats.json").read_text()) == stats

    # A kill mid-write: two prompts written, the third cut off, the merged file never written.
    killed = tmp_path / "killed.jsonl"
    generate_file(model, prompts, str(killed), cfg, log=lambda m: None)
    part = tmp_path / "killed.jsonl.parts" / "rank-0.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text(lines[0] + lines[1] + lines[2][:len(lines[2]) // 2])
    killed.unlink()
    logged = []
    stats = generate_file(model, prompts, str(killed), SamplingConfig(**{**cfg.__dict__, "batch_size": 4}),
                          log=logged.append)
    assert any("resuming: 2 of 6 prompts already sampled" in m for m in logged)
    assert (stats["resumed_prompts"], stats["this_run_prompts"]) == (2, 4)
    assert killed.read_text() == whole.read_text()
    ids = [json.loads(line)["id"] for line in part.read_text().splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(6)) and len(ids) == 6

    # A finished run relaunched only merges again; other sampling settings are refused.
    assert generate_file(model, prompts, str(killed), cfg, log=lambda m: None)["this_run_prompts"] == 0
    assert killed.read_text() == whole.read_text()
    with pytest.raises(ConfigError, match=r"killed\.jsonl\.parts: parts of an earlier run with other settings "
                                          r"\(sampling changed\)"):
        generate_file(model, prompts, str(killed), SamplingConfig(**{**cfg.__dict__, "seed": 4}), log=print)


def test_cli_generates_end_to_end_and_refuses_bad_input_with_exit_code_2(root, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    prompts = str(root / "prompts.jsonl")
    args = ["generate", "--model", str(root / "talker"), "--prompts", prompts, "--out", str(out)]
    assert main(args + ["--samples", "2", "--temperature", "0.8", "--top-p", "0.9", "--max-new-tokens", "6",
                        "--seed", "9", "--batch-size", "5"]) == 0
    printed = capsys.readouterr().out
    assert "[generate] prompts " in printed and "6/6 prompts" in printed
    stats = json.loads(printed[printed.index("\n{") + 1:])  # the stats, printed last
    assert (stats["samples"], stats["out"], stats["ranks"]) == (12, str(out), 1)
    rows = read_out(out)
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(6)]
    assert all(r["seed"] == 9 and len(r["completions"]) == 2 and all(c["tokens"] <= 6 for c in r["completions"])
               for r in rows)
    parts = json.loads((Path(f"{out}.parts") / "settings.json").read_text())
    assert parts["sampling"] == {"samples": 2, "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 6, "seed": 9}

    for extra, message in (
            (["--samples", "0"], "samples must be at least 1, got 0"),
            (["--temperature", "-1"], "temperature: must not be negative, got -1.0"),
            (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
            (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5")):
        capsys.readouterr()
        assert main(args + extra) == 2
        assert message in capsys.readouterr().err
    for model, prompt_file, message in (
            (root / "talker", tmp_path / "missing.jsonl", "missing.jsonl: prompts file not found"),
            (tmp_path / "nowhere", prompts, "nowhere: model directory not found"),
            (root / "reward", prompts, "reward: a reward model (sequence classifier); sampling needs a causal LM"),
            (root / "no_tokenizer", prompts, "no_tokenizer: no tokenizer.json"),
            (root / "tok", prompts, "tok: not a Hugging Face model directory")):
        capsys.readouterr()
        assert main(["generate", "--model", str(model), "--prompts", str(prompt_file), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kiln: error: ") and message in err, err


def test_two_ranks_under_torchrun_shard_the_prompts_and_merge_the_same_output(root, tmp_path):
    import os
    import subprocess
    import sys

    args = ["generate", "--model", str(root / "talker"), "--prompts", str(root / "prompts.jsonl"), "--samples", "2",
            "--max-new-tokens", "8", "--seed", "1", "--batch-size", "4"]
    assert main(args + ["--out", str(tmp_path / "one.jsonl")]) == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "kiln.cli", *args,
                           "--out", str(tmp_path / "two.jsonl")], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    parts = tmp_path / "two.jsonl.parts"
    for rank in (0, 1):  # rank r samples prompts r, r + 2, r + 4
        assert [r["id"] for r in read_out(parts / f"rank-{rank}.jsonl")] == [f"q{i}" for i in range(rank, 6, 2)]
    stats = json.loads(done.stdout[done.stdout.index("\n{") + 1:])  # printed once, by rank 0
    assert (stats["ranks"], stats["this_run_prompts"], stats["samples"]) == (2, 6, 12)
    assert stats["this_run_tokens"] == stats["generated_tokens"]


FSDP_SAMPLING = """
import json, sys
from torch.distributed.fsdp import fully_shard
from kiln.training.distributed import init_distributed
from kiln.training.post.data import ChatTokenizer
from kiln.training.post.generate import SamplingConfig, load_causal_lm, read_prompts, sample, synced_ranks

world = init_distributed()
model, prompts, out = sys.argv[1:4]
tok = ChatTokenizer(model)
sharded, plain = load_causal_lm(model, "cpu"), load_causal_lm(model, "cpu")
for layer in sharded.model.layers:
    fully_shard(layer)
fully_shard(sharded)
mine = read_prompts(prompts, tok, 2048, 16)[0][world.rank::2]
# Rank 0 decodes greedily: the talker says <|eot_id|> first, one forward. Rank 1 samples up to 16 tokens.
cfg = SamplingConfig(samples=2, temperature=float(world.rank), max_new_tokens=16, batch_size=6)
got = [[c.ids for c in cs] for _, cs in sample(sharded, tok, mine, cfg)]
want = [[c.ids for c in cs] for _, cs in sample(plain, tok, mine, cfg)]
with open(f"{out}-{world.rank}.json", "w") as f:
    json.dump({"synced": synced_ranks(sharded), "same": got == want, "lengths": [len(x) for r in got for x in r]}, f)
"""


def test_a_model_sharded_by_fsdp_samples_in_step_on_ranks_whose_rows_end_at_different_times(root, tmp_path):
    """FSDP2 all-gathers every layer's weights in each forward: a rank whose rows all end
    must keep running forwards until the other's end (synced_ranks turns on transformers'
    synced_gpus, which does not recognise kiln's `fully_shard`), or both hang."""
    import os
    import subprocess
    import sys

    script = tmp_path / "fsdp_sampling.py"
    script.write_text(FSDP_SAMPLING)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(root / "talker"),
                           str(root / "prompts.jsonl"), str(tmp_path / "rank")], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(r["synced"] and r["same"] for r in ranks)  # the same samples as the unsharded model's
    assert ranks[0]["lengths"] == [0] * 6 and max(ranks[1]["lengths"]) > 1
