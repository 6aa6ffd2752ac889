"""RMSNorm: the reference against a naive version and transformers' LlamaRMSNorm (what the
model runs off CUDA), and (on CUDA) Liger's op, which the model runs there, against it."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import reference
from tests.kernels.common import (DTYPES, ELEMENTWISE_TOL, LIGER_REDUCED_TOL, LIGER_TOL, REDUCED_TOL, cuda_only,
                                  grads, leaf, reference_and_liger)


def naive_rms_norm(x, w, eps):
    xf = x.float()
    normed = xf / torch.sqrt((xf * xf).mean(dim=-1, keepdim=True) + eps)
    return w * normed.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 33), (5, 48)])
def test_rms_norm_matches_naive_and_transformers(dtype, shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    xr, wr = leaf(x), leaf(w)
    out = reference.rms_norm(xr, wr, eps=1e-6)
    gx, gw = grads(out, (xr, wr))
    xn, wn = leaf(x), leaf(w)
    out_n = naive_rms_norm(xn, wn, 1e-6)
    gxn, gwn = grads(out_n, (xn, wn))
    assert out.dtype == dtype
    torch.testing.assert_close(out, out_n, **ELEMENTWISE_TOL[dtype])
    torch.testing.assert_close(gx, gxn, **ELEMENTWISE_TOL[dtype])
    torch.testing.assert_close(gw, gwn, **REDUCED_TOL[dtype])

    # transformers' LlamaRMSNorm runs the same ops in the same order: bitwise equal.
    hf = LlamaRMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
    xh = leaf(x)
    out_h = hf(xh)
    gxh, gwh = grads(out_h, (xh, hf.weight))
    torch.testing.assert_close(out, out_h, atol=0, rtol=0)
    torch.testing.assert_close(gx, gxh, atol=0, rtol=0)
    torch.testing.assert_close(gw, gwh, atol=0, rtol=0)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_rms_norm_matches_reference(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 33, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(33, device="cuda")).to(dtype)
    results = reference_and_liger(lambda impl, a, b: impl.rms_norm(a, b, 1e-6), (x, w))
    (out_r, (gx_r, gw_r)), (out_l, (gx_l, gw_l)) = results
    torch.testing.assert_close(out_l, out_r, **LIGER_TOL[dtype])
    torch.testing.assert_close(gx_l, gx_r, **LIGER_TOL[dtype])
    torch.testing.assert_close(gw_l, gw_r, **LIGER_REDUCED_TOL[dtype])
