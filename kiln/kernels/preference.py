"""Preference and reward losses on sequence log-probs and rewards: DPO and Bradley-Terry.

These work on (B,) tensors, so they are plain PyTorch on every backend. What is costly is
the sequence log-probs a DPO step needs from the policy: `kiln.kernels.linear_dpo_loss`
computes them with `linear_logprobs` (chunked, no full logits) and hands the per-token
values to `dpo_loss_on_tokens` here.

Conventions, as in TRL's DPOTrainer and Liger-Kernel's fused DPO loss: a batch of B pairs
is 2B rows, the B chosen rows first; a sequence log-prob is the sum of the log-probs of
its non-ignored target tokens (the response); the reference model's are given, usually
computed once before training and cached. All losses are means over pairs, in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def check_dpo_options(name: str, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"{name}: unknown loss_type {loss_type!r} (known: {', '.join(DPO_LOSS_TYPES)})")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{name}: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"{name}: label_smoothing applies to loss_type 'sigmoid' only, not {loss_type!r}")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss of B pairs from their (B,) sequence log-probs under the policy and the reference.

    With h = (chosen - ref_chosen) - (rejected - ref_rejected), the log-ratio margin:
    "sigmoid" -log sigmoid(beta h) (DPO, Rafailov et al. 2023, eq. 7); with label_smoothing
    e > 0, -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h) (cDPO: labels flipped with
    probability e; TRL's sigmoid loss). "ipo" (h - 1 / (2 beta))^2 (IPO, Azar et al. 2023,
    eq. 17) on the log-probs as given: TRL divides every sequence log-prob by its number of
    response tokens before IPO, so for TRL's IPO pass per-token means here, the reference's
    too. "hinge" relu(1 - beta h) (SLiC). Returns (loss, chosen_rewards, rejected_rewards):
    the mean over pairs (fp32) and the implicit rewards beta (logps - ref_logps), detached.
    """
    check_dpo_options("dpo_loss", loss_type, label_smoothing)
    shape = chosen_logps.shape
    if len(shape) != 1 or any(t.shape != shape for t in (rejected_logps, ref_chosen_logps, ref_rejected_logps)):
        raise ValueError("dpo_loss: chosen, rejected and both reference log-probs must all be (B,), got "
                         + ", ".join(str(tuple(t.shape)) for t in (chosen_logps, rejected_logps, ref_chosen_logps,
                                                                    ref_rejected_logps)))
    # fp32 throughout: a sequence log-prob is a sum over hundreds of tokens (-300, say), and
    # in bf16 its step there is 2, far coarser than the margins the loss reacts to.
    chosen_ratio = chosen_logps.float() - ref_chosen_logps.float()  # (B,)
    rejected_ratio = rejected_logps.float() - ref_rejected_logps.float()  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
        if label_smoothing:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def dpo_loss_on_tokens(token_logps: torch.Tensor, valid: torch.Tensor, ref_chosen_logps: torch.Tensor,
                       ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
                       nll_weight: float = 0.0, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """`linear_dpo_loss` from (2B, T) per-token policy log-probs (0 where not `valid`), chosen rows first.

    loss = dpo_loss + nll_weight x NLL, NLL being the mean negative log-likelihood per valid
    token of the chosen rows (RPO, Pang et al. 2024; TRL's rpo_alpha), and 0 when no chosen
    token is valid (TRL and Liger divide by that count and get 0/0 = NaN).
    """
    pairs = token_logps.shape[0] // 2
    seq_logps = token_logps.sum(-1)  # (2B,)
    chosen, rejected = seq_logps[:pairs], seq_logps[pairs:]
    loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps,
                                                      beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    n_chosen_tokens = valid[:pairs].sum().clamp(min=1)
    nll = -chosen.sum() / n_chosen_tokens
    if nll_weight:
        loss = loss + nll_weight * nll
    metrics = {"chosen_logps": chosen.detach(), "rejected_logps": rejected.detach(),
               "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
               "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
               "margin": (chosen_rewards - rejected_rewards).mean(), "nll": nll.detach()}
    return loss, metrics


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None,
                center_coefficient: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry loss of a reward model on pairs: mean of -log sigmoid(r_c - r_r - margin).

    `margin` (same shape, or None for zeros) is Llama 2's preference-strength margin (Touvron
    et al. 2023, eq. 2). center_coefficient c > 0 adds c x mean((r_c + r_r)^2), which pulls
    the rewards towards zero mean (Eisenstein et al. 2023; TRL's center_rewards_coefficient).
    Returns (loss, metrics): fp32 loss; "accuracy", the share of pairs with r_c > r_r, and
    "margin", the mean of r_c - r_r (without the given margin).
    """
    if chosen_rewards.shape != rejected_rewards.shape or (margin is not None and margin.shape !=
                                                          chosen_rewards.shape):
        raise ValueError(f"reward_loss: chosen {tuple(chosen_rewards.shape)}, rejected "
                         f"{tuple(rejected_rewards.shape)} and margin "
                         f"{None if margin is None else tuple(margin.shape)} must have one shape")
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    diff = chosen - rejected
    loss = -F.logsigmoid(diff if margin is None else diff - margin.float()).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    metrics = {"accuracy": (diff > 0).float().mean().detach(), "margin": diff.mean().detach()}
    return loss, metrics


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages of K samples per prompt: (P, K) rewards -> (P, K)
    r_i - mean_{j != i} r_j = K / (K - 1) (r_i - mean_j r_j) (RLOO, Kool et al. 2019;
    Ahmadian et al. 2024): each sample's baseline is the mean of its siblings, so the
    estimate stays unbiased without a value network."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rloo_advantages: rewards must be (prompts, K >= 2), got {tuple(rewards.shape)}")
    k = rewards.shape[1]
    r = rewards.float()
    return k / (k - 1) * (r - r.mean(dim=1, keepdim=True))


def rloo_loss(token_logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
              md_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Policy-gradient loss of sampled responses with a mirror-descent anchor (AFM's
    MDLOO in its simple form).

    token_logps (R, T) the policy's log-probs of the sampled tokens (0 where not `mask`),
    old_logps (R, T) those of the policy that sampled them (detached), advantages (R,).
    pg = -mean_i A_i sum_t exp(logp - old_logp): at the sampling weights the ratio is 1 and
    the gradient is REINFORCE's, -A_i grad log pi(y_i); on a rollout's later updates the
    ratio reweights. md = mean over tokens of (ratio - 1) - log ratio, the k3 estimate of
    KL(sampling policy || policy), 0 with zero gradient at the sampling weights: with
    md_coef it is the mirror-descent step size's anchor. Returns (loss, metrics)."""
    if token_logps.shape != old_logps.shape or token_logps.shape != mask.shape or advantages.shape != \
            token_logps.shape[:1]:
        raise ValueError(f"rloo_loss: token_logps {tuple(token_logps.shape)}, old_logps {tuple(old_logps.shape)}, "
                         f"mask {tuple(mask.shape)} and advantages {tuple(advantages.shape)} do not fit")
    m = mask.float()
    log_ratio = (token_logps.float() - old_logps.float()) * m
    ratio = torch.exp(log_ratio)
    pg = -(advantages.float()[:, None] * ratio * m).sum() / token_logps.shape[0]
    md = (((ratio - 1) - log_ratio) * m).sum() / m.sum().clamp(min=1)
    loss = pg + md_coef * md if md_coef else pg
    return loss, {"pg_loss": pg.detach(), "md_kl": md.detach()}
