"""On-policy RL with leave-one-out baselines (kind = "rloo"): Apple AFM's MDLOO in its
simple form, the RLHF row of AFM, Gemma 2 and Llama 2.

Each rollout: `samples` (K) completions per prompt from the current policy
(kiln.training.post.generate), scored by the reward model(s); the reward is shaped by
the KL to the reference (the stage's starting weights), r - kl_coef x sum_t (log pi_old
- log pi_ref) (Llama 2's PPO used kl_coef 0.01); the advantage of each sample is its
shaped reward minus the mean of its K - 1 siblings' (no value network). The policy then
takes `inner_steps` optimizer steps on the rollout: the first is REINFORCE on the
sampling weights, the later ones reweight by pi / pi_old and are held near the sampling
policy by md_coef x KL(pi_old || pi), mirror descent's step-size anchor
(kiln.kernels.rloo_loss).

Why RLOO stands in for PPO: the same KL-regularised objective, without PPO's value
network (a second model as large as the policy, trained alongside) or its clipping
heuristics; with K samples per prompt the leave-one-out baseline does the variance
reduction the value network was for (Ahmadian et al. 2024).

Logged per step: train/reward (the reward models' mean, unshaped), train/kl (per
sample, to the reference), train/entropy (mean -log pi_old of the sampled tokens, an
unbiased estimate of the per-token entropy), train/md_kl, train/length,
train/truncated. Held out: val/rloo/reward, the mean reward of the policy's samples on
held-out prompts (the same seeds every time).

The reference is a frozen copy of the starting weights on every rank (not sharded), and
each rank samples its own prompts with the policy gathered for the call (`gathered`).

Resume: a checkpoint falls between rollouts (checkpoint_every is a multiple of
inner_steps), and a rollout's randomness is keyed by its number, so a resumed stage
draws the rollouts the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import numpy as np
import torch

from kiln.kernels import linear_logprobs, rloo_advantages, rloo_loss
from kiln.training.distributed import World, all_reduce_mean
from kiln.training.model import CausalLM, final_softcap
from kiln.training.parallelize import ParallelConfig
from kiln.training.post.data import IGNORE

SAMPLER_FORMAT = "kiln-rloo-sampler-v1"


@contextlib.contextmanager
def gathered(model):
    """The root module's own parameters (embeddings, final norm, lm_head) gathered while
    `model.hf.generate` runs: generate calls the inner model, so FSDP2's root pre-forward
    hook, which would gather them, never fires. The decoder layers gather themselves."""
    if hasattr(model, "unshard"):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


class PolicyLM(CausalLM):
    """The policy: forward computes the RLOO loss of a rollout's rows."""

    def __init__(self, hf_model, md_coef: float):
        super().__init__(hf_model)
        self.md_coef = md_coef

    def token_logps(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.hf.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return linear_logprobs(hidden, self.hf.lm_head.weight, targets, chunk_size=self.kernels.ce_chunk_size,
                               backend=self.kernels.backend, softcap=final_softcap(self.hf))

    def forward(self, input_ids, targets, old_logps, advantages):
        logps = self.token_logps(input_ids, targets)
        return rloo_loss(logps, old_logps, targets != IGNORE, advantages, self.md_coef)


class PromptSampler:
    """Prompts for rollouts: each optimizer step takes `accum` micro-batches of `micro`
    prompts per rank, and each rollout's prompts serve `inner_steps` consecutive steps.
    A batch is {"index": prompt indices, "draw": the rollout micro-batch's number}."""

    def __init__(self, n: int, seed: int, accum: int, inner_steps: int, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.accum, self.inner_steps = n, seed, accum, inner_steps
        self.rank, self.world_size = rank, world_size
        self.calls = 0  # micro-batches given by this rank

    def _prompt(self, position: int) -> int:
        epoch, at = divmod(position, self.n)
        return int(np.random.default_rng([self.seed, epoch]).permutation(self.n)[at])

    def next_batch(self, k: int) -> dict:
        step, m = divmod(self.calls, self.accum)
        draw = (step // self.inner_steps) * self.accum + m
        base = (draw * self.world_size + self.rank) * k
        self.calls += 1
        return {"index": torch.tensor([self._prompt(base + j) for j in range(k)]), "draw": torch.tensor(draw)}

    def state_dict(self) -> dict:
        return {"format": SAMPLER_FORMAT, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != SAMPLER_FORMAT:
            raise ValueError(f"not an RLOO sampler state: {state.get('format')!r}")
        self.calls = int(state["calls"])

    def metrics(self) -> dict:
        return {}


def rollout_rows(prompts, completions, eot: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, T) right-padded ids of prompt + completion (+ <|eot_id|> when it ended) and
    targets: the completion's tokens (and its <|eot_id|>), IGNORE elsewhere."""
    rows = []
    for p, cs in zip(prompts, completions):
        for c in cs:
            response = c.ids + ([] if c.truncated else [eot])
            ids = p.ids + response
            targets = [IGNORE] * (len(p.ids) - 1) + response + [IGNORE]
            rows.append((ids, targets))
    width = max(len(ids) for ids, _t in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for j, (ids, t) in enumerate(rows):
        input_ids[j, :len(ids)] = torch.tensor(ids)
        targets[j, :len(ids)] = torch.tensor(t[:len(ids)])
    return input_ids, targets


class Rollouts:
    """The forward of an rloo stage: draws (and keeps, for its inner steps) each rollout
    micro-batch, then computes the loss on it."""

    def __init__(self, prompts, tok, scorer, reference: PolicyLM, cfg, seed: int, accum: int, world: World):
        self.prompts, self.tok, self.scorer, self.reference = prompts, tok, scorer, reference
        self.cfg, self.seed, self.accum, self.world = cfg, seed, accum, world
        self.eot = tok.tok.token_to_id("<|eot_id|>")
        self.cache: dict[int, dict] = {}

    @torch.no_grad()
    def draw(self, model: PolicyLM, index: list[int], draw: int) -> dict:
        from kiln.training.post.generate import sample
        from kiln.training.post.rejection import sampling_config

        prompts = [self.prompts[i] for i in index]
        cfg = self.cfg
        sampling = dataclasses.replace(sampling_config(cfg, self.seed), batch_size=len(index) * cfg.samples)
        model.eval()
        with gathered(model):
            completions = [cs for _p, cs in sample(model.hf, self.tok, prompts, sampling, salt=f"rollout-{draw}")]
        device = self.world.device
        input_ids, targets = rollout_rows(prompts, completions, self.eot, self.tok.pad_id)
        input_ids, targets = input_ids.to(device), targets.to(device)
        old = model.token_logps(input_ids, targets)
        ref = self.reference.token_logps(input_ids, targets)
        model.train()
        rewards = torch.tensor(self.scorer.score([p.messages + [{"role": "assistant", "content": c.text}]
                                                  for p, cs in zip(prompts, completions) for c in cs]).mean(0),
                               dtype=torch.float32, device=device)
        mask = targets != IGNORE
        kl = ((old - ref) * mask).sum(-1)  # (R,) per sample, to the reference
        shaped = rewards - cfg.kl_coef * kl
        advantages = rloo_advantages(shaped.view(len(prompts), cfg.samples)).flatten()
        lengths = torch.tensor([len(c.ids) for cs in completions for c in cs], dtype=torch.float32)
        truncated = torch.tensor([float(c.truncated) for cs in completions for c in cs])
        return {"input_ids": input_ids, "targets": targets, "old": old, "advantages": advantages,
                "metrics": {"reward": rewards.mean(), "kl": kl.mean(),
                            "entropy": -(old * mask).sum() / mask.sum().clamp(min=1),
                            "advantage_std": advantages.std(), "length": lengths.mean(),
                            "truncated": truncated.mean()}}

    def __call__(self, model, b) -> tuple[torch.Tensor, dict]:
        draw = int(b["draw"])
        if draw not in self.cache:
            for old in sorted(self.cache)[:max(0, len(self.cache) + 1 - self.accum)]:
                del self.cache[old]  # the micro-batches of the current rollout stay
            self.cache[draw] = self.draw(model, b["index"].tolist(), draw)
        r = self.cache[draw]
        loss, metrics = model(r["input_ids"], r["targets"], r["old"], r["advantages"])
        return loss, {**r["metrics"], **metrics}


class RewardValidator:
    """val/rloo/reward: the mean reward of the policy's samples on held-out prompts."""

    def __init__(self, prompts, tok, scorer, cfg, seed: int, world: World):
        self.prompts, self.tok, self.scorer, self.cfg, self.seed, self.world = prompts, tok, scorer, cfg, seed, world

    @torch.no_grad()
    def run(self, model, parallel: ParallelConfig) -> dict:
        from kiln.training.post.generate import sample
        from kiln.training.post.rejection import sampling_config

        if not self.prompts:
            return {}
        sampling = sampling_config(self.cfg, self.seed)
        model.eval()
        with gathered(model):
            conversations = [p.messages + [{"role": "assistant", "content": c.text}]
                             for p, cs in sample(model.hf, self.tok, self.prompts, sampling, salt="heldout")
                             for c in cs]
        model.train()
        return {"val/rloo/reward": all_reduce_mean(float(self.scorer.score(conversations).mean()), self.world)}


def setup(cfg, hf, tok, world: World, micro: int, seed: int, log, parallelize_fn):
    """(model, sampler, forward, validator, items) of an rloo stage; `items` counts the
    optimizer steps' worth of prompts one epoch makes (x inner_steps)."""
    from kiln.training.post.data import split
    from kiln.training.post.generate import read_prompts
    from kiln.training.post.rejection import RewardScorer

    where = f"[[stage]] {cfg.name}"
    context = hf.config.max_position_embeddings
    prompts, report = read_prompts(cfg.prompts, tok, context, cfg.max_new_tokens)
    log(f"[{cfg.name}] prompts {report.describe()}")
    if cfg.val_data:
        held, _ = read_prompts(cfg.val_data, tok, context, cfg.max_new_tokens)
        train = prompts
    else:
        train_idx, val_idx = split(len(prompts), cfg.holdout, seed)
        train, held = [prompts[i] for i in train_idx], [prompts[i] for i in val_idx]
    scorer = RewardScorer(cfg.reward, tok.dir, world.device, where, resident=True)  # checked before any rollout
    reference = PolicyLM(copy.deepcopy(hf), 0.0).to(world.device).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    model = parallelize_fn(PolicyLM(hf, cfg.md_coef))
    reference.kernels = model.kernels
    accum = cfg.batch_size // (micro * world.size)
    sampler = PromptSampler(len(train), seed, accum, cfg.inner_steps, world.rank, world.size)
    forward = Rollouts(train, tok, scorer, reference, cfg, seed, accum, world)
    validator = RewardValidator(held, tok, scorer, cfg, seed + 1, world)
    return model, sampler, forward, validator, len(train) * cfg.inner_steps
