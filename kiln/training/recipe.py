"""Training recipes: a TOML file of ordered stages, as the Llama 3 / Qwen 2 / AFM
reports describe pretraining (core, then context lengthening in steps with RoPE's
base raised, then annealing on a high-quality mix with the LR to zero and an average
of the last checkpoints).

    [run]        output, shards, tokenizer, seed, ...     (RunConfig)
    [model]      preset = "debug", ...                    (kiln.training.model.ModelConfig)
    [parallel]   mixed_precision = "bf16", ...            (kiln.training.parallelize.ParallelConfig)
    [kernels]    backend = "auto" | "reference" | "liger" (kiln.kernels.KernelsConfig)
    [optimizer]  lr is per stage; betas, weight decay, clipping here   (OptimizerConfig)
    [[stage]]    name, mixture, tokens, seq_len, batch_size, schedule, ...   (StageConfig)

A stage's `kind` is "pretrain" (the default: token shards and a mixture) or a
post-training kind, "sft", "reward" or "dpo" (kiln.training.post: `data = PATH`,
`epochs`), which starts from the previous stage's export or from `from = "<stage>"`.

Every key is checked; the resolved recipe is printed and saved with each checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kiln.config import ConfigError, from_dict, load_toml
from kiln.kernels import KernelsConfig
from kiln.training.model import ModelConfig
from kiln.training.parallelize import ParallelConfig


@dataclass
class RunConfig:
    output: str = ""  # run directory: one NN_<stage>/ per stage (checkpoints/, final/, metrics.jsonl)
    shards: str = ""  # token shards directory (kiln curate tokenize; holds availability.json)
    tokenizer: str = ""  # tokenizer directory copied into exported models (optional)
    init: str = ""  # a Hugging Face model directory (safetensors) the first stage starts from; "" = fresh weights
    extra_shards: dict = field(default_factory=dict)  # {name = "DIR"}: more shards directories, each read as one domain of that name
    seed: int = 0  # model init and data order
    val_fraction: float = 0.01  # held-out share of each domain's documents for validation loss / bpb
    tensorboard: bool = False  # also write TensorBoard event files (needs the tensorboard package)
    log_every: int = 10  # steps between progress lines and metrics records


@dataclass
class OptimizerConfig:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas (Llama 3)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled decay on matrices (not norms, biases, embeddings' rows alike)
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)


@dataclass
class StageConfig:
    name: str = ""  # stage name: core, long_context_1, anneal, ...
    kind: str = "pretrain"  # "pretrain" (token shards) or post-training: "sft", "reward", "dpo" (kiln.training.post)
    start_from: str = ""  # `from` in the file: an earlier stage's name or a model directory ("" = the previous stage's export)
    mixture: str = ""  # contract-4 mixture TOML file, relative to the recipe
    weights: dict = field(default_factory=dict)  # or the mixture inline: {general = 0.7, code = 0.3}
    blend: dict = field(default_factory=dict)  # a second mixture drawn with probability blend_ratio, the rest of the stream unchanged (probes)
    blend_ratio: float = 0.0  # share of sequences from `blend`, in (0, 1)
    tokens: int = 0  # token budget of the stage
    seq_len: int = 256  # tokens per sequence
    batch_size: int = 8  # sequences per optimizer step, over all ranks
    batch_ramp: list[list[int]] = field(default_factory=list)  # [[tokens_seen, batch_size], ...]: larger batches later (Llama 3)
    micro_batch_size: int = 0  # sequences per forward on one rank (gradient accumulation); 0 = batch_size / ranks
    lr: float = 3e-4  # peak learning rate
    schedule: str = "cosine"  # "cosine" (warmup + cosine), "wsd" (warmup-stable-decay), "linear" (warmup, then linearly to 0)
    warmup: float = 0.0  # share of the stage's tokens spent warming up linearly from 0
    min_lr_ratio: float = 0.1  # cosine / wsd floor as a share of lr ("linear" always ends at 0)
    decay: float = 0.2  # wsd: share of the tokens in the final decay
    rope_theta: float = 0.0  # set RoPE's base at the start of this stage (0 = keep); context lengthening
    doc_masking: bool = False  # no attention between documents packed into one sequence (Llama 3)
    checkpoint_every: int = 50  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 0  # delete all but the newest K (0 = keep all; averaging needs the last K)
    average_last: int = 0  # end with the uniform average of the last K checkpoints (annealing)
    average: str = ""  # "ema": export the exponential moving average of the weights (Polyak) instead of the last step's
    ema_decay: float = 0.999  # with average = "ema": the average's weight on its past at each step
    eval_every: int = 50  # steps between validation passes (and one at the end)
    eval_batches: int = 4  # validation batches per domain
    # Post-training (kind sft / reward / dpo):
    data: str = ""  # JSONL / Parquet rows in TRL's formats (messages or prompt + completion; prompt + chosen + rejected)
    epochs: float = 0.0  # passes over the data's training rows; 0 = train for `tokens`
    holdout: float = 0.05  # share of the rows held out for the val/ measures (reward and DPO accuracy, SFT loss)
    val_data: str = ""  # or held-out rows from this file (then every row of `data` trains)
    packing: bool = True  # sft: conversations packed into each sequence, no attention across them
    overflow: str = "truncate"  # a row over seq_len: "truncate" (the prompt cut from the left, counted) or "drop" (counted)
    beta: float = 0.1  # dpo: strength of the KL anchor to the reference (Llama 3: 0.1)
    loss_type: str = "sigmoid"  # dpo: "sigmoid" (DPO), "ipo" or "hinge"
    nll_weight: float = 0.0  # dpo: weight of the NLL on the chosen responses (Llama 3: 0.2)
    mask_format_tokens: bool = False  # dpo: headers and <|eot_id|> out of both responses' log-probs (Llama 3)
    center_rewards: float = 0.0  # reward: coefficient of mean (r_chosen + r_rejected)^2, keeping rewards centred


@dataclass
class Recipe:
    run: RunConfig
    model: ModelConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    stages: list[StageConfig]
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    path: str = ""


SCHEDULES = ("cosine", "wsd", "linear")
KINDS = ("pretrain", "sft", "reward", "dpo")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def parse(data: dict, where: str = "recipe") -> Recipe:
    known = {"run", "model", "parallel", "optimizer", "kernels", "stage"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown section [{unknown[0]}] (known: {', '.join(sorted(known))})")
    stages_raw = data.get("stage", [])
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{where}: no [[stage]] tables: a recipe needs at least one stage")
    for s in stages_raw:  # `from` is a Python keyword: the field is start_from
        if isinstance(s, dict) and "from" in s:
            s["start_from"] = s.pop("from")
    recipe = Recipe(
        run=from_dict(RunConfig, data.get("run", {}), f"{where}: [run]"),
        model=from_dict(ModelConfig, data.get("model", {}), f"{where}: [model]"),
        parallel=from_dict(ParallelConfig, data.get("parallel", {}), f"{where}: [parallel]"),
        optimizer=from_dict(OptimizerConfig, data.get("optimizer", {}), f"{where}: [optimizer]"),
        kernels=from_dict(KernelsConfig, data.get("kernels", {}), f"{where}: [kernels]"),
        stages=[from_dict(StageConfig, s, f"{where}: [[stage]] #{i + 1}") for i, s in enumerate(stages_raw)],
        path=where,
    )
    if not recipe.run.output:
        raise ConfigError(f"{where}: [run] output is not set")
    kinds = {s.kind for s in recipe.stages}
    if "pretrain" in kinds and not recipe.run.shards:
        raise ConfigError(f"{where}: [run] shards is not set (pretraining stages read token shards)")
    if kinds - {"pretrain"} and not recipe.run.tokenizer:
        raise ConfigError(f"{where}: [run] tokenizer is not set (post-training stages render chats with it)")
    recipe.kernels.check(f"{where}: [kernels]")
    names = set()
    for i, s in enumerate(recipe.stages):
        at = f"{where}: [[stage]] {s.name or '#' + str(i + 1)}"
        if not s.name or s.name in names:
            raise ConfigError(f"{at}: every stage needs a unique name")
        if s.kind not in KINDS:
            raise ConfigError(f"{at}: kind {s.kind!r} is not one of {', '.join(KINDS)}")
        if s.start_from and s.start_from not in names and s.start_from in {t.name for t in recipe.stages}:
            raise ConfigError(f"{at}: from {s.start_from!r} is a later stage; a stage starts from an earlier one")
        names.add(s.name)
        if s.kind == "pretrain":
            _check_pretrain(s, at)
        else:
            _check_post(s, at)
        if s.schedule not in SCHEDULES:
            raise ConfigError(f"{at}: schedule {s.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if s.average not in ("", "ema") or not 0 < s.ema_decay < 1:
            raise ConfigError(f"{at}: average must be \"\" or \"ema\" with 0 < ema_decay < 1, got "
                              f"{s.average!r} and {s.ema_decay}")
        if s.average and s.average_last:
            raise ConfigError(f"{at}: average = \"ema\" and average_last both say what is exported: choose one")
        if s.average_last and s.keep_checkpoints and s.keep_checkpoints < s.average_last:
            raise ConfigError(f"{at}: average_last {s.average_last} needs keep_checkpoints >= it")
        for pair in s.batch_ramp:
            if len(pair) != 2 or pair[1] <= 0:
                raise ConfigError(f"{at}: batch_ramp entries are [tokens_seen, batch_size], got {pair}")
    return recipe


def _check_pretrain(s: StageConfig, at: str) -> None:
    if bool(s.mixture) == bool(s.weights):
        raise ConfigError(f"{at}: give either mixture (a file) or weights (inline), not {'both' if s.mixture else 'neither'}")
    if s.blend and not 0 < s.blend_ratio < 1:
        raise ConfigError(f"{at}: blend_ratio must be in (0, 1) with a blend, got {s.blend_ratio}")
    if s.tokens <= 0:
        raise ConfigError(f"{at}: tokens must be > 0 (the stage's token budget)")


def _check_post(s: StageConfig, at: str) -> None:
    if not s.data:
        raise ConfigError(f"{at}: a {s.kind} stage needs data = PATH (JSONL or Parquet)")
    if (s.epochs > 0) == (s.tokens > 0):
        raise ConfigError(f"{at}: give either epochs or tokens, not {'both' if s.epochs > 0 else 'neither'}")
    if s.overflow not in ("truncate", "drop"):
        raise ConfigError(f"{at}: overflow {s.overflow!r} is not 'truncate' or 'drop'")
    if s.loss_type not in LOSS_TYPES:
        raise ConfigError(f"{at}: loss_type {s.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not 0 <= s.holdout < 1:
        raise ConfigError(f"{at}: holdout must be in [0, 1), got {s.holdout}")


def load(path: str) -> Recipe:
    return parse(load_toml(path), where=str(path))


def batch_size_at(stage: StageConfig, tokens_seen: int) -> int:
    """Sequences per step after `tokens_seen` tokens of the stage (the last ramp entry
    whose threshold has been reached, else batch_size)."""
    size = stage.batch_size
    for threshold, value in sorted(stage.batch_ramp):
        if tokens_seen >= threshold:
            size = value
    return size


def lr_at(stage: StageConfig, tokens_seen: int) -> float:
    """The learning rate as a function of the tokens seen in the stage (not of the step:
    a batch ramp changes tokens per step)."""
    frac = min(tokens_seen / stage.tokens, 1.0)
    peak, floor = stage.lr, stage.lr * stage.min_lr_ratio
    if stage.warmup and frac < stage.warmup:
        return peak * frac / stage.warmup
    after = (frac - stage.warmup) / max(1e-12, 1 - stage.warmup)
    if stage.schedule == "linear":  # annealing: linearly to zero (Llama 3)
        return peak * (1 - after)
    if stage.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * after))
    # wsd: stable at peak, then linear decay to the floor over the last `decay` share
    start = 1 - stage.decay
    if frac < start:
        return peak
    return peak - (peak - floor) * (frac - start) / max(1e-12, stage.decay)
