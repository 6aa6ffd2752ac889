"""RoPE: the reference against a naive per-pair rotation and transformers'
apply_rotary_pos_emb (what the model runs off CUDA), and (on CUDA) Liger's op, which the
model runs there, against it."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import reference
from tests.kernels.common import DTYPES, ELEMENTWISE_TOL, LIGER_TOL, cuda_only, grads, leaf, reference_and_liger


def llama_cos_sin(batch: int, seq: int, head_dim: int, dtype):
    """cos/sin (B, T, D) from transformers' own LlamaRotaryEmbedding, at shifted positions."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=64)
    rope = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(seq)[None].repeat(batch, 1) + torch.arange(batch)[:, None] * 5
    x = torch.zeros(batch, seq, head_dim, dtype=dtype)
    return rope(x, pos)


def naive_rope(x, cos, sin):
    """The rotation written per pair (i, i + D/2): (a, b) -> (a cos - b sin, b cos + a sin)."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]  # the two halves of cos/sin are equal
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rope_matches_naive_and_transformers(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 3, 6, 3, 7, 18  # GQA, odd sequence length, head_dim not a power of 2
    q, k = torch.randn(B, Hq, T, D).to(dtype), torch.randn(B, Hkv, T, D).to(dtype)
    cos, sin = llama_cos_sin(B, T, D, dtype)
    assert cos.shape == (B, T, D) and cos.dtype == dtype
    qr, kr = leaf(q), leaf(k)
    out_q, out_k = reference.apply_rope(qr, kr, cos, sin)
    gq, gk = grads((out_q, out_k), (qr, kr))
    qn, kn = leaf(q), leaf(k)
    nq, nk = naive_rope(qn, cos, sin), naive_rope(kn, cos, sin)
    gqn, gkn = grads((nq, nk), (qn, kn))
    for got, want in ((out_q, nq), (out_k, nk), (gq, gqn), (gk, gkn)):
        torch.testing.assert_close(got, want, **ELEMENTWISE_TOL[dtype])

    qh, kh = leaf(q), leaf(k)
    hq, hk = apply_rotary_pos_emb(qh, kh, cos, sin)
    ghq, ghk = grads((hq, hk), (qh, kh))
    torch.testing.assert_close((out_q, out_k, gq, gk), (hq, hk, ghq, ghk), atol=0, rtol=0)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_rope_matches_reference(dtype):
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 3, 6, 3, 7, 18
    q, k = torch.randn(B, Hq, T, D, device="cuda").to(dtype), torch.randn(B, Hkv, T, D, device="cuda").to(dtype)
    cos, sin = (c.cuda() for c in llama_cos_sin(B, T, D, dtype))
    (out_r, g_r), (out_l, g_l) = reference_and_liger(lambda impl, a, b: impl.apply_rope(a, b, cos, sin), (q, k))
    torch.testing.assert_close(out_l, out_r, **LIGER_TOL[dtype])
    torch.testing.assert_close(g_l, g_r, **LIGER_TOL[dtype])
