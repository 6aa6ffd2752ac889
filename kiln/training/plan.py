"""`kiln plan`: what a recipe costs at the scale it names, without training it.

For each stage of a training recipe (or of a system directory's pretrain.toml and
post.toml): the model's parameters, the stage's tokens, its FLOPs, the memory each GPU
holds under kiln's FSDP2 settings and the GPU-hours at a stated MFU on a named GPU,
with the totals and, where the report gives them, the published figures beside them.

FLOPs per trained token are `6 N + attention` (Kaplan et al.; PaLM appendix B):
N the parameters that take part in matrix multiplies (the decoder's and the output
projection's: an untied input embedding is a lookup), and attention's scores and
values `12 d_attn x (positions each token attends to)` per layer, which for causal
attention over S positions is S/2 on average (FlashAttention's convention) and for a
sliding window w about w. A forward-only pass (a reference model, a teacher) costs a
third of that. The MFU-style count torchtitan logs during training
(`kiln.training.metrics.flops_per_token`) does not halve attention for the causal
mask; this plan does, because it estimates work done rather than utilisation.

Memory per GPU, FSDP2 with fp32 master weights (kiln's `mixed_precision = "bf16"`):
parameters, gradients and AdamW's two moments in fp32, sharded over the ranks (16
bytes per parameter / ranks); the gathered compute-dtype weights of the root module
(embeddings, lm_head) and of two decoder layers at a time (one running, one
prefetched); activations of one micro-batch, estimated per token and layer as the
tensors a Llama-style block keeps for backward with a fused attention kernel (no S x S
scores; after Korthikanti et al. 2022): `4 H + 3 d_attn + 3 d_kv + 4 F` values in
the compute dtype. With activation checkpointing only each layer's input is kept,
plus one layer's full activations while it is recomputed. The loss is chunked
(kiln.kernels), so no (tokens x vocabulary) logits are counted. Estimates, not
measurements: the allocator's fragmentation and communication buffers add to them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from kiln.config import ConfigError
from kiln.training.metrics import PEAK_FLOPS
from kiln.training.model import ModelConfig, build_model, resolve
from kiln.training.recipe import Recipe, StageConfig, batch_size_at, load

# Memory of the GPUs PEAK_FLOPS names, GiB.
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "A100": 80, "L40S": 48, "A10": 24, "L4": 24}
FORWARD_ONLY = 1 / 3  # a forward pass is a third of a training step's 6N


@dataclass
class Shape:
    """What the plan needs of a model: parameter counts and the attention geometry."""

    total: int  # every parameter once (tied embeddings once)
    embedding: int  # the input embedding
    matmul: int  # parameters in matrix multiplies per token (decoder + output projection)
    layer: int  # one decoder layer's parameters
    num_layers: int
    hidden: int
    d_attn: int  # query heads x head_dim
    d_kv: int  # key/value heads x head_dim
    ffn: int
    windows: list[int]  # per layer: its sliding window, 0 = global attention

    @classmethod
    def of(cls, cfg: ModelConfig) -> Shape:
        model = build_model(cfg, device="meta")  # no memory: shapes only
        config = model.config
        total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
        embedding = model.get_input_embeddings().weight.numel()
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        layer = sum(p.numel() for p in model.model.layers[0].parameters())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        window = getattr(config, "sliding_window", None) or 0
        types = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] \
            * config.num_hidden_layers
        return cls(total=total, embedding=embedding, matmul=total if tied else total - embedding, layer=layer,
                   num_layers=config.num_hidden_layers, hidden=config.hidden_size,
                   d_attn=config.num_attention_heads * head_dim, d_kv=config.num_key_value_heads * head_dim,
                   ffn=config.intermediate_size,
                   windows=[window if t == "sliding_attention" else 0 for t in types])

    def attended(self, seq_len: int, window: int) -> float:
        """Mean positions a token attends to in a causal sequence of seq_len (window 0 = all)."""
        if not window or window >= seq_len:
            return (seq_len + 1) / 2
        return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: forward and backward (3x a forward)."""
        attention = sum(12 * self.d_attn * self.attended(seq_len, w) for w in self.windows)
        return 6 * self.matmul + attention

    def activation_bytes_per_token_layer(self, dtype_bytes: int) -> int:
        return dtype_bytes * (4 * self.hidden + 3 * self.d_attn + 3 * self.d_kv + 4 * self.ffn)


@dataclass
class StagePlan:
    name: str
    kind: str
    params: int
    tokens: int | None  # None: set by the data (epochs over a dataset this plan does not read)
    seq_len: int
    flops_per_token: float
    flops: float | None
    gpu_hours: float | None
    memory_gib: dict  # params_grads_optimizer, gathered_weights, activations, activations_checkpointed, total, ...
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    recipes: list[str]
    gpu: str
    gpus: int
    mfu: float
    stages: list[StagePlan]
    published: dict  # the report's figures ([plan] published_*), compared only at the paper scale
    scale: str = "paper"

    def total(self) -> dict:
        known = [s for s in self.stages if s.flops is not None]
        gpu_hours = sum(s.gpu_hours for s in known)
        return {"params": max(s.params for s in self.stages), "tokens": sum(s.tokens or 0 for s in self.stages),
                "flops": sum(s.flops for s in known), "gpu_hours": gpu_hours, "days": gpu_hours / self.gpus / 24,
                "stages_without_a_budget": [s.name for s in self.stages if s.flops is None]}

    def to_json(self) -> dict:
        return {"recipes": self.recipes, "scale": self.scale, "gpu": self.gpu, "gpus": self.gpus, "mfu": self.mfu,
                "stages": [dataclasses.asdict(s) for s in self.stages], "total": self.total(),
                "published": self.published}


def model_config(recipe: Recipe) -> ModelConfig:
    """The recipe's model, resolved: a preset's vocabulary, or the tokenizer's where the
    recipe takes it from its data (a tiny scale)."""
    vocab = 0
    if not recipe.model.vocab_size:
        from kiln.training.train import tokenizer_vocab

        tok = recipe.run.tokenizer
        if tok and os.path.exists(tok):
            vocab = tokenizer_vocab(recipe)
    try:
        return resolve(recipe.model, vocab_size=vocab, where=f"{recipe.path}: [model]")
    except ConfigError as e:
        raise ConfigError(f"{e} (kiln plan reads the vocabulary from [model] vocab_size or an existing "
                          "[run] tokenizer)") from e


def teacher_shape(recipe: Recipe, i: int, student: ModelConfig, shapes: dict) -> Shape | None:
    """A distill stage's teacher: an earlier stage's model (the run's own), a model
    directory that exists, or [plan] teacher_preset."""
    from kiln.training.model import config_of

    s = recipe.stages[i]
    if s.teacher in [t.name for t in recipe.stages[:i]]:
        return shapes["student"]
    if os.path.isfile(os.path.join(s.teacher, "config.json")):
        from transformers import AutoConfig

        return Shape.of(config_of(AutoConfig.from_pretrained(s.teacher)))
    if recipe.plan.teacher_preset:
        cfg = resolve(ModelConfig(preset=recipe.plan.teacher_preset, vocab_size=student.vocab_size),
                      where=f"{recipe.path}: [plan] teacher_preset")
        return Shape.of(cfg)
    return None


def plan_stage(recipe: Recipe, i: int, shape: Shape, teacher: Shape | None, gpus: int, peak: float,
               mfu: float, gpu_memory: float) -> StagePlan:
    s = recipe.stages[i]
    notes = []
    per_token = shape.flops_per_token(s.seq_len)
    if s.kind == "dpo":
        per_token += FORWARD_ONLY * shape.flops_per_token(s.seq_len)  # the reference model's forward
        notes.append("tokens count chosen and rejected responses; + the reference model's forward")
    elif s.kind == "distill":
        if teacher is None:
            notes.append(f"teacher {s.teacher!r} is not built and [plan] teacher_preset is not set: "
                         "its forward is not counted")
        elif not s.teacher_cache:
            per_token += FORWARD_ONLY * teacher.flops_per_token(s.seq_len)
            notes.append("+ the teacher's forward")
        else:
            notes.append("teacher logits precomputed (teacher_cache): their one forward pass is not counted")
    elif s.kind in ("rejection_sampling", "rloo"):
        notes.append("generation cost depends on the prompts: set tokens to budget it")
    tokens = s.tokens if s.tokens > 0 and s.kind != "rejection_sampling" else None
    if tokens is None and s.kind != "rejection_sampling":
        notes.append(f"epochs = {s.epochs:g} over the data: tokens set by the dataset")
    flops = per_token * tokens if tokens is not None else None
    gpu_hours = flops / (peak * mfu) / 3600 if flops is not None else None
    memory = memory_gib(recipe, s, shape, gpus)
    checkpointing = recipe.parallel.activation_checkpointing
    need = memory["total_checkpointed" if checkpointing else "total"]
    if need > gpu_memory:
        if not checkpointing and memory["total_checkpointed"] <= gpu_memory:
            notes.append(f"{need:.0f} GiB per GPU does not fit {gpu_memory:.0f} GiB: set [parallel] "
                         "activation_checkpointing = true")
        else:
            notes.append(f"{memory['total_checkpointed']:.0f} GiB per GPU with activation checkpointing does not "
                         f"fit {gpu_memory:.0f} GiB: a smaller micro-batch, more GPUs, or the tensor / pipeline / "
                         "context parallelism kiln does not have")
    return StagePlan(name=s.name, kind=s.kind, params=shape.total, tokens=tokens, seq_len=s.seq_len,
                     flops_per_token=per_token, flops=flops, gpu_hours=gpu_hours, memory_gib=memory, notes=notes)


def memory_gib(recipe: Recipe, s: StageConfig, shape: Shape, gpus: int) -> dict:
    """Bytes per GPU under FSDP2 over `gpus` ranks (module docstring), in GiB."""
    dtype_bytes = 2 if recipe.parallel.mixed_precision == "bf16" else 4
    micro = s.micro_batch_size or max(1, math.ceil(batch_size_at(s, s.tokens) / gpus))  # the ramp's last batch
    tokens = micro * s.seq_len
    if s.kind == "dpo":
        tokens *= 2  # a micro-batch of pairs: chosen and rejected rows
    states = 16 * shape.total / gpus  # fp32 weights, gradients, AdamW m and v
    root = shape.total - shape.layer * shape.num_layers
    gathered = dtype_bytes * (root + 2 * shape.layer)
    per_layer = shape.activation_bytes_per_token_layer(dtype_bytes) * tokens
    activations = per_layer * shape.num_layers
    checkpointed = dtype_bytes * shape.hidden * tokens * shape.num_layers + per_layer
    gib = 2**30
    out = {"micro_batch": micro, "params_grads_optimizer": states / gib, "gathered_weights": gathered / gib,
           "activations": activations / gib, "activations_checkpointed": checkpointed / gib}
    out["total"] = out["params_grads_optimizer"] + out["gathered_weights"] + out["activations"]
    out["total_checkpointed"] = out["params_grads_optimizer"] + out["gathered_weights"] + checkpointed / gib
    return out


def plan_recipes(paths: list[str], scale: str | None, gpu: str | None = None, gpus: int | None = None,
                 mfu: float | None = None) -> Plan:
    """The plan of one or more training recipes (a system's pretrain then post), the
    first recipe's [plan] settings unless given."""
    recipes = [load(p, scale) for p in paths]
    settings = recipes[0].plan
    gpu, gpus, mfu = gpu or settings.gpu, gpus or settings.gpus, mfu or settings.mfu
    if gpu not in PEAK_FLOPS:
        raise ConfigError(f"{recipes[0].path}: [plan] gpu {gpu!r}: known GPUs are {', '.join(PEAK_FLOPS)}")
    if not 0 < mfu <= 1 or gpus < 1:
        raise ConfigError(f"{recipes[0].path}: [plan] mfu must be in (0, 1] and gpus >= 1, got {mfu}, {gpus}")
    stages = []
    for recipe in recipes:
        cfg = model_config(recipe)
        shapes = {"student": Shape.of(cfg)}
        for i, s in enumerate(recipe.stages):
            teacher = teacher_shape(recipe, i, cfg, shapes) if s.kind == "distill" else None
            stages.append(plan_stage(recipe, i, shapes["student"], teacher, gpus, PEAK_FLOPS[gpu], mfu,
                                     GPU_MEMORY_GIB.get(gpu, math.inf)))
    published = {k: v for k, v in dataclasses.asdict(settings).items()
                 if k.startswith("published_") or k == "source"}
    return Plan(recipes=[r.path for r in recipes], gpu=gpu, gpus=gpus, mfu=mfu, stages=stages, published=published,
                scale=scale or "paper")


def system_recipes(path: str) -> list[str]:
    """A recipe file, or a system directory's training recipes (teacher.toml, pretrain.toml,
    post.toml: those present, in that order)."""
    if os.path.isdir(path):
        names = ("teacher.toml", "pretrain.toml", "post.toml")
        found = [os.path.join(path, f) for f in names if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise ConfigError(f"{path}: a system directory holds {', '.join(names)}; none is there")
        return found
    return [path]


def human(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def render(plan: Plan) -> str:
    total = plan.total()
    lines = [f"kiln plan: {', '.join(plan.recipes)}",
             f"{plan.gpus} x {plan.gpu} ({human(PEAK_FLOPS[plan.gpu], 'FLOP/s')} bf16 peak, "
             f"{GPU_MEMORY_GIB.get(plan.gpu, '?')} GiB) at MFU {plan.mfu:.0%}; FSDP2, fp32 master weights", "",
             f"{'stage':<22} {'kind':<18} {'params':>7} {'tokens':>8} {'seq':>7} {'FLOPs':>9} {'GPU-h':>8} "
             f"{'GiB/GPU':>8} {'w/ AC':>7}   (GiB/GPU: without activation checkpointing; w/ AC: with)"]
    for s in plan.stages:
        m = s.memory_gib
        flops = f"{s.flops:.3g}" if s.flops is not None else "-"
        lines.append(f"{s.name:<22} {s.kind:<18} {human(s.params):>7} {human(s.tokens):>8} {s.seq_len:>7} "
                     f"{flops:>9} {human(s.gpu_hours):>8} {m['total']:>8.1f} {m['total_checkpointed']:>7.1f}")
        for note in s.notes:
            lines.append(f"{'':<24}{note}")
    lines += ["", f"total: {human(total['params'])} parameters, {human(total['tokens'])} tokens, "
                  f"{total['flops']:.3g} FLOPs, {human(total['gpu_hours'])} GPU-hours "
                  f"({total['days']:,.1f} days on {plan.gpus} GPUs)"]
    p = plan.published if plan.scale == "paper" else {}
    for key, label, ours in (("published_flops", "FLOPs", total["flops"]),
                             ("published_gpu_hours", "GPU-hours", total["gpu_hours"]),
                             ("published_tokens", "tokens", total["tokens"])):
        if p.get(key):
            lines.append(f"published {label}: {p[key]:.3g} (kiln's total is {ours / p[key]:.2f}x)")
    if p.get("source"):
        lines.append(f"source: {p['source']}")
    if total["stages_without_a_budget"]:
        lines.append("not in the totals (their cost is set by data): " + ", ".join(total["stages_without_a_budget"]))
    return "\n".join(lines)


def to_json(plan: Plan) -> str:
    return json.dumps(plan.to_json(), indent=2)
