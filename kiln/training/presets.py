"""Named model sizes: kiln's own ladder, the published architectures of the Llama 2 / 3.1,
Mistral, Qwen 2, Gemma 2 and Apple AFM reports, and a tiny CPU model of each family.

A preset is a table of `kiln.training.model.ModelConfig` fields; a recipe's explicit
fields override it. Paper sizes carry their vocabulary; the others leave `vocab_size`
at 0, so it is taken from the tokenizer / shards. `PUBLISHED` holds each paper size's
parameter count as its source states it, which tests/training/test_families.py checks
against the model built on the meta device (`kiln.training.model.count_params`).
"""

from __future__ import annotations

from dataclasses import dataclass

# Family bases: the fields every size of a paper's family shares.
LLAMA3 = dict(family="llama", vocab_size=128_256, rope_theta=500_000.0, rms_norm_eps=1e-5)
# Llama 2 kept Llama 1's architecture (Llama 2 report, 2.2) with a 4k context.
LLAMA2 = dict(family="llama", vocab_size=32_000, rope_theta=10_000.0, rms_norm_eps=1e-5,
              max_position_embeddings=4096)
# QKV bias is part of transformers' Qwen2 attention; RoPE's base is 1M after the report's
# long-context stage; the two small sizes tie their embeddings.
QWEN2 = dict(family="qwen2", rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32_768)
QWEN2_SMALL = dict(QWEN2, vocab_size=151_936, tie_embeddings=True)
QWEN2_LARGE = dict(QWEN2, vocab_size=152_064)
# Local (4096-token window) and global layers alternate; attention logits are soft-capped
# at 50 and final logits at 30 (Gemma 2 report, Table 1 and 2.2); embeddings tied.
GEMMA2 = dict(family="gemma2", vocab_size=256_000, rope_theta=10_000.0, rms_norm_eps=1e-6,
              max_position_embeddings=8192, tie_embeddings=True, sliding_window=4096, attn_softcap=50.0,
              final_softcap=30.0)

PRESETS: dict[str, dict] = {
    # kiln's ladder: Llama 3 8B's ratios (GQA, 8/3 MLP) at widths a CPU or one GPU trains
    # in minutes to hours; "1b" and "3b" are Llama 3.2's shapes, "8b" is Llama 3 8B's.
    "debug": dict(family="llama", hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2),
    "tiny": dict(family="llama", hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8, num_kv_heads=4),
    "small": dict(family="llama", hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                  num_kv_heads=4),
    "125m": dict(family="llama", hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                 num_kv_heads=4),
    "350m": dict(family="llama", hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16,
                 num_kv_heads=8),
    "1b": dict(family="llama", hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
               rope_theta=500_000.0, tie_embeddings=True),
    "3b": dict(family="llama", hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8,
               rope_theta=500_000.0, tie_embeddings=True),
    "8b": dict(family="llama", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
               rope_theta=500_000.0, max_position_embeddings=8192),

    # Llama 3 report (Dubey et al. 2024), Table 3. The 128k context of 3.1 comes from
    # continued training at 500k RoPE base; transformers' "llama3" RoPE scaling is not set.
    "llama3.1-8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14_336, num_layers=32, num_heads=32,
                        num_kv_heads=8, max_position_embeddings=131_072),
    "llama3.1-70b": dict(LLAMA3, hidden_size=8192, intermediate_size=28_672, num_layers=80, num_heads=64,
                         num_kv_heads=8, max_position_embeddings=131_072),
    "llama3.1-405b": dict(LLAMA3, hidden_size=16_384, intermediate_size=53_248, num_layers=126, num_heads=128,
                          num_kv_heads=8, max_position_embeddings=131_072),
    # Llama 2 report (Touvron et al. 2023b), Table 1: multi-head attention at 7B and 13B,
    # GQA with 8 key/value heads at 70B.
    "llama2-7b": dict(LLAMA2, hidden_size=4096, intermediate_size=11_008, num_layers=32, num_heads=32,
                      num_kv_heads=32),
    "llama2-13b": dict(LLAMA2, hidden_size=5120, intermediate_size=13_824, num_layers=40, num_heads=40,
                       num_kv_heads=40),
    "llama2-70b": dict(LLAMA2, hidden_size=8192, intermediate_size=28_672, num_layers=80, num_heads=64,
                       num_kv_heads=8),
    # Mistral 7B report (Jiang et al. 2023), Table 1: every layer attends over a 4096-token window.
    "mistral-7b": dict(family="mistral", vocab_size=32_000, hidden_size=4096, intermediate_size=14_336, num_layers=32,
                       num_heads=32, num_kv_heads=8, sliding_window=4096, max_position_embeddings=8192),
    # Qwen 2 report (Yang et al. 2024), Table 1.
    "qwen2-0.5b": dict(QWEN2_SMALL, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                       num_kv_heads=2),
    "qwen2-1.5b": dict(QWEN2_SMALL, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                       num_kv_heads=2),
    "qwen2-7b": dict(QWEN2_LARGE, hidden_size=3584, intermediate_size=18_944, num_layers=28, num_heads=28,
                     num_kv_heads=4),
    "qwen2-72b": dict(QWEN2_LARGE, hidden_size=8192, intermediate_size=29_568, num_layers=80, num_heads=64,
                      num_kv_heads=8),
    # Gemma 2 report (Gemma Team 2024), Table 1. The 27B scales queries by
    # (hidden / heads)^-1/2 = 144^-1/2 rather than by its head size 128 (2.2).
    "gemma2-2b": dict(GEMMA2, hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8, num_kv_heads=4,
                      head_dim=256),
    "gemma2-9b": dict(GEMMA2, hidden_size=3584, intermediate_size=14_336, num_layers=42, num_heads=16,
                      num_kv_heads=8, head_dim=256),
    "gemma2-27b": dict(GEMMA2, hidden_size=4608, intermediate_size=36_864, num_layers=46, num_heads=32,
                       num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144),
    # Apple AFM report (Gunter et al. 2024), 2: the on-device model, a Llama-style decoder
    # with a shared input/output embedding and a 49k vocabulary. The report does not give
    # the FFN width: 8064 (2.625 x 3072) is inferred from its 2.58B non-embedding
    # parameters. AFM's query/key RMSNorm is not modelled (transformers' Llama has none).
    "afm-3b": dict(family="llama", vocab_size=49_152, hidden_size=3072, intermediate_size=8064, num_layers=26,
                   num_heads=24, num_kv_heads=8, rope_theta=500_000.0, tie_embeddings=True,
                   max_position_embeddings=8192),

    # A tiny CPU model of each family, 0.7 to 1M non-embedding parameters; the vocabulary
    # is the shards'. Each keeps its family's traits (GQA ratio, MLP ratio, ties, windows).
    "llama3-tiny": dict(family="llama", hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                        num_kv_heads=2, rope_theta=500_000.0),
    "mistral-tiny": dict(family="mistral", hidden_size=128, intermediate_size=448, num_layers=4, num_heads=4,
                         num_kv_heads=1, sliding_window=32),
    "qwen2-tiny": dict(family="qwen2", hidden_size=128, intermediate_size=448, num_layers=4, num_heads=4,
                       num_kv_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_embeddings=True),
    # head_dim 64 with 4 heads: queries wider than the residual stream, as in Gemma 2 9B.
    "gemma2-tiny": dict(family="gemma2", hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, tie_embeddings=True, sliding_window=32,
                        attn_softcap=50.0, final_softcap=30.0),
    "afm-tiny": dict(family="llama", hidden_size=96, intermediate_size=252, num_layers=8, num_heads=3, num_kv_heads=1,
                     rope_theta=500_000.0, tie_embeddings=True),
}


@dataclass(frozen=True)
class Published:
    params: int  # total parameters as the source states them (tied embeddings counted once)
    source: str  # where the figure comes from
    non_embedding: int = 0  # the source's non-embedding count, where it gives an exact one (Gemma 2)
    tolerance: float = 0.01  # how far the built model may be from `params` (a fraction)


PUBLISHED: dict[str, Published] = {
    "llama3.1-8b": Published(8_000_000_000, "Llama 3 report, Table 3: 8B"),
    "llama3.1-70b": Published(70_000_000_000, "Llama 3 report, Table 3: 70B"),
    "llama3.1-405b": Published(405_000_000_000, "Llama 3 report, Table 3: 405B"),
    # Llama 2 names its sizes only to the billion; its 7B and 13B are Llama 1's shapes, whose
    # report gives one more digit.
    "llama2-7b": Published(6_700_000_000, "LLaMA report (Touvron et al. 2023a), Table 2: 6.7B, the same shape"),
    "llama2-13b": Published(13_000_000_000, "LLaMA report (Touvron et al. 2023a), Table 2: 13.0B, the same shape"),
    # No finer figure than "70B" is published; the released shape has 68.98B parameters,
    # 1.5 % under the name.
    "llama2-70b": Published(70_000_000_000, "Llama 2 report, Table 1: 70B (the size's name only)", tolerance=0.015),
    "mistral-7b": Published(7_300_000_000, "Mistral AI, 'Mistral 7B' announcement (Sep 2023): "
                            "'a 7.3B parameter model'"),
    "qwen2-0.5b": Published(490_000_000, "Qwen 2 release post (Jun 2024): 0.49B, 0.35B non-embedding"),
    "qwen2-1.5b": Published(1_540_000_000, "Qwen 2 release post: 1.54B, 1.31B non-embedding"),
    # The Qwen 2 post's 7.07B / 5.98B does not fit the released Qwen2-7B config (hidden
    # 3584, 28 layers, FFN 18944, untied 152064 vocabulary): that shape is Qwen2.5-7B's,
    # whose model card gives these two figures.
    "qwen2-7b": Published(7_610_000_000, "Qwen2.5-7B model card (the same shape): 7.61B, 6.53B non-embedding"),
    "qwen2-72b": Published(72_710_000_000, "Qwen 2 release post: 72.71B, 70.21B non-embedding"),
    # Table 2 gives exact counts. Its 2B and 9B embedding counts are 256,128 rows (a padded
    # vocabulary), the released checkpoints have 256,000: 294,912 and 458,752 fewer.
    "gemma2-2b": Published(590_118_912 + 2_024_517_888, "Gemma 2 report, Table 2: 590,118,912 embedding + "
                           "2,024,517,888 non-embedding", non_embedding=2_024_517_888),
    "gemma2-9b": Published(917_962_752 + 8_324_201_984, "Gemma 2 report, Table 2: 917,962,752 embedding + "
                           "8,324,201,984 non-embedding", non_embedding=8_324_201_984),
    "gemma2-27b": Published(1_179_648_000 + 26_047_480_320, "Gemma 2 report, Table 2: 1,179,648,000 embedding + "
                            "26,047,480,320 non-embedding", non_embedding=26_047_480_320),
    "afm-3b": Published(2_730_000_000, "AFM report, 2: 2.58B non-embedding + 0.15B embedding"),
}
