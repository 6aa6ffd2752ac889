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
    [plan]       gpu, gpus, mfu, the report's published figures: `kiln plan` only (PlanConfig)
    [scale.X]    overlays for a smaller run: `--scale tiny` (kiln.config.apply_scale)

A stage's `kind` is "pretrain" (the default: token shards and a mixture) or a
post-training kind (kiln.training.post): "sft", "reward" and "dpo" (`data = PATH`,
`epochs`), "rejection_sampling" (samples from the policy or a committee, scored by
reward models: SFT rows and pairs, no training), "rloo" (on-policy RL with
leave-one-out baselines) and "distill" (a student trained on a teacher's
distributions). A stage starts from the policy: the previous policy stage's export
(reward and rejection-sampling stages do not make one), or `from = "<stage>"`.

References to models and files: `from`, `teacher`, `reward` and `committee` take a stage
name (its export) or a directory; `data`, `val_data` and `prompts` take a path or
`"@<stage>/<file>"`, a file an earlier stage wrote (`"@rs/sft.jsonl"`).

    [rounds]     count = N, stages = ["rs", "dpo"]: that block of stages N times
                 (Llama 3's rounds, Qwen 2's online DPO), outputs NN_<stage>_r<k>/

Every key is checked; the resolved recipe is printed and saved with each checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from kiln.config import ConfigError, apply_scale, from_dict, load_toml
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
    kind: str = "pretrain"  # "pretrain" (token shards) or post-training: "sft", "reward", "dpo", "rejection_sampling", "rloo", "distill"
    start_from: str = ""  # `from` in the file: an earlier stage's name or a model directory ("" = the previous stage's export)
    fresh: bool = False  # pretrain / distill: start from new weights of [model] (seeded by [run] seed), not the policy
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
    # Sampling (kind rejection_sampling and rloo; kiln.training.post.generate):
    prompts: str = ""  # prompts, JSONL / Parquet ("prompt": text or messages); held out: val_data's, or a holdout share
    committee: list[str] = field(default_factory=list)  # rejection_sampling: the models that propose (stage names or dirs); [] = the policy
    reward: list[str] = field(default_factory=list)  # reward models (stage names or dirs); several: their scores averaged
    samples: int = 4  # completions per prompt (per committee member): Llama 2 / 3 used 10-30
    temperature: float = 1.0  # sampling temperature (distill: the distillation temperature)
    top_p: float = 1.0  # nucleus sampling
    max_new_tokens: int = 128  # tokens per completion; one without <|eot_id|> by then is truncated
    min_length: int = 0  # rejection_sampling: completions of fewer tokens are filtered out
    require: str = ""  # rejection_sampling: a regex every kept completion must match
    forbid: str = ""  # rejection_sampling: a regex no kept completion may match
    exclude_truncated: bool = True  # rejection_sampling: truncated completions are never kept (but may be rejected)
    keep: str = "best"  # rejection_sampling: "best" (one per prompt) or "top_n"
    top_n: int = 1  # rejection_sampling with keep = "top_n": completions kept per prompt
    threshold: float | None = None  # rejection_sampling: keep only completions whose reward is at least this
    pairs: bool = True  # rejection_sampling: also write the best and the worst completion as a preference pair
    # RL (kind rloo):
    kl_coef: float = 0.01  # KL penalty to the reference (the starting weights), folded into the reward (Llama 2's PPO: 0.01)
    md_coef: float = 0.1  # mirror descent: weight of KL(sampling policy || policy) over a rollout's updates
    inner_steps: int = 2  # optimizer steps per rollout (the first on-policy, the rest held by md_coef)
    # Distillation (kind distill; data = SFT rows, or mixture / weights = pretraining shards):
    teacher: str = ""  # the teacher (a stage name or a model directory): same tokenizer, vocabulary at least the tokenizer's
    loss: str = "kl"  # distill: "kl" (Gemma 2), "top1_mix" (AFM: alpha x teacher top-1 + (1 - alpha) x label) or "jsd" (beta)
    alpha: float = 0.9  # distill top1_mix: weight of the teacher's top-1 token
    top_k: int = 0  # distill: keep the teacher's top-k logits, renormalised (0 = the full distribution)
    teacher_cache: bool = False  # distill: the teacher's top-k logits computed once to NN_<stage>/teacher/, teacher not resident while training


@dataclass
class PlanConfig:
    gpu: str = "H100"  # kiln plan: the GPU the run is sized for (H100, H200, A100, ...: kiln.training.metrics.PEAK_FLOPS)
    gpus: int = 8  # kiln plan: FSDP2 ranks (data-parallel GPUs) the run shards over
    mfu: float = 0.4  # kiln plan: model FLOPs utilisation assumed for GPU-hours (Llama 3 405B: 38-43 %)
    teacher_preset: str = ""  # kiln plan: a distill stage's teacher as a preset, when the teacher is not built yet
    published_flops: float = 0.0  # the report's training compute, printed beside kiln's total (0 = none given)
    published_gpu_hours: float = 0.0  # the report's GPU-hours (0 = none given)
    published_tokens: float = 0.0  # the report's training tokens (0 = none given)
    source: str = ""  # where the published figures come from


@dataclass
class Recipe:
    run: RunConfig
    model: ModelConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    stages: list[StageConfig]
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    rounds: RoundsConfig | None = None
    plan: PlanConfig = field(default_factory=PlanConfig)
    path: str = ""


@dataclass
class RoundsConfig:
    count: int = 1  # how many times the block runs
    stages: list[str] = field(default_factory=list)  # the block: consecutive stage names, in recipe order
    average_last: int = 0  # rounds after the first start from the uniform average of the last K rounds' policies (0 = the last one's)


SCHEDULES = ("cosine", "wsd", "linear")
KINDS = ("pretrain", "sft", "reward", "dpo", "rejection_sampling", "rloo", "distill")
POLICY_KINDS = ("pretrain", "sft", "dpo", "rloo", "distill")  # kinds whose export is the next stage's policy
DATA_KINDS = ("sft", "reward", "dpo")
SAMPLING_KINDS = ("rejection_sampling", "rloo")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
DISTILL_LOSSES = ("kl", "top1_mix", "jsd")


def parse(data: dict, where: str = "recipe") -> Recipe:
    known = {"run", "model", "parallel", "optimizer", "kernels", "stage", "rounds", "plan"}
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
        plan=from_dict(PlanConfig, data.get("plan", {}), f"{where}: [plan]"),
        path=where,
    )
    recipe.model.given_keys = frozenset(data.get("model", {}))  # explicit [model] keys beat the preset's
    if "rounds" in data:
        recipe.rounds = from_dict(RoundsConfig, data["rounds"], f"{where}: [rounds]")
        recipe.stages = expand_rounds(recipe.stages, recipe.rounds, where)
    if not recipe.run.output:
        raise ConfigError(f"{where}: [run] output is not set")
    kinds = {s.kind for s in recipe.stages}
    if any(s.kind == "pretrain" or (s.kind == "distill" and not s.data) for s in recipe.stages) \
            and not recipe.run.shards:
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
        _check_references(recipe, i, at)
        if s.fresh and (s.start_from or s.kind not in ("pretrain", "distill")):
            raise ConfigError(f"{at}: fresh = true starts a pretrain or distill stage from new weights; it cannot "
                              "have a from")
        names.add(s.name)
        if s.kind == "pretrain":
            _check_pretrain(s, at)
        elif s.kind in DATA_KINDS:
            _check_post(s, at)
        elif s.kind in SAMPLING_KINDS:
            _check_sampling(s, at)
        else:
            _check_distill(s, at)
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
    first = s.batch_ramp[0][1] if s.batch_ramp and s.batch_ramp[0][0] <= 0 else s.batch_size
    if s.tokens < first * s.seq_len:
        raise ConfigError(f"{at}: tokens {s.tokens:,} is less than one step (batch_size {first} x seq_len "
                          f"{s.seq_len}): the stage would take zero steps")


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


def _check_sampling(s: StageConfig, at: str) -> None:
    if not s.prompts:
        raise ConfigError(f"{at}: a {s.kind} stage needs prompts = PATH (JSONL or Parquet)")
    if not s.reward:
        raise ConfigError(f"{at}: a {s.kind} stage needs reward = [a reward stage's name or a reward model directory]")
    if s.samples < 1 or s.max_new_tokens < 1 or not 0 < s.top_p <= 1:
        raise ConfigError(f"{at}: samples and max_new_tokens must be >= 1 and top_p in (0, 1], got {s.samples}, "
                          f"{s.max_new_tokens}, {s.top_p}")
    if not 0 <= s.holdout < 1:
        raise ConfigError(f"{at}: holdout must be in [0, 1), got {s.holdout}")
    if s.kind == "rejection_sampling":
        if s.keep not in ("best", "top_n") or s.top_n < 1:
            raise ConfigError(f"{at}: keep must be \"best\" or \"top_n\" with top_n >= 1, got {s.keep!r}, {s.top_n}")
        if s.pairs and s.samples * max(1, len(s.committee)) < 2:
            raise ConfigError(f"{at}: pairs = true needs at least 2 completions per prompt (samples = {s.samples} "
                              f"from {max(1, len(s.committee))} model(s)): raise samples or set pairs = false")
        for key in ("require", "forbid"):
            try:
                re.compile(getattr(s, key))
            except re.error as e:
                raise ConfigError(f"{at}: {key} is not a regular expression: {e}") from e
        return
    if s.samples < 2:
        raise ConfigError(f"{at}: rloo needs samples >= 2 (the leave-one-out baseline of one sample is the others')")
    if s.inner_steps < 1 or s.checkpoint_every % s.inner_steps:
        raise ConfigError(f"{at}: inner_steps must be >= 1 and divide checkpoint_every (a checkpoint falls between "
                          f"rollouts), got {s.inner_steps} and {s.checkpoint_every}")
    if (s.epochs > 0) == (s.tokens > 0):
        raise ConfigError(f"{at}: give either epochs (passes over the prompts) or tokens, not "
                          f"{'both' if s.epochs > 0 else 'neither'}")


def _check_distill(s: StageConfig, at: str) -> None:
    if not s.teacher:
        raise ConfigError(f"{at}: a distill stage needs teacher = (a stage name or a model directory)")
    if s.loss not in DISTILL_LOSSES:
        raise ConfigError(f"{at}: loss {s.loss!r} is not one of {', '.join(DISTILL_LOSSES)}")
    if not 0 <= s.alpha <= 1 or not 0 <= s.beta <= 1 or s.temperature <= 0:
        raise ConfigError(f"{at}: alpha and beta must be in [0, 1] and temperature > 0, got {s.alpha}, {s.beta}, "
                          f"{s.temperature}")
    if s.teacher_cache and not s.top_k:
        raise ConfigError(f"{at}: teacher_cache stores the teacher's top-k logits: set top_k (e.g. 64)")
    if s.data:
        if s.mixture or s.weights:
            raise ConfigError(f"{at}: a distill stage reads SFT rows (data) or token shards (mixture / weights), "
                              "not both")
        _check_post(s, at)
    else:
        _check_pretrain(s, at)


def _check_references(recipe: Recipe, i: int, at: str) -> None:
    """Stage names in `from`, `teacher`, `reward`, `committee` and "@stage/" paths name
    earlier stages of a fitting kind; anything else is a path, checked when it is read."""
    s, earlier = recipe.stages[i], {t.name: t for t in recipe.stages[:i]}
    later = {t.name for t in recipe.stages[i:]}

    def check(key: str, ref: str, kinds: tuple[str, ...]) -> None:
        if ref in later:
            raise ConfigError(f"{at}: {key} {ref!r} is this or a later stage; a stage reads an earlier one's output")
        if ref in earlier and earlier[ref].kind not in kinds:
            raise ConfigError(f"{at}: {key} {ref!r} is a {earlier[ref].kind} stage, not one of {', '.join(kinds)}")

    if s.start_from:
        check("from", s.start_from, POLICY_KINDS + ("reward",) if s.kind == "reward" else POLICY_KINDS)
    if s.teacher:
        check("teacher", s.teacher, POLICY_KINDS)
    for ref in s.reward:
        check("reward", ref, ("reward",))
    for ref in s.committee:
        check("committee", ref, POLICY_KINDS)
    for key in ("data", "val_data", "prompts"):
        value = getattr(s, key)
        if value.startswith("@"):
            name = value[1:].split("/", 1)[0]
            if "/" not in value or name not in earlier and name not in later:
                raise ConfigError(f"{at}: {key} {value!r}: \"@<stage>/<file>\" must name a stage of this recipe")
            check(key, name, KINDS)


def expand_rounds(stages: list[StageConfig], rounds: RoundsConfig, where: str) -> list[StageConfig]:
    """The recipe's stages with the [rounds] block repeated `count` times: round k's
    copy of stage S is named S_r<k>, and its references to stages of the block (from,
    reward, committee, teacher, "@stage/" paths) name round k's copies."""
    at = f"{where}: [rounds]"
    names = [s.name for s in stages]
    if rounds.count < 1 or not rounds.stages:
        raise ConfigError(f"{at}: count must be >= 1 and stages a non-empty list of stage names")
    missing = [n for n in rounds.stages if n not in names]
    if missing:
        raise ConfigError(f"{at}: stage {missing[0]!r} is not a [[stage]] of the recipe")
    first = names.index(rounds.stages[0])
    if names[first:first + len(rounds.stages)] != rounds.stages:
        raise ConfigError(f"{at}: stages {rounds.stages} must be consecutive stages, in recipe order")
    block = set(rounds.stages)

    def ref(name: str, k: int) -> str:
        return f"{name}_r{k}" if name in block else name

    def path(value: str, k: int) -> str:
        if not value.startswith("@") or "/" not in value:
            return value
        name, rest = value[1:].split("/", 1)
        return f"@{ref(name, k)}/{rest}"

    out = stages[:first]
    for k in range(1, rounds.count + 1):
        for s in stages[first:first + len(rounds.stages)]:
            out.append(dataclasses.replace(
                s, name=f"{s.name}_r{k}", start_from=ref(s.start_from, k) if s.start_from else "",
                teacher=ref(s.teacher, k) if s.teacher else "", reward=[ref(r, k) for r in s.reward],
                committee=[ref(c, k) for c in s.committee], data=path(s.data, k), val_data=path(s.val_data, k),
                prompts=path(s.prompts, k)))
    return out + stages[first + len(rounds.stages):]


def round_of(name: str, rounds: RoundsConfig | None) -> int:
    """The round (1-based) a stage of the expanded recipe belongs to; 0 outside the block."""
    if rounds is None:
        return 0
    base, _, k = name.rpartition("_r")
    return int(k) if base in rounds.stages and k.isdigit() else 0


def load(path: str, scale: str | None = None) -> Recipe:
    """The recipe file at `scale` (None or "paper": as written; else its [scale.<name>]
    overlay, kiln.config.apply_scale)."""
    where = str(path) if scale in (None, "", "paper") else f"{path} (scale {scale})"
    return parse(apply_scale(load_toml(path), scale, str(path)), where=where)


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
