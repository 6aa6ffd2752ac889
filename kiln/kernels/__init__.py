"""Fused ops for kiln's model: Liger-Kernel on CUDA, PyTorch references elsewhere.

What the model runs, and where it comes from:

- The loss: `linear_cross_entropy(hidden, lm_head.weight, targets)`, the one entry
  point, called by `kiln.training.model.CausalLM.forward`. Liger's fused linear
  cross-entropy on CUDA, the chunked reference (`reference.linear_cross_entropy`)
  elsewhere; neither holds the (tokens x vocab) logits.
- Per-token log-probs: `linear_logprobs(hidden, lm_head.weight, targets)`, the same
  two paths, for post-training (DPO's sequence log-probs, the reference's cached ones).
- DPO from hidden states: `linear_dpo_loss` (`linear_logprobs` then the DPO loss);
  `dpo_loss` on given sequence log-probs and the reward model's Bradley-Terry
  `reward_loss` are plain PyTorch on (B,) tensors (`kiln.kernels.preference`), as are
  RLOO's `rloo_advantages` and `rloo_loss` (policy gradient with a mirror-descent anchor).
- Distillation from hidden states: `linear_distill_loss` (KL, AFM's top-1 mix, JSD; from
  the teacher's hidden states or a cache of its top-k logits, `teacher_topk_logits`),
  chunked (`kiln.kernels.distill`); Liger's fused linear JSD on CUDA where it computes
  the same thing.
- Gemma 2's final-logit soft-capping, cap x tanh(logits / cap) before the softmax: the
  `softcap` argument of each loss above (`student_softcap` and `teacher_softcap` for
  distillation), applied chunk by chunk, 0 = off.
- RMSNorm, SwiGLU (GeGLU for Gemma 2) and RoPE: transformers' own modules off CUDA; on
  CUDA, Liger's, patched into the transformers model by `apply_liger_to_model`.

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

from kiln.kernels import distill, preference, reference
from kiln.kernels.backend import (BACKENDS, KernelsConfig, default_backend, resolve_backend, resolve_for,
                                  use_backend)
from kiln.kernels.distill import teacher_topk_logits
from kiln.kernels.preference import dpo_loss, reward_loss, rloo_advantages, rloo_loss

__all__ = ["BACKENDS", "KernelsConfig", "apply_liger_to_model", "default_backend", "dpo_loss",
           "linear_cross_entropy", "linear_distill_loss", "linear_dpo_loss", "linear_logprobs", "resolve_backend",
           "reward_loss", "rloo_advantages", "rloo_loss", "teacher_topk_logits", "use_backend"]


def _liger():
    # Deferred import: Triton and liger_kernel load only once a call resolves to Liger.
    from kiln.kernels import liger

    return liger


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 0,
                         backend: str | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets` without the full logits.

    hidden (..., H), weight (V, H) (bias-free lm_head), targets (...) in [0, V) or
    `ignore_index`. "mean" averages over non-ignored tokens (0 if there are none), "sum"
    adds them. Logits' log-sum-exp and softmax are in fp32 whatever the input dtype, and
    the loss is fp32. `chunk_size` (tokens per chunk, 0 = automatic) applies to the
    reference path; Liger chooses its own. `backend` "auto", "reference" or "liger";
    None follows `use_backend` ("auto" outside one). `softcap` > 0 soft-caps the fp32
    logits before the softmax, softcap x tanh(logits / softcap) (Gemma 2's final-logit
    soft-capping, 30.0), with its factor 1 - tanh^2 in the gradients; 0 (the default) is off.

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
    _refuse_sharded("linear_cross_entropy", weight)
    impl = _liger() if resolve_for(backend, hidden, weight, targets) == "liger" else reference
    return impl.linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction,
                                     chunk_size=chunk_size, softcap=softcap)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                    chunk_size: int = 0, backend: str | None = None, softcap: float = 0.0) -> torch.Tensor:
    """log softmax(`hidden @ weight.T`)[target] of every token, without the full logits.

    hidden (..., H), weight (V, H), targets (...) in [0, V) or `ignore_index`. Returns fp32
    of the targets' shape, 0.0 at ignored tokens, so `.sum(-1)` of (rows, T) targets is
    each row's sequence log-prob. Differentiable in hidden and weight for any upstream
    gradient; backward recomputes each chunk's logits (`reference.ChunkedLinearLogprobs`;
    Liger's fused linear cross-entropy with reduction "none" on CUDA). `chunk_size`,
    `backend`, `softcap` and the FSDP2 rule as in `linear_cross_entropy`.
    """
    _refuse_sharded("linear_logprobs", weight)
    impl = _liger() if resolve_for(backend, hidden, weight, targets) == "liger" else reference
    return impl.linear_logprobs(hidden, weight, targets, ignore_index=ignore_index, chunk_size=chunk_size,
                                softcap=softcap)


def linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
                    loss_type: str = "sigmoid", nll_weight: float = 0.0, ignore_index: int = -100,
                    chunk_size: int = 0, backend: str | None = None, label_smoothing: float = 0.0,
                    softcap: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPO loss of B pairs from the policy's last hidden states, without the full logits.

    hidden (2B, T, H), the B chosen rows first, then the B rejected ones in the same order;
    weight (V, H) the lm_head; targets (2B, T), `ignore_index` wherever a token is not
    scored (prompt, padding, masked format tokens). A row's log-prob is the sum of its
    non-ignored tokens' (`linear_logprobs`); ref_chosen_logps / ref_rejected_logps (B,) the
    reference model's, summed alike. loss = `dpo_loss`(beta, loss_type, label_smoothing) +
    nll_weight x NLL, NLL the mean negative log-likelihood per non-ignored token of the
    chosen rows (0, not NaN, when there is none). Returns (loss, metrics): chosen_logps,
    rejected_logps, chosen_rewards, rejected_rewards (B,), accuracy (share of pairs whose
    chosen reward is higher), margin (mean reward difference) and nll, all detached.

    Sequence log-probs are sums, as in TRL and Liger (average_log_prob=False), for every
    loss type: for TRL's per-token-averaged IPO, call `linear_logprobs` and `dpo_loss`
    directly. On CUDA the token log-probs come from Liger's fused linear cross-entropy
    (why not Liger's fused DPO loss: `kiln.kernels.liger.linear_logprobs`). `softcap` is the
    policy's final-logit soft-cap, as in `linear_cross_entropy`; the reference log-probs
    must come from logits capped alike (`linear_logprobs(..., softcap=...)`).
    """
    # Checked before the costly part, the log-probs, rather than after it in dpo_loss.
    if hidden.dim() != 3 or hidden.shape[0] % 2 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"linear_dpo_loss: hidden must be (2B, T, H) and targets (2B, T), got hidden "
                         f"{tuple(hidden.shape)} and targets {tuple(targets.shape)}")
    pairs = hidden.shape[0] // 2
    if ref_chosen_logps.shape != (pairs,) or ref_rejected_logps.shape != (pairs,):
        raise ValueError(f"linear_dpo_loss: the reference log-probs must be ({pairs},) for {2 * pairs} rows, got "
                         f"{tuple(ref_chosen_logps.shape)} and {tuple(ref_rejected_logps.shape)}")
    preference.check_dpo_options("linear_dpo_loss", loss_type, label_smoothing)
    token_logps = linear_logprobs(hidden, weight, targets, ignore_index=ignore_index, chunk_size=chunk_size,
                                  backend=backend, softcap=softcap)  # (2B, T)
    return preference.dpo_loss_on_tokens(token_logps, targets != ignore_index, ref_chosen_logps,
                                         ref_rejected_logps, beta=beta, loss_type=loss_type,
                                         nll_weight=nll_weight, label_smoothing=label_smoothing)


def linear_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, targets: torch.Tensor,
                        teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                        teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None, loss: str = "kl",
                        alpha: float = 0.9, beta: float = 0.5, temperature: float = 1.0, top_k: int = 0,
                        ignore_index: int = -100, chunk_size: int = 0, backend: str | None = None,
                        student_softcap: float = 0.0, teacher_softcap: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Knowledge-distillation loss of a student's hidden states against a teacher, without the full logits.

    student_hidden (..., H_s), student_weight (V_s, H_s) its lm_head; targets (...) the
    labels, `ignore_index` where a token is not trained. The teacher: teacher_hidden
    (..., H_t) with teacher_weight (V_t, H_t), or teacher_topk (values, indices), each
    (..., k), its k largest raw logits and their token ids (`teacher_topk_logits`), so it
    need not be resident. The teacher gets no gradient. Both run on the common vocabulary,
    the first min(V_s, V_t) rows: kiln pads vocabularies to a multiple of 64 and the caller
    has checked that both cover the tokenizer; a non-ignored target beyond is an error.

    loss "kl" (tau^2 KL(P_T || P_S), Gemma 2), "top1_mix" (-[alpha log P_S(teacher top-1)
    + (1 - alpha) log P_S(label)], Apple AFM) or "jsd" (generalized JSD with `beta`,
    Liger-Kernel's convention: beta = 0 forward KL, 1 reverse KL); temperature divides the
    logits, top_k > 0 restricts the teacher to its k largest logits (definitions:
    `kiln.kernels.distill`). The loss is the mean over non-ignored tokens, 0 when there
    are none, fp32 whatever the input dtype. Returns (loss, metrics), metrics detached
    fp32 means over non-ignored tokens: "kl" (KL(P_T || P_S) at temperature 1, over the
    top-k if any: the held-out measure), "teacher_agreement" (share of tokens whose
    student argmax is the teacher's) and "nll" (of the labels).

    student_softcap and teacher_softcap soft-cap each model's fp32 logits as `softcap` does
    in `linear_cross_entropy` (0 = off), before the temperature, top-k and metrics: a Gemma
    2 student or teacher is distilled on its own distribution. A teacher_topk cache holds
    logits capped or not as `teacher_topk_logits(softcap=...)` made it, so teacher_softcap
    goes with teacher_hidden only (an error with a cache).

    On CUDA, Liger's fused linear JSD computes "kl" and "jsd" without top-k or a soft-cap
    when gradients are wanted (Liger's JSD has no soft-cap option); the rest runs the
    chunked reference (`kiln.kernels.liger.linear_distill_loss`).
    `chunk_size`, `backend` and the FSDP2 rule as in `linear_cross_entropy`; a sharded
    teacher lm_head is refused the same way.
    """
    _refuse_sharded("linear_distill_loss", student_weight)
    if teacher_weight is not None:
        _refuse_sharded("linear_distill_loss", teacher_weight)
    tensors = [t for t in (student_hidden, student_weight, targets, teacher_hidden, teacher_weight) if t is not None]
    impl = _liger() if resolve_for(backend, *tensors) == "liger" else distill
    return impl.linear_distill_loss(student_hidden, student_weight, targets, teacher_hidden=teacher_hidden,
                                    teacher_weight=teacher_weight, teacher_topk=teacher_topk, loss=loss, alpha=alpha,
                                    beta=beta, temperature=temperature, top_k=top_k, ignore_index=ignore_index,
                                    chunk_size=chunk_size, student_softcap=student_softcap,
                                    teacher_softcap=teacher_softcap)


def _refuse_sharded(name: str, weight: torch.Tensor) -> None:
    """A DTensor weight here is FSDP2's shard, read outside the forward that gathers it."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            raise ValueError(
                f"{name}: the weight is a sharded DTensor (FSDP2 outside its forward); "
                "compute the loss inside a fully_shard-ed module's forward, as CausalLM.forward does")


def apply_liger_to_model(model: torch.nn.Module) -> None:
    """Replace RMSNorm, the gated MLP (SwiGLU; GeGLU for Gemma 2) and RoPE of a transformers
    Llama, Mistral, Qwen 2 or Gemma 2 model with Liger's (CUDA only; before fully_shard and
    torch.compile). See `kiln.kernels.liger`."""
    _liger().apply_liger_to_model(model)
