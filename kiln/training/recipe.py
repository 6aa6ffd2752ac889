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
    eval_every: int = 50  # steps between validation passes (and one at the end)
    eval_batches: int = 4  # validation batches per domain


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


def parse(data: dict, where: str = "recipe") -> Recipe:
    known = {"run", "model", "parallel", "optimizer", "kernels", "stage"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown section [{unknown[0]}] (known: {', '.join(sorted(known))})")
    stages_raw = data.get("stage", [])
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{where}: no [[stage]] tables: a recipe needs at least one stage")
    recipe = Recipe(
        run=from_dict(RunConfig, data.get("run", {}), f"{where}: [run]"),
        model=from_dict(ModelConfig, data.get("model", {}), f"{where}: [model]"),
        parallel=from_dict(ParallelConfig, data.get("parallel", {}), f"{where}: [parallel]"),
        optimizer=from_dict(OptimizerConfig, data.get("optimizer", {}), f"{where}: [optimizer]"),
        kernels=from_dict(KernelsConfig, data.get("kernels", {}), f"{where}: [kernels]"),
        stages=[from_dict(StageConfig, s, f"{where}: [[stage]] #{i + 1}") for i, s in enumerate(stages_raw)],
        path=where,
    )
    for key in ("output", "shards"):
        if not getattr(recipe.run, key):
            raise ConfigError(f"{where}: [run] {key} is not set")
    recipe.kernels.check(f"{where}: [kernels]")
    names = set()
    for i, s in enumerate(recipe.stages):
        at = f"{where}: [[stage]] {s.name or '#' + str(i + 1)}"
        if not s.name or s.name in names:
            raise ConfigError(f"{at}: every stage needs a unique name")
        names.add(s.name)
        if bool(s.mixture) == bool(s.weights):
            raise ConfigError(f"{at}: give either mixture (a file) or weights (inline), not {'both' if s.mixture else 'neither'}")
        if s.blend and not 0 < s.blend_ratio < 1:
            raise ConfigError(f"{at}: blend_ratio must be in (0, 1) with a blend, got {s.blend_ratio}")
        if s.tokens <= 0:
            raise ConfigError(f"{at}: tokens must be > 0 (the stage's token budget)")
        if s.schedule not in SCHEDULES:
            raise ConfigError(f"{at}: schedule {s.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if s.average_last and s.keep_checkpoints and s.keep_checkpoints < s.average_last:
            raise ConfigError(f"{at}: average_last {s.average_last} needs keep_checkpoints >= it")
        for pair in s.batch_ramp:
            if len(pair) != 2 or pair[1] <= 0:
                raise ConfigError(f"{at}: batch_ramp entries are [tokens_seen, batch_size], got {pair}")
    return recipe


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
