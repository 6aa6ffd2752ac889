"""The language-model loss as a module, so FSDP2 gathers lm_head's weight around it."""

from __future__ import annotations

import torch
from torch import nn


class LMHeadLoss(nn.Module):
    """`forward(hidden, targets)`: the cross-entropy of `lm_head(hidden)` against `targets`,
    through `kiln.kernels.linear_cross_entropy` (no (tokens x vocab) logits).

    Why a module and not a call from the trainer: a fused linear cross-entropy reads
    `lm_head.weight` itself instead of calling `lm_head(...)`. Under FSDP2 that attribute
    is the sharded DTensor outside a forward; `fully_shard`'s pre-forward hook swaps in
    the gathered (unsharded, compute-dtype) parameter only for the forward of the module
    it wraps, and the root is resharded after its forward. Integrations that patch the
    model's lm_head into a loss computed from the trainer therefore see a shard (a size
    mismatch, or "mixed torch.Tensor and DTensor"): Liger-Kernel issue #332 and PR #674,
    torchtune PR #2800 (breakage once FSDP2 resharded the root after forward), and
    apple/ml-cross-entropy issue #31 (the recommended fix: run the loss inside a forward
    FSDP2 hooks). Here the loss *is* a forward: `fully_shard(LMHeadLoss(model.lm_head))`
    (or a root module whose forward calls it) gathers the weight exactly while the loss
    reads it, and the gradient reaches the unsharded parameter for FSDP2 to
    reduce-scatter.

    Holding the model's own `lm_head` (a bias-free nn.Linear) means the parameter stays
    registered under the model too, so checkpoints and the exported HF model keep it.
    """

    def __init__(self, lm_head: nn.Linear, ignore_index: int = -100, chunk_size: int = 0):
        super().__init__()
        if not isinstance(lm_head, nn.Linear) or lm_head.bias is not None:
            raise ValueError(f"LMHeadLoss needs a bias-free nn.Linear lm_head, got {lm_head!r}")
        self.lm_head = lm_head
        self.ignore_index = ignore_index  # target value whose positions do not count
        self.chunk_size = chunk_size  # tokens per chunk of the reference path; 0 = automatic

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        from kiln.kernels import linear_cross_entropy

        return linear_cross_entropy(hidden, self.lm_head.weight, targets, ignore_index=self.ignore_index,
                                    reduction=reduction, chunk_size=self.chunk_size)
