"""Fused ops used by kiln's model and losses: one function per op, two implementations.

On CUDA (when liger_kernel imports) the functions run Liger-Kernel's Triton kernels;
everywhere else they run the PyTorch references in `kiln.kernels.reference`, whose
linear cross-entropy is chunked so that the (tokens x vocab) logits never exist.
`set_backend("auto" | "liger" | "torch")` / `with use_backend(...)` force either path.

For a transformers model, Liger is applied to the model itself (`apply_liger_to_model`,
or `maybe_apply_liger` which follows the switch); the loss goes through
`linear_cross_entropy`, called from inside a module's forward (`LMHeadLoss`) so that
FSDP2 has gathered lm_head's weight.

    from kiln.kernels import LMHeadLoss, rms_norm, use_backend
    loss = LMHeadLoss(model.lm_head)(hidden, targets)  # (B, T, C), (B, T) -> scalar
"""

from __future__ import annotations

import torch

from kiln.kernels import reference
from kiln.kernels.backend import BACKENDS, KernelsConfig, get_backend, set_backend, use_backend, use_liger
from kiln.kernels.lm_head import LMHeadLoss

__all__ = ["BACKENDS", "KernelsConfig", "LMHeadLoss", "apply_liger_to_model", "apply_rope", "get_backend",
           "linear_cross_entropy", "maybe_apply_liger", "rms_norm", "set_backend", "swiglu", "use_backend"]


def _liger():
    # Deferred import: Triton and liger_kernel load only once a call resolves to Liger.
    from kiln.kernels import liger

    return liger


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Llama RMSNorm over the last dim: fp32 normalization, cast to x's dtype, times weight."""
    impl = _liger() if use_liger(x, weight) else reference
    return impl.rms_norm(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    impl = _liger() if use_liger(gate, up) else reference
    return impl.swiglu(gate, up)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, transformers' rotate-half layout: q (B, Hq, T, D), k (B, Hkv, T, D),
    cos/sin (B, T, D) as returned by transformers' LlamaRotaryEmbedding."""
    impl = _liger() if use_liger(q, k, cos, sin) else reference
    return impl.apply_rope(q, k, cos, sin)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 0) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets` without the full logits.

    hidden (..., H), weight (V, H) (bias-free lm_head), targets (...) in [0, V) or
    `ignore_index`. "mean" averages over non-ignored tokens (0 if there are none), "sum"
    adds them. Logits' log-sum-exp and softmax are in fp32 whatever the input dtype, and
    the loss is fp32. `chunk_size` (tokens per chunk, 0 = automatic) applies to the
    reference path; Liger chooses its own.
    """
    _refuse_sharded(weight)
    impl = _liger() if use_liger(hidden, weight, targets) else reference
    return impl.linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction,
                                     chunk_size=chunk_size)


def _refuse_sharded(weight: torch.Tensor) -> None:
    """A DTensor weight here is FSDP2's shard, read outside the forward that gathers it."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            raise ValueError(
                "linear_cross_entropy: the weight is a sharded DTensor (FSDP2 outside its forward); "
                "compute the loss inside a fully_shard-ed module's forward, e.g. kiln.kernels.LMHeadLoss")


def apply_liger_to_model(model: torch.nn.Module) -> None:
    """Replace RMSNorm, SwiGLU and RoPE of a transformers Llama/Mistral model with Liger's
    (CUDA only; before fully_shard and torch.compile). See `kiln.kernels.liger`."""
    _liger().apply_liger_to_model(model)


def maybe_apply_liger(model: torch.nn.Module) -> bool:
    """Apply Liger to `model` when the switch resolves to Liger for its parameters' device
    ("auto" on CUDA with liger_kernel installed, or "liger"); returns whether it did."""
    param = next(model.parameters())
    if not use_liger(param):
        return False
    apply_liger_to_model(model)
    return True
