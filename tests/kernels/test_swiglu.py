"""SwiGLU: the reference against a naive version and LlamaMLP's activation (what the model
runs off CUDA), and (on CUDA) Liger's op, which the model runs there, against it."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import reference
from tests.kernels.common import DTYPES, ELEMENTWISE_TOL, LIGER_TOL, cuda_only, grads, leaf, reference_and_liger


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_naive_and_llama_mlp(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    gate, up = (torch.randn(3, 7, 35) * 2).to(dtype), torch.randn(3, 7, 35).to(dtype)
    g, u = leaf(gate), leaf(up)
    out = reference.swiglu(g, u)
    gg, gu = grads(out, (g, u))
    gn, un = leaf(gate), leaf(up)
    # silu(x) = x * sigmoid(x), written out in fp32 and rounded once, as PyTorch's silu
    # kernel does: chained bf16 ops would round its gradient's two terms separately and
    # lose the result where they cancel (near gate = -1.28).
    gf = gn.float()
    out_n = (gf * torch.sigmoid(gf)).to(dtype) * un
    ggn, gun = grads(out_n, (gn, un))
    torch.testing.assert_close(out, out_n, **ELEMENTWISE_TOL[dtype])
    torch.testing.assert_close(gg, ggn, **ELEMENTWISE_TOL[dtype])
    torch.testing.assert_close(gu, gun, **ELEMENTWISE_TOL[dtype])

    # What LlamaMLP computes between its projections: act_fn(gate) * up, bitwise.
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=35, num_attention_heads=2, hidden_act="silu"))
    gh, uh = leaf(gate), leaf(up)
    out_h = mlp.act_fn(gh) * uh
    ggh, guh = grads(out_h, (gh, uh))
    torch.testing.assert_close(out, out_h, atol=0, rtol=0)
    torch.testing.assert_close((gg, gu), (ggh, guh), atol=0, rtol=0)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_swiglu_matches_reference(dtype):
    torch.manual_seed(0)
    gate, up = torch.randn(3, 7, 35, device="cuda").to(dtype), torch.randn(3, 7, 35, device="cuda").to(dtype)
    (out_r, g_r), (out_l, g_l) = reference_and_liger(lambda impl, a, b: impl.swiglu(a, b), (gate, up))
    torch.testing.assert_close(out_l, out_r, **LIGER_TOL[dtype])
    torch.testing.assert_close(g_l, g_r, **LIGER_TOL[dtype])
