"""Rejection sampling: best-of-K with a reward model, from the policy or a committee.

For each prompt, K completions from each proposing model (the policy, or a committee of
models, Apple AFM's iTeC), scored by the reward models (their mean, when several), then
rule-based filters, then per prompt the best one (or the top n above a threshold) kept
as SFT data (Llama 2 and 3: K = 10-30), and the best and the worst as a preference pair
(Qwen 2's online DPO: the reward model picks both from the policy's own samples).

    NN_<stage>/
      prompts_train.jsonl, prompts_eval.jsonl   the prompts, split once (seeded holdout or val_data)
      samples/<member>.jsonl                     kiln generate's rows (resumable: a relaunch skips finished prompts)
      sft.jsonl                                  {"messages", "score", "id", "model"}: TRL's conversational SFT rows
      pairs.jsonl                                {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "id"}
      stats.json                                 what it cost and what it bought (below)

A completion is never kept when truncated (no <|eot_id|> within max_new_tokens, with
`exclude_truncated`), shorter than `min_length` tokens, empty, not matching `require`,
matching `forbid`, or below `threshold`; each such completion is counted by its reason,
and `drawn == eligible + Σ filtered`. A filtered completion can still be a pair's rejected
side: it is a real sample the policy would produce. A prompt yields a pair when it has a
kept completion and a lower-scoring different one.

stats.json records the round's cost and gain: samples drawn per kept example, the mean
reward of the kept set against the mean of all samples of the same prompts (what one
random sample per prompt scores in expectation), the reward distribution of both, and
`heldout_reward`, the mean reward of the policy's own samples on held-out prompts: the
policy before this round. Over rounds these make the curve that says how many rounds
are worth paying for (`rounds.json`, written by the trainer).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from kiln.config import ConfigError
from kiln.formats.hashing import content_sha256
from kiln.training.post.data import ChatTokenizer, split

TOKENIZER_JSON = "tokenizer.json"
SFT_FILE, PAIRS_FILE, STATS_FILE = "sft.jsonl", "pairs.jsonl", "stats.json"
FILTERS = ("truncated", "empty", "too_short", "missing_required", "forbidden", "below_threshold")


# --------------------------------------------------------------------------- reward models


class RewardScorer:
    """The mean score of one or more reward models (`reward` stages' exports) on
    conversations. Each model's tokenizer must be the policy's (same tokenizer.json
    bytes): a reward model reads token ids, and another tokenizer's ids mean other words."""

    def __init__(self, model_dirs: list[str], tokenizer_dir: str, device, where: str, batch_size: int = 16,
                 resident: bool = False):
        self.dirs, self.device, self.batch_size, self.resident = list(model_dirs), device, batch_size, resident
        self.models: dict[str, torch.nn.Module] = {}  # kept loaded when resident (RL scores every step)
        self.tok = ChatTokenizer(tokenizer_dir)
        want = content_sha256(os.path.join(tokenizer_dir, TOKENIZER_JSON))
        for d in self.dirs:
            check_same_tokenizer(d, want, tokenizer_dir, where, "reward model")

    @torch.no_grad()
    def score(self, conversations: list[list[dict]]) -> np.ndarray:
        """(models, conversations) rewards; `.mean(0)` is the committee's score."""
        out = np.zeros((len(self.dirs), len(conversations)))
        encoded = [self.tok.encode(c)[0] for c in conversations]
        for m, d in enumerate(self.dirs):
            model = self.models.get(d) or self._load(d)
            context = model.hf.config.max_position_embeddings
            for start in range(0, len(encoded), self.batch_size):
                rows = [ids[-context:] for ids in encoded[start:start + self.batch_size]]  # the end decides
                ids = torch.full((len(rows), max(map(len, rows))), self.tok.pad_id, dtype=torch.long)
                for j, r in enumerate(rows):
                    ids[j, :len(r)] = torch.tensor(r)
                lengths = torch.tensor([len(r) for r in rows])
                out[m, start:start + len(rows)] = model.rewards(ids.to(self.device), lengths.to(self.device)).cpu()
            del model
        return out

    def _load(self, model_dir: str):
        from kiln.training.post.models import RewardModel
        from kiln.training.post.stages import load_start

        model = RewardModel(load_start("reward", model_dir, self.tok.vocab_size)).to(self.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if self.resident:
            self.models[model_dir] = model
        return model


def check_same_tokenizer(model_dir: str, want_sha: str, tokenizer_dir: str, where: str, what: str) -> None:
    path = os.path.join(model_dir, TOKENIZER_JSON)
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: {what} {model_dir} has no {TOKENIZER_JSON}: kiln cannot check that it reads "
                          "the policy's tokens")
    if content_sha256(path) != want_sha:
        raise ConfigError(f"{where}: {what} {model_dir} has another tokenizer than the policy's ({tokenizer_dir}); "
                          "its token ids mean other text")


# --------------------------------------------------------------------------- choosing


@dataclass
class Sample:
    member: str  # the model that proposed it
    text: str
    tokens: int
    truncated: bool
    score: float = 0.0
    filtered: str = ""  # the reason it may not be kept ("" = eligible)


def filter_reason(s: Sample, cfg) -> str:
    """Why a completion may not be kept, in FILTERS order; "" if it may."""
    if s.truncated and cfg.exclude_truncated:
        return "truncated"
    if not s.text.strip():
        return "empty"
    if s.tokens < cfg.min_length:
        return "too_short"
    if cfg.require and not re.search(cfg.require, s.text):
        return "missing_required"
    if cfg.forbid and re.search(cfg.forbid, s.text):
        return "forbidden"
    if cfg.threshold is not None and s.score < cfg.threshold:
        return "below_threshold"
    return ""


def choose(samples: list[Sample], cfg) -> tuple[list[int], tuple[int, int] | None, str]:
    """One prompt's choice: indices kept (best first), the (chosen, rejected) pair, and
    why there is no pair ("" when there is one). Ties go to the earlier sample."""
    order = sorted(range(len(samples)), key=lambda j: (-samples[j].score, j))
    eligible = [j for j in order if not samples[j].filtered]
    kept = eligible[:1] if cfg.keep == "best" else eligible[:cfg.top_n]
    if not cfg.pairs:
        return kept, None, ""
    if not kept:
        return kept, None, "nothing_kept"
    best, worst = kept[0], order[-1]
    if samples[worst].text.strip() == samples[best].text.strip():
        return kept, None, "all_equal"
    return kept, (best, worst), ""


def distribution(values) -> dict:
    v = np.asarray(values, dtype=float)
    if not len(v):
        return {"n": 0}
    q = np.quantile(v, [0.1, 0.5, 0.9])
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2]), "max": float(v.max())}


# --------------------------------------------------------------------------- the stage


def run(cfg, policy: str, committee: list[str], rewards: list[str], tokenizer_dir: str, root: str, seed: int,
        world, log, where: str) -> dict:
    """The whole stage: split prompts, sample from every member, score, choose, write;
    returns the stage's summary (its stats)."""
    from kiln.training.distributed import barrier
    from kiln.training.post.generate import generate_file

    members = committee or [policy]
    want = content_sha256(os.path.join(tokenizer_dir, TOKENIZER_JSON))
    vocab = None
    contexts = []
    for m in members:
        check_same_tokenizer(m, want, tokenizer_dir, where, "committee member")
        config = _config(m, where)
        if vocab is not None and config["vocab_size"] != vocab:
            raise ConfigError(f"{where}: committee member {m} has a vocabulary of {config['vocab_size']} tokens, "
                              f"{members[0]} {vocab}: the committee must share one vocabulary")
        vocab = config["vocab_size"]
        contexts.append(config.get("max_position_embeddings", 0))
    scorer = RewardScorer(rewards, tokenizer_dir, world.device, where)  # checked before any sampling
    tok = ChatTokenizer(tokenizer_dir)
    os.makedirs(os.path.join(root, "samples"), exist_ok=True)
    train_file, eval_file = os.path.join(root, "prompts_train.jsonl"), os.path.join(root, "prompts_eval.jsonl")
    report = split_prompts(cfg, tok, min(contexts), seed, train_file, eval_file, world, log)
    barrier(world)
    files = {}
    for j, m in enumerate(members):
        label = member_label(m, j)
        files[label] = os.path.join(root, "samples", f"{label}.jsonl")
        log(f"[{cfg.name}] sampling {cfg.samples} per prompt from {m}")
        generate_file(m, train_file, files[label], sampling_config(cfg, seed + j), log=log)
    heldout_file = os.path.join(root, "samples", "heldout.jsonl")
    if os.path.getsize(eval_file):
        log(f"[{cfg.name}] held-out reward: sampling the policy {policy} on {eval_file}")
        generate_file(policy, eval_file, heldout_file, sampling_config(cfg, seed), log=log)
    stats = {}
    if world.main:
        stats = choose_and_write(cfg, files, heldout_file if os.path.getsize(eval_file) else "", scorer, root, log,
                                 report)
    barrier(world)
    if not world.main:
        with open(os.path.join(root, STATS_FILE), encoding="utf-8") as f:
            stats = json.load(f)
    return stats


def sampling_config(cfg, seed: int):
    from kiln.training.post.generate import SamplingConfig

    return SamplingConfig(samples=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p,
                          max_new_tokens=cfg.max_new_tokens, seed=seed)


def member_label(path: str, j: int) -> str:
    """`00_02_sft` for the export `.../02_sft/final`, `01_mymodel` for a directory."""
    parts = os.path.normpath(path).split(os.sep)
    name = parts[-2] if parts[-1] == "final" and len(parts) > 1 else parts[-1]
    return f"{j:02d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def evaluate_policy(cfg, policy: str, rewards: list[str], tokenizer_dir: str, eval_file: str, out_file: str,
                    seed: int, world, log, where: str) -> float:
    """The held-out reward of `policy` on a rejection-sampling stage's held-out prompts,
    with its sampling settings and reward models: the "after" of a last round."""
    from kiln.training.distributed import barrier
    from kiln.training.post.generate import generate_file

    scorer = RewardScorer(rewards, tokenizer_dir, world.device, where)
    generate_file(policy, eval_file, out_file, sampling_config(cfg, seed), log=log)
    value = heldout_reward(out_file, scorer) if world.main else float("nan")
    barrier(world)
    return value


def _config(model_dir: str, where: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {model_dir} is not a model directory ({e})") from e


def split_prompts(cfg, tok: ChatTokenizer, context: int, seed: int, train_file: str, eval_file: str, world,
                  log) -> dict:
    """The prompts (read and checked once, drops counted) written as the training and
    held-out prompt files kiln generate reads; returns the prompts' report."""
    from kiln.training.post.generate import read_prompts

    prompts, report = read_prompts(cfg.prompts, tok, context, cfg.max_new_tokens)
    log(f"[{cfg.name}] prompts {report.describe()}")
    reports = {"prompts": report.to_dict()}
    if cfg.val_data:
        held, held_report = read_prompts(cfg.val_data, tok, context, cfg.max_new_tokens)
        reports["val_data"] = held_report.to_dict()
        train = prompts
    else:
        train_idx, val_idx = split(len(prompts), cfg.holdout, seed)
        train, held = [prompts[i] for i in train_idx], [prompts[i] for i in val_idx]
    if world.main:
        for path, rows in ((train_file, train), (eval_file, held)):
            with open(path, "w", encoding="utf-8") as f:
                for p in rows:
                    f.write(json.dumps({"id": p.id, "prompt": p.messages}) + "\n")
    return reports


def _read_samples(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def choose_and_write(cfg, files: dict[str, str], heldout_file: str, scorer: RewardScorer, root: str, log,
                     prompts_report: dict | None = None) -> dict:
    """Score every sample, choose per prompt, write sft.jsonl, pairs.jsonl and stats.json
    (with `prompts_report`, what reading the prompts dropped)."""
    by_prompt: dict[str, tuple[list[dict], list[Sample]]] = {}
    for label, path in files.items():
        for row in _read_samples(path):
            entry = by_prompt.setdefault(str(row["id"]), (row["prompt"], []))
            for c in row["completions"]:
                entry[1].append(Sample(label, c["text"], c["tokens"], c["truncated"]))
    ids = list(by_prompt)
    flat = [(pid, s) for pid in ids for s in by_prompt[pid][1]]
    log(f"[{cfg.name}] scoring {len(flat)} samples with {len(scorer.dirs)} reward model(s)")
    scores = scorer.score([by_prompt[pid][0] + [{"role": "assistant", "content": s.text}] for pid, s in flat])
    for (_pid, s), value in zip(flat, scores.mean(0)):
        s.score = float(value)
        s.filtered = filter_reason(s, cfg)
    filtered, no_pair = {r: 0 for r in FILTERS}, {"nothing_kept": 0, "all_equal": 0}
    kept_scores, same_prompt_scores, all_scores = [], [], [s.score for _p, s in flat]
    n_kept = n_pairs = 0
    sft_path, pairs_path = os.path.join(root, SFT_FILE), os.path.join(root, PAIRS_FILE)
    with open(f"{sft_path}.tmp", "w", encoding="utf-8") as sft, open(f"{pairs_path}.tmp", "w", encoding="utf-8") as prs:
        for pid in ids:
            prompt, samples = by_prompt[pid]
            for s in samples:
                if s.filtered:
                    filtered[s.filtered] += 1
            kept, pair, why = choose(samples, cfg)
            for j in kept:
                s = samples[j]
                sft.write(json.dumps({"messages": prompt + [{"role": "assistant", "content": s.text}],
                                      "score": s.score, "id": pid, "model": s.member}) + "\n")
                kept_scores.append(s.score)
            if kept:
                same_prompt_scores += [s.score for s in samples]
            n_kept += len(kept)
            if pair:
                c, r = samples[pair[0]], samples[pair[1]]
                prs.write(json.dumps({"prompt": prompt, "chosen": c.text, "rejected": r.text, "score_chosen": c.score,
                                      "score_rejected": r.score, "id": pid}) + "\n")
                n_pairs += 1
            elif why:
                no_pair[why] += 1
    os.replace(f"{sft_path}.tmp", sft_path)
    os.replace(f"{pairs_path}.tmp", pairs_path)
    drawn = len(flat)
    stats = {
        "stage": cfg.name, "prompts_sampled": len(ids), "drawn": drawn,
        "drawn_per_member": {label: sum(1 for _p, s in flat if s.member == label) for label in files},
        "truncated": sum(1 for _p, s in flat if s.truncated),
        "eligible": drawn - sum(filtered.values()), "filtered": filtered,
        "kept": n_kept, "prompts_with_kept": sum(1 for pid in ids if any(
            not s.filtered for s in by_prompt[pid][1])),
        "pairs": n_pairs, "no_pair": no_pair if cfg.pairs else {},
        "samples_per_kept": drawn / n_kept if n_kept else None,
        "reward_all": distribution(all_scores), "reward_kept": distribution(kept_scores),
        "reward_gain": (float(np.mean(kept_scores)) - float(np.mean(same_prompt_scores))) if kept_scores else None,
        "reward_models": scorer.dirs, "prompts": prompts_report or {},
    }
    if heldout_file:
        stats["heldout_reward"] = heldout_reward(heldout_file, scorer)
    with open(os.path.join(root, STATS_FILE), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    if not n_kept:
        raise ConfigError(f"[[stage]] {cfg.name}: no completion kept of {drawn} drawn (filtered: "
                          + ", ".join(f"{k} {v}" for k, v in filtered.items() if v)
                          + f"; see {os.path.join(root, STATS_FILE)}): a policy that never ends its replies needs "
                          "a larger max_new_tokens, or exclude_truncated = false")
    log(f"[{cfg.name}] drew {drawn}, kept {n_kept} ({stats['samples_per_kept'] or 0:.1f} samples per kept), "
        f"{n_pairs} pairs; reward all {stats['reward_all'].get('mean', 0):.3f}, kept "
        f"{stats['reward_kept'].get('mean', 0):.3f}"
        + (f", held-out {stats['heldout_reward']:.3f}" if heldout_file else "")
        + "; filtered: " + (", ".join(f"{k} {v}" for k, v in filtered.items() if v) or "none"))
    return stats


def heldout_reward(samples_file: str, scorer: RewardScorer) -> float:
    """The mean reward of a policy's samples (kiln generate's rows) on held-out prompts."""
    conversations = [row["prompt"] + [{"role": "assistant", "content": c["text"]}]
                     for row in _read_samples(samples_file) for c in row["completions"]]
    return float(scorer.score(conversations).mean()) if conversations else float("nan")
