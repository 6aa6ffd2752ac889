"""Fused ops for kiln's model: Liger-Kernel on CUDA, PyTorch references elsewhere.

What the model runs, and where it comes from:

- The loss: `linear_cross_entropy(hidden, lm_head.weight, targets)`, the one entry
  point, called by `kiln.training.model.CausalLM.forward`. Liger's fused linear
  cross-entropy on CUDA, the chunked reference (`reference.linear_cross_entropy`)
  elsewhere; neither holds the (tokens x vocab) logits.
- RMSNorm, SwiGLU and RoPE: transformers' own modules off CUDA; on CUDA, Liger's,
  patched into the transformers model by `apply_liger_to_model`.

`parallelize()` resolves the recipe's `[kernels]` table (`KernelsConfig`) for the
run's device and does both. `with use_backend("reference" | "liger")` forces the
backend of calls that name none (tests). The functions `reference.rms_norm`,
`swiglu`, `apply_rope` and their `liger.*` twins are not part of this API: they are
the test references that tests/kernels checks transformers' modules and Liger's ops
against, op by op.

    from kiln.kernels import linear_cross_entropy
    loss = linear_cross_entropy(hidden, model.lm_head.weight, targets)  # (B, T, C), (V, C), (B, T) -> scalar
"""

from __future__ import annotations

import torch

from kiln.kernels import reference
from kiln.kernels.backend import (BACKENDS, KernelsConfig, default_backend, resolve_backend, resolve_for,
                                  use_backend)

__all__ = ["BACKENDS", "KernelsConfig", "apply_liger_to_model", "default_backend", "linear_cross_entropy",
           "resolve_backend", "use_backend"]


def _liger():
    # Deferred import: Triton and liger_kernel load only once a call resolves to Liger.
    from kiln.kernels import liger

    return liger


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 0,
                         backend: str | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets` without the full logits.

    hidden (..., H), weight (V, H) (bias-free lm_head), targets (...) in [0, V) or
    `ignore_index`. "mean" averages over non-ignored tokens (0 if there are none), "sum"
    adds them. Logits' log-sum-exp and softmax are in fp32 whatever the input dtype, and
    the loss is fp32. `chunk_size` (tokens per chunk, 0 = automatic) applies to the
    reference path; Liger chooses its own. `backend` "auto", "reference" or "liger";
    None follows `use_backend` ("auto" outside one).

    Under FSDP2, call it inside the forward of a module `fully_shard` wraps, as
    `CausalLM.forward` does. A fused loss reads `lm_head.weight` itself instead of
    calling `lm_head(...)`, and outside a forward that attribute is FSDP2's shard (a
    DTensor); `fully_shard`'s pre-forward hook swaps in the gathered parameter only for
    the forward of the module it wraps, and the gradient then reaches the unsharded
    parameter for FSDP2 to reduce-scatter. Loss patches computed from the trainer see
    the shard instead: Liger-Kernel issue #332 and PR #674, torchtune PR #2800 (broken
    once FSDP2 resharded the root after forward), apple/ml-cross-entropy issue #31.
    A DTensor weight is refused here with that explanation.
    """
    _refuse_sharded(weight)
    impl = _liger() if resolve_for(backend, hidden, weight, targets) == "liger" else reference
    return impl.linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction,
                                     chunk_size=chunk_size)


def _refuse_sharded(weight: torch.Tensor) -> None:
    """A DTensor weight here is FSDP2's shard, read outside the forward that gathers it."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            raise ValueError(
                "linear_cross_entropy: the weight is a sharded DTensor (FSDP2 outside its forward); "
                "compute the loss inside a fully_shard-ed module's forward, as CausalLM.forward does")


def apply_liger_to_model(model: torch.nn.Module) -> None:
    """Replace RMSNorm, SwiGLU and RoPE of a transformers Llama/Mistral model with Liger's
    (CUDA only; before fully_shard and torch.compile). See `kiln.kernels.liger`."""
    _liger().apply_liger_to_model(model)
