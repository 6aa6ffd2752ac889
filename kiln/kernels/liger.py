"""The CUDA path: Liger-Kernel's Triton kernels behind the same signatures as `reference`.

Imported only when something resolves to Liger (a CUDA device, see
`backend.resolve_backend`), so CPU runs never import Triton. What the model runs from
here: `linear_cross_entropy` and `linear_logprobs` (through `kiln.kernels`) and Liger's
RMSNorm / SwiGLU / RoPE modules (`apply_liger_to_model`). `rms_norm`, `swiglu` and
`apply_rope` are test entry points only: they call the same Liger autograd Functions
those modules call (liger-kernel 0.8.5), with the options that reproduce the Llama
semantics of the references, so tests/kernels can check Liger's ops against
`reference` op by op.
"""

from __future__ import annotations

import torch
from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
from liger_kernel.ops.rms_norm import LigerRMSNormFunction
from liger_kernel.ops.rope import LigerRopeFunction
from liger_kernel.ops.swiglu import LigerSiLUMulFunction


# --------------------------------------------------------------------------- test entry points
# Liger's ops one by one, for tests/kernels; the model gets them as modules (apply_liger_to_model).


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # casting_mode "llama": rstd in fp32, normalized value cast to x's dtype before the
    # weight multiply, as transformers' LlamaRMSNorm. in_place=False: Liger's default
    # overwrites the incoming gradient with dX, which is wrong when that gradient is also
    # used elsewhere (a residual branch), and a free function cannot know.
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return LigerSiLUMulFunction.apply(gate, up)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    # position_ids None (cos/sin already gathered per position), unsqueeze_dim 1: heads
    # are dim 1 of q and k, as in transformers' Llama attention.
    return LigerRopeFunction.apply(q, k, cos, sin, None, 1)


# --------------------------------------------------------------------------- what the model runs


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 0) -> torch.Tensor:
    """Liger's fused linear cross-entropy. `chunk_size` is ignored: Liger sizes its own
    chunks (transient logits at most tokens x hidden elements)."""
    del chunk_size
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if weight.requires_grad and not hidden2d.requires_grad and torch.is_grad_enabled():
        # Liger computes grad_weight only when its input requires grad (its
        # `input_requires_grad` gates both); a throwaway leaf that does makes it produce
        # the weight gradient, at the cost of an unused (N, H) grad_input.
        hidden2d = hidden2d.detach().requires_grad_()
    # accum_dtype fp32: grad_weight summed over chunks in fp32, as the reference does;
    # Liger's default accumulates in the weight's dtype (bf16 under mixed precision).
    loss, _, _, _ = LigerFusedLinearCrossEntropyFunction.apply(
        hidden2d, weight, targets.reshape(-1), None, None, ignore_index, 0.0, 0.0, reduction, None, False,
        torch.float32)
    return loss


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                    chunk_size: int = 0) -> torch.Tensor:
    """Per-token log-probs as minus Liger's fused linear cross-entropy with reduction "none".

    With reduction "none" and an input that needs gradients, Liger (0.8.5) defers the
    gradients to backward, recomputing each chunk's logits there and weighing each token
    by its own upstream gradient before summing into grad_weight: the strategy of
    `reference.ChunkedLinearLogprobs`, so any loss of the log-probs gets exact gradients.
    Ignored tokens' losses are 0, hence log-probs 0.0 as in the reference. `chunk_size`
    is ignored, as in `linear_cross_entropy`.

    This is also what `kiln.kernels.linear_dpo_loss` runs on CUDA, rather than Liger's
    fused DPO loss (`liger_kernel.chunked_loss.LigerFusedLinearDPOFunction`, 0.8.5): that
    one takes the reference only as a reference model's hidden states and lm_head weight,
    recomputed every step (or none, `use_ref_model=False`, which scores against a
    reference log-prob of 0); it has no argument for cached reference log-probs, which
    kiln's DPO stage computes once. It would also divide its NLL by the number of chosen
    tokens with no guard (NaN when all are masked), has no IPO, and holds whole pairs'
    (2 x T x V) logits and their fp32 log-softmax per chunk, memory that grows with the
    sequence length. Its definitions otherwise match kiln's (summed log-probs,
    `average_log_prob=False`; NLL per non-ignored chosen token), which
    tests/kernels/test_preference.py checks on CPU.
    """
    del chunk_size
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    loss, _, _, _ = LigerFusedLinearCrossEntropyFunction.apply(
        hidden2d, weight, targets.reshape(-1), None, None, ignore_index, 0.0, 0.0, "none", None, False,
        torch.float32)
    return (-loss).reshape(targets.shape)


def apply_liger_to_model(model: torch.nn.Module) -> None:
    """Swap a transformers Llama (or Mistral, kiln's sliding-window model) model's RMSNorm,
    SwiGLU MLP and RoPE for Liger's.

    Cross-entropy is left alone: kiln's model computes the loss itself through
    `kiln.kernels.linear_cross_entropy` (inside the forward FSDP2 wraps). Apply before
    `fully_shard` and `torch.compile`. Liger patches the model instance's norms and MLPs,
    but RoPE by replacing `apply_rotary_pos_emb` in transformers' modeling module for the
    whole process (every model of that type built afterwards uses it too).
    """
    from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_mistral

    appliers = {"llama": apply_liger_kernel_to_llama, "mistral": apply_liger_kernel_to_mistral}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in appliers:
        # Liger's own dispatcher logs and does nothing for an unknown type; a run that
        # asked for Liger should not silently train without it.
        raise ValueError(f"apply_liger_to_model: model type {model_type!r} is not supported "
                         f"(supported: {', '.join(appliers)})")
    appliers[model_type](model=model, rope=True, rms_norm=True, swiglu=True,
                         cross_entropy=False, fused_linear_cross_entropy=False)
