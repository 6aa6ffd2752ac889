"""Llama-architecture decoders through transformers, from a ~1M-parameter debug model to 8B.

The model is transformers' own `LlamaForCausalLM` (GQA, RoPE with a configurable
theta, RMSNorm, SwiGLU), or `MistralForCausalLM` when a sliding attention window is
asked for (Mistral / Gemma 2 style local attention), so kiln's checkpoints are
ordinary Hugging Face model directories. This file knows nothing of parallelism:
kernels, FSDP2, activation checkpointing and compile are applied in `parallelize.py`.

Training does not call the transformers model's own `forward` with labels:
`CausalLM.forward` takes the decoder's hidden states (`hf.model(...)`) and computes
the loss through `kiln.kernels.linear_cross_entropy`, which never materializes the
(tokens x vocab) logits.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from kiln.config import ConfigError
from kiln.kernels import KernelsConfig, linear_cross_entropy


@dataclass
class ModelConfig:
    preset: str = ""  # a named size (see PRESETS); the fields below override it
    vocab_size: int = 0  # 0 = the tokenizer's / shards' vocabulary size, rounded up to a multiple of 64
    hidden_size: int = 64  # model width
    intermediate_size: int = 176  # SwiGLU hidden width (Llama: about 8/3 x hidden, rounded)
    num_layers: int = 2  # decoder layers
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA; = num_heads for plain multi-head attention)
    rope_theta: float = 10_000.0  # RoPE base; raised for long context (Llama 3: 500k)
    max_position_embeddings: int = 2048  # longest sequence the RoPE cache is built for
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share input embedding and lm_head (small models often do)
    sliding_window: int = 0  # >0: local attention over this many tokens (Mistral / Gemma 2 style)
    init_std: float = 0.02  # normal init of linear and embedding weights


# Named sizes. Llama 3 8B is the paper's; the small ones keep its ratios (GQA, 8/3 MLP)
# at widths a CPU or one GPU trains in minutes to hours.
PRESETS: dict[str, dict] = {
    "debug": dict(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8, num_kv_heads=4),
    "small": dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=4),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4),
    "350m": dict(hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16, num_kv_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
               rope_theta=500_000.0, tie_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8,
               rope_theta=500_000.0, tie_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
               rope_theta=500_000.0, max_position_embeddings=8192),
}


def resolve(cfg: ModelConfig, vocab_size: int = 0, where: str = "[model]") -> ModelConfig:
    """The config with its preset applied (explicit fields win) and the vocabulary set."""
    base = ModelConfig()
    values = dataclasses.asdict(cfg)
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise ConfigError(f"{where} preset: unknown {cfg.preset!r} (known: {', '.join(PRESETS)})")
        for key, value in PRESETS[cfg.preset].items():
            if values[key] == getattr(base, key):  # not set explicitly
                values[key] = value
    out = ModelConfig(**values)
    if not out.vocab_size:
        if not vocab_size:
            raise ConfigError(f"{where} vocab_size: not set and no tokenizer/shards to take it from")
        out.vocab_size = -(-vocab_size // 64) * 64  # a multiple of 64 keeps the lm_head matmul aligned
    if out.hidden_size % out.num_heads:
        raise ConfigError(f"{where}: hidden_size {out.hidden_size} is not a multiple of num_heads {out.num_heads}")
    if out.num_heads % out.num_kv_heads:
        raise ConfigError(f"{where}: num_heads {out.num_heads} is not a multiple of num_kv_heads {out.num_kv_heads}")
    return out


def hf_config(cfg: ModelConfig):
    from transformers import LlamaConfig, MistralConfig

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                  initializer_range=cfg.init_std, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  attn_implementation="sdpa")
    if cfg.sliding_window:
        return MistralConfig(sliding_window=cfg.sliding_window, **common)
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


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean mask: causal, and no attention across the documents packed
    into one sequence (Llama 3). transformers takes a 4D mask as given."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


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
        mask = document_mask(segment_ids) if segment_ids is not None else None
        hidden = self.hf.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # (B, T, C)
        return linear_cross_entropy(hidden.flatten(0, 1), self.hf.lm_head.weight, labels.flatten(),
                                    chunk_size=self.kernels.ce_chunk_size, backend=self.kernels.backend)


def config_of(hf_config) -> ModelConfig:
    """The ModelConfig of a Hugging Face config that `hf_config` built (an exported
    model's): what a run that starts from that model trains, for its FLOPs and checks."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", ModelConfig.rope_theta))
    return ModelConfig(vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
                       intermediate_size=hf_config.intermediate_size, num_layers=hf_config.num_hidden_layers,
                       num_heads=hf_config.num_attention_heads, num_kv_heads=hf_config.num_key_value_heads,
                       rope_theta=float(theta), max_position_embeddings=hf_config.max_position_embeddings,
                       rms_norm_eps=hf_config.rms_norm_eps, tie_embeddings=bool(hf_config.tie_word_embeddings),
                       sliding_window=getattr(hf_config, "sliding_window", None) or 0,
                       init_std=hf_config.initializer_range)
