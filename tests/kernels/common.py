"""What every kernel test shares: dtypes, per-dtype tolerances, leaves and gradients.

Tolerances are per dtype. fp32 results differ from the naive versions only by the order
of floating-point operations, so they are held to 1e-5-ish. bf16 has an 8-bit mantissa:
one rounding step is a relative 2^-8 (0.4 %), and two implementations that round an
intermediate differently land one or two bf16 steps apart, hence rtol 1.6e-2 (two steps
at the coarsest end of a binade, 2^-7 each; torch.testing's own bf16 default). Where
the reference performs the very same ops as transformers, equality is exact.
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import reference

DTYPES = [torch.float32, torch.bfloat16]
# Elementwise ops (norm, activation, rotation): fp32 to a few ulps; bf16 to two steps.
ELEMENTWISE_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-3, rtol=1.6e-2)}
# Gradients that sum over tokens (RMSNorm's weight): in fp32 the two sum in a different
# order (1e-5 absolute on O(1) sums of 21-35 terms); in bf16 both accumulate in fp32 and
# round once, so the elementwise bound holds.
REDUCED_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: ELEMENTWISE_TOL[torch.bfloat16]}

# Liger's Triton kernels reorder reductions and fuse casts differently from eager
# PyTorch; these are the tolerances Liger-Kernel's own tests use for the same ops
# (test/transformers/test_rms_norm.py, test_swiglu.py, test_rope.py,
# test_fused_linear_cross_entropy.py), fp32 and bf16 each.
LIGER_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
LIGER_REDUCED_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-1, rtol=2e-2)}

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel needs a CUDA GPU")


def soft_cap(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """Gemma 2's final-logit soft-capping written out for autograd, the naive versions' cap
    (the references' is chunked, with a hand-written chain rule); 0 = off."""
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def grads(out, inputs, seed: int = 1):
    """Backpropagate a fixed random upstream gradient (not ones: a sum would hide a
    wrong sign per element) and return the inputs' gradients."""
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=g).to(o.dtype).to(o.device) for o in outs]
    return torch.autograd.grad(outs, inputs, upstream)


def reference_and_liger(fn, inputs):
    """`fn(impl, *leaves)` with impl `kiln.kernels.reference`, then `kiln.kernels.liger`
    (the test entry points of the ops Liger patches into the model), each on fresh leaves
    of `inputs`: [(output, input grads), (output, input grads)]."""
    from kiln.kernels import liger

    results = []
    for impl in (reference, liger):
        leaves = [leaf(i) for i in inputs]
        out = fn(impl, *leaves)
        results.append((out, grads(out, leaves)))
    return results
