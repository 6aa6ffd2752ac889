"""Decoders of four families through transformers' own classes, from a ~1M-parameter
debug model to the papers' sizes.

`family` picks the class, so kiln's checkpoints are ordinary Hugging Face model
directories:

- "llama": `LlamaForCausalLM` (GQA, RoPE with a configurable base, RMSNorm, SwiGLU):
  Llama 2 / 3 and Apple's AFM (whose QK-norm is not modelled).
- "mistral": `MistralForCausalLM`, the same with every layer attending over a sliding
  window of `sliding_window` tokens.
- "qwen2": `Qwen2ForCausalLM`, Llama's layout with a bias on the query, key and value
  projections.
- "gemma2": `Gemma2ForCausalLM`: GeGLU (tanh GELU), tied embeddings scaled by
  sqrt(hidden) inside the model, RMSNorm before and after attention and MLP, local
  (sliding-window) and global layers alternating, attention and final logits
  soft-capped (cap x tanh(x / cap)), and a free query scale (`query_pre_attn_scalar`).

Presets live in `kiln.training.presets`. This file knows nothing of parallelism:
kernels, FSDP2, activation checkpointing and compile are applied in `parallelize.py`.

Training does not call the transformers model's own `forward` with labels:
`CausalLM.forward` takes the decoder's hidden states (`hf.model(...)`) and computes
the loss through `kiln.kernels.linear_cross_entropy`, which never materializes the
(tokens x vocab) logits; Gemma 2's final soft-cap is passed to it (`final_softcap`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from kiln.config import ConfigError
from kiln.kernels import KernelsConfig, linear_cross_entropy
from kiln.training.presets import PRESETS

FAMILIES = ("llama", "mistral", "qwen2", "gemma2")
# The features only some families have, and which: a recipe asking another family for one is refused.
LOCAL_ATTENTION = ("mistral", "gemma2")
GEMMA2_ONLY = ("attn_softcap", "final_softcap", "query_pre_attn_scalar")


@dataclass
class ModelConfig:
    preset: str = ""  # a named size (kiln.training.presets); the fields below override it
    family: str = "llama"  # "llama" | "mistral" | "qwen2" | "gemma2": the transformers class (module docstring)
    vocab_size: int = 0  # 0 = the tokenizer's / shards' vocabulary size, rounded up to a multiple of 64
    hidden_size: int = 64  # model width
    intermediate_size: int = 176  # gated MLP hidden width (Llama: about 8/3 x hidden, rounded)
    num_layers: int = 2  # decoder layers
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA; = num_heads for plain multi-head attention)
    head_dim: int = 0  # width of one head; 0 = hidden_size / num_heads (Gemma 2 2B: 256 with hidden 2304, 8 heads)
    rope_theta: float = 10_000.0  # RoPE base; raised for long context (Llama 3: 500k)
    max_position_embeddings: int = 2048  # longest sequence the RoPE cache is built for
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share input embedding and lm_head (small models often do)
    sliding_window: int = 0  # >0: local attention over this many tokens; mistral: every layer, gemma2: every other
    attn_softcap: float = 0.0  # >0: attention logits soft-capped at this value (Gemma 2: 50)
    final_softcap: float = 0.0  # >0: output logits soft-capped at this value (Gemma 2: 30)
    # Queries are scaled by query_pre_attn_scalar^-1/2 (Gemma 2; 0 = head_dim). An integer:
    # transformers' Gemma2Config is strictly typed.
    query_pre_attn_scalar: int = 0
    init_std: float = 0.02  # normal init of linear and embedding weights


def resolve(cfg: ModelConfig, vocab_size: int = 0, where: str = "[model]") -> ModelConfig:
    """The config with its preset applied (explicit fields win) and the vocabulary set;
    a feature the family lacks is an error naming the key."""
    base = ModelConfig()
    values = dataclasses.asdict(cfg)
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise ConfigError(f"{where} preset: unknown {cfg.preset!r} (known: {', '.join(PRESETS)})")
        # The keys a recipe's [model] table gave (kiln.training.recipe.parse records them)
        # win over the preset even at a field's default value (rope_theta = 10000 on a
        # preset whose base is 1e6); without that record, a field at its default is unset.
        given = getattr(cfg, "given_keys", None)
        for key, value in PRESETS[cfg.preset].items():
            if (key not in given) if given is not None else values[key] == getattr(base, key):
                values[key] = value
        # Applied: every field now says what it is, so a resolved config read back from a
        # checkpoint or copied (a probe's base) resolves to itself, explicit keys and all.
        values["preset"] = ""
    out = ModelConfig(**values)
    if not out.vocab_size:
        if not vocab_size:
            raise ConfigError(f"{where} vocab_size: not set and no tokenizer/shards to take it from")
        out.vocab_size = -(-vocab_size // 64) * 64  # a multiple of 64 keeps the lm_head matmul aligned
    if out.hidden_size % out.num_heads:
        raise ConfigError(f"{where}: hidden_size {out.hidden_size} is not a multiple of num_heads {out.num_heads}")
    if out.num_heads % out.num_kv_heads:
        raise ConfigError(f"{where}: num_heads {out.num_heads} is not a multiple of num_kv_heads {out.num_kv_heads}")
    check_family(out, where)
    return out


def check_family(cfg: ModelConfig, where: str = "[model]") -> None:
    if cfg.family not in FAMILIES:
        raise ConfigError(f"{where} family: unknown {cfg.family!r} (known: {', '.join(FAMILIES)})")
    for key in ("head_dim", "sliding_window", *GEMMA2_ONLY):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{where} {key}: must be >= 0 (0 = off / the default), got {getattr(cfg, key)}")
    if cfg.head_dim % 2:
        raise ConfigError(f"{where} head_dim: RoPE rotates pairs of channels, so it must be even, got {cfg.head_dim}")
    if cfg.sliding_window and cfg.family not in LOCAL_ATTENTION:
        raise ConfigError(f"{where} sliding_window: family {cfg.family!r} has no local attention; use family "
                          '"mistral" (every layer local) or "gemma2" (local and global layers alternating)')
    if cfg.family == "gemma2" and not cfg.sliding_window:
        raise ConfigError(f"{where} sliding_window: family 'gemma2' alternates local and global layers and needs "
                          "the local window (Gemma 2: 4096)")
    for key in GEMMA2_ONLY:
        if getattr(cfg, key) and cfg.family != "gemma2":
            raise ConfigError(f"{where} {key}: only family 'gemma2' has it, not {cfg.family!r}")
    # transformers' Qwen2 config has no head width: it is always hidden / heads.
    if cfg.head_dim and cfg.family == "qwen2" and cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        raise ConfigError(f"{where} head_dim: family 'qwen2' has head_dim = hidden_size / num_heads "
                          f"({cfg.hidden_size // cfg.num_heads}), not {cfg.head_dim}")


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


def attention_width(cfg: ModelConfig) -> int:
    """Query heads x head width: what attention's FLOPs scale with (Gemma 2 2B: 8 x 256 =
    2048 with hidden 2304)."""
    return cfg.num_heads * head_dim(cfg)


def hf_config(cfg: ModelConfig):
    """The transformers config of a resolved ModelConfig (bos/eos/pad unset: kiln's data
    decides them)."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                  initializer_range=cfg.init_std, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  attn_implementation="sdpa")
    if cfg.family == "qwen2":
        return Qwen2Config(**common)
    common["head_dim"] = head_dim(cfg)
    if cfg.family == "gemma2":
        # transformers' Gemma 2 has no SDPA path (SDPA cannot soft-cap attention logits):
        # "eager" on CPU; on CUDA, flash_attention_2 or flex_attention also soft-cap.
        common["attn_implementation"] = "eager"
        return Gemma2Config(sliding_window=cfg.sliding_window, attn_logit_softcapping=cfg.attn_softcap or None,
                            final_logit_softcapping=cfg.final_softcap or None,
                            query_pre_attn_scalar=cfg.query_pre_attn_scalar or head_dim(cfg),
                            hidden_activation="gelu_pytorch_tanh", **common)
    if cfg.family == "mistral":
        return MistralConfig(sliding_window=cfg.sliding_window or None, **common)
    return LlamaConfig(**common)


def build_model(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu"):
    """A freshly initialised model in fp32 (parallelize.py decides the compute dtype)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.float32)
    return model


def num_params(model, exclude_embeddings: bool = True) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n


def count_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Parameters of the model a resolved config builds, counted on the meta device (no
    memory): all of them, a tied embedding once; or, with `non_embedding`, without the
    input embedding and an untied output head (the papers' "non-embedding" count)."""
    model = build_model(cfg, device="meta")
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.get_input_embeddings().weight.numel()
        if not cfg.tie_embeddings:
            n -= model.get_output_embeddings().weight.numel()
    return n


def set_rope_theta(model, theta: float) -> None:
    """Raise RoPE's base for a context-lengthening stage (Llama 3: 500k; Qwen 2: 10k to
    1M). The rotary embedding caches inverse frequencies computed from the config, so
    both the config and that cache are updated."""
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    params["rope_theta"] = theta
    config.rope_parameters = params
    rotary = model.model.rotary_emb
    fresh = type(rotary)(config)  # transformers' own init function for the rope type
    with torch.no_grad():
        rotary.inv_freq.copy_(fresh.inv_freq)
        rotary.original_inv_freq.copy_(fresh.original_inv_freq)
    rotary.attention_scaling = fresh.attention_scaling


def save_hf(model, out_dir: str, tokenizer_dir: str = "") -> None:
    """A Hugging Face model directory (config.json + safetensors) that
    `AutoModelForCausalLM.from_pretrained` loads; the tokenizer files are copied beside it."""
    import shutil

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_dir:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
        add_chat_template(out_dir)


def add_chat_template(directory: str) -> bool:
    """Store kiln's chat format (kiln.formats.chat) in the directory's
    tokenizer_config.json when its tokenizer.json has the format's tokens and no template
    is set, so `AutoTokenizer.from_pretrained(directory).apply_chat_template` renders
    it. tokenizer.json itself (whose hash the shards record) is not touched. Returns
    whether a template was added."""
    import json

    from tokenizers import Tokenizer

    from kiln.formats.chat import BOS, CHAT_TEMPLATE, END_HEADER, EOT, START_HEADER

    tok_file, cfg_file = os.path.join(directory, "tokenizer.json"), os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(tok_file):
        return False
    tok = Tokenizer.from_file(tok_file)
    if any(tok.token_to_id(t) is None for t in (BOS, START_HEADER, END_HEADER, EOT)):
        return False
    config = {}
    if os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as f:
            config = json.load(f)
    if config.get("chat_template") or os.path.isfile(os.path.join(directory, "chat_template.jinja")):
        return False
    config["chat_template"] = CHAT_TEMPLATE
    config.setdefault("bos_token", BOS)
    with open(cfg_file, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return True


def document_mask(segment_ids: torch.Tensor, window: int = 0) -> torch.Tensor:
    """(B, 1, T, T) boolean mask: causal, and no attention across the documents packed
    into one sequence (Llama 3); with `window` > 0 also local, a query attending to itself
    and the window - 1 tokens before it (transformers' sliding-window rule)."""
    T = segment_ids.shape[1]
    position = torch.arange(T, device=segment_ids.device)
    distance = position[:, None] - position[None, :]  # (T, T): query minus key position
    allowed = distance >= 0
    if window:
        allowed &= distance < window
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return (same & allowed)[:, None]


def packed_attention_mask(config, segment_ids: torch.Tensor):
    """The `attention_mask` a transformers decoder of `config` takes for packed documents.

    transformers uses a 4D mask as given, so the sliding window that it would otherwise
    add itself must be in the mask: Mistral's layers all get the local mask; Gemma 2's
    forward takes one mask per layer type, {"full_attention": ..., "sliding_attention":
    ...}. The eager attention (Gemma 2's) adds the mask to the scores: it gets 0 where
    attention is allowed and fp32's lowest value elsewhere, as transformers' own eager mask."""
    window = getattr(config, "sliding_window", None) or 0
    layer_types = set(getattr(config, "layer_types", None) or [])
    full = document_mask(segment_ids)
    if not window:
        mask = full
    elif "full_attention" in layer_types:
        mask = {"full_attention": full, "sliding_attention": document_mask(segment_ids, window)}
    else:
        mask = document_mask(segment_ids, window)
    if getattr(config, "_attn_implementation", None) != "eager":
        return mask

    def additive(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros(m.shape, device=m.device).masked_fill_(~m, torch.finfo(torch.float32).min)

    return {k: additive(m) for k, m in mask.items()} if isinstance(mask, dict) else additive(mask)


def final_softcap(model_or_config) -> float:
    """The final-logit soft-cap of a transformers model or config (Gemma 2's
    `final_logit_softcapping`), 0 when it has none: what kiln's fused losses take as
    `softcap`, so they see the logits the model's own forward computes."""
    config = getattr(model_or_config, "config", model_or_config)
    return float(getattr(config, "final_logit_softcapping", None) or 0.0)


class CausalLM(torch.nn.Module):
    """The training view of a Hugging Face causal LM: `forward` returns the mean
    next-token loss through `kiln.kernels.linear_cross_entropy`. The loss is computed
    here, inside the module FSDP2 wraps at the root, so lm_head's weight is gathered
    when the fused cross-entropy reads it."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        # The loss's backend and chunk; "auto" until parallelize() applies the recipe's [kernels].
        self.kernels = KernelsConfig()

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.hf.model.layers

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        mask = packed_attention_mask(self.hf.config, segment_ids) if segment_ids is not None else None
        hidden = self.hf.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # (B, T, C)
        return linear_cross_entropy(hidden.flatten(0, 1), self.hf.lm_head.weight, labels.flatten(),
                                    chunk_size=self.kernels.ce_chunk_size, backend=self.kernels.backend,
                                    softcap=final_softcap(self.hf))


def config_of(hf_config) -> ModelConfig:
    """The ModelConfig of a Hugging Face config that `hf_config` built (an exported
    model's): what a run that starts from that model trains, for its FLOPs and checks.
    Fields at their default come back as 0 (head_dim = hidden / heads, the query scale =
    head_dim), so `config_of(hf_config(cfg)) == cfg` for a resolved cfg without preset."""
    family = hf_config.model_type
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r}: kiln trains the families {', '.join(FAMILIES)}")
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", ModelConfig.rope_theta))
    width = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    scalar = getattr(hf_config, "query_pre_attn_scalar", None) or width
    return ModelConfig(family=family, vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
                       intermediate_size=hf_config.intermediate_size, num_layers=hf_config.num_hidden_layers,
                       num_heads=hf_config.num_attention_heads, num_kv_heads=hf_config.num_key_value_heads,
                       head_dim=0 if width == hf_config.hidden_size // hf_config.num_attention_heads else width,
                       rope_theta=float(theta), max_position_embeddings=hf_config.max_position_embeddings,
                       rms_norm_eps=hf_config.rms_norm_eps, tie_embeddings=bool(hf_config.tie_word_embeddings),
                       sliding_window=getattr(hf_config, "sliding_window", None) or 0,
                       attn_softcap=float(getattr(hf_config, "attn_logit_softcapping", None) or 0.0),
                       final_softcap=final_softcap(hf_config),
                       query_pre_attn_scalar=0 if scalar == width else int(scalar),
                       init_std=hf_config.initializer_range)
