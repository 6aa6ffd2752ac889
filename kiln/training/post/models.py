"""The modules post-training stages train. Like `CausalLM` (which SFT trains as it is:
its loss ignores masked targets), each computes its loss inside its own forward, the
module FSDP2 wraps at the root, so lm_head's (or the score head's) weight is gathered
when the loss reads it.

- `PreferenceLM`: the DPO policy; forward takes (2B, T) rows, chosen first, and the
  cached reference log-probs, and returns the loss and its metrics
  (kiln.kernels.linear_dpo_loss: chunked, no full logits).
- `RewardModel`: a `*ForSequenceClassification` model with one label; the reward of a
  row is the score head at its last real token; Bradley-Terry loss with a margin
  (kiln.kernels.reward_loss).
"""

from __future__ import annotations

import torch

from kiln.kernels import linear_dpo_loss, linear_logprobs, reward_loss
from kiln.training.model import CausalLM, final_softcap


class PreferenceLM(CausalLM):
    def __init__(self, hf_model, beta: float, loss_type: str, nll_weight: float):
        super().__init__(hf_model)
        self.beta, self.loss_type, self.nll_weight = beta, loss_type, nll_weight

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
        hidden = self.hf.model(input_ids=input_ids, use_cache=False).last_hidden_state  # (2B, T, C)
        return linear_dpo_loss(hidden, self.hf.lm_head.weight, targets, ref_chosen, ref_rejected, beta=self.beta,
                               loss_type=self.loss_type, nll_weight=self.nll_weight,
                               chunk_size=self.kernels.ce_chunk_size, backend=self.kernels.backend,
                               softcap=final_softcap(self.hf))

    @torch.no_grad()
    def sequence_logps(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(rows,) summed log-probs of the non-ignored targets (the reference's)."""
        hidden = self.hf.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return linear_logprobs(hidden, self.hf.lm_head.weight, targets, chunk_size=self.kernels.ce_chunk_size,
                               backend=self.kernels.backend, softcap=final_softcap(self.hf)).sum(-1)


class RewardModel(CausalLM):
    def __init__(self, hf_model, center_coefficient: float = 0.0):
        super().__init__(hf_model)
        self.center_coefficient = center_coefficient

    def rewards(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.hf.model(input_ids=input_ids, use_cache=False).last_hidden_state  # (R, T, C)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]  # (R, C)
        return self.hf.score(last).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, margin: torch.Tensor
                ) -> tuple[torch.Tensor, dict]:
        chosen, rejected = self.rewards(input_ids, lengths).chunk(2)
        return reward_loss(chosen, rejected, margin, center_coefficient=self.center_coefficient)
