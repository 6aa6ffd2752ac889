"""The CUDA path: Liger-Kernel's Triton kernels behind the same signatures as `reference`.

Imported only when something resolves to Liger (a CUDA device, see
`backend.resolve_backend`), so CPU runs never import Triton. What the model runs from
here: `linear_cross_entropy`, `linear_logprobs` and `linear_distill_loss` (through
`kiln.kernels`) and Liger's RMSNorm / SwiGLU (GeGLU for Gemma 2) / RoPE modules
(`apply_liger_to_model`).
`rms_norm`, `swiglu` and `apply_rope` are test entry points only: they call the same
Liger autograd Functions those modules call (liger-kernel 0.8.5), with the options that
reproduce the Llama semantics of the references, so tests/kernels can check Liger's ops
against `reference` op by op.
"""

from __future__ import annotations

import torch
from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction
from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
from liger_kernel.ops.rms_norm import LigerRMSNormFunction
from liger_kernel.ops.rope import LigerRopeFunction
from liger_kernel.ops.swiglu import LigerSiLUMulFunction

from kiln.kernels import distill, reference


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
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 0,
                         softcap: float = 0.0) -> torch.Tensor:
    """Liger's fused linear cross-entropy. `chunk_size` is ignored: Liger sizes its own
    chunks (transient logits at most tokens x hidden elements). `softcap` is Liger's own
    (None there for off): its Triton kernel caps each logit in fp32, softcap x
    tanh(logit / softcap), and multiplies its gradient by 1 - tanh^2, as the reference."""
    del chunk_size
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    reference.check_softcap("linear_cross_entropy", softcap)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if weight.requires_grad and not hidden2d.requires_grad and torch.is_grad_enabled():
        # Liger computes grad_weight only when its input requires grad (its
        # `input_requires_grad` gates both); a throwaway leaf that does makes it produce
        # the weight gradient, at the cost of an unused (N, H) grad_input.
        hidden2d = hidden2d.detach().requires_grad_()
    # accum_dtype fp32: grad_weight summed over chunks in fp32, as the reference does;
    # Liger's default accumulates in the weight's dtype (bf16 under mixed precision).
    # (_input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction,
    #  softcap, return_z_loss, accum_dtype)
    loss, _, _, _ = LigerFusedLinearCrossEntropyFunction.apply(
        hidden2d, weight, targets.reshape(-1), None, None, ignore_index, 0.0, 0.0, reduction, softcap or None,
        False, torch.float32)
    return loss


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                    chunk_size: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Per-token log-probs as minus Liger's fused linear cross-entropy with reduction "none".

    With reduction "none" and an input that needs gradients, Liger (0.8.5) defers the
    gradients to backward, recomputing each chunk's logits there and weighing each token
    by its own upstream gradient before summing into grad_weight: the strategy of
    `reference.ChunkedLinearLogprobs`, so any loss of the log-probs gets exact gradients.
    Ignored tokens' losses are 0, hence log-probs 0.0 as in the reference. `chunk_size`
    and `softcap` as in `linear_cross_entropy` (Liger's backward recomputes the logits with
    the same cap).

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
    reference.check_softcap("linear_logprobs", softcap)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    loss, _, _, _ = LigerFusedLinearCrossEntropyFunction.apply(
        hidden2d, weight, targets.reshape(-1), None, None, ignore_index, 0.0, 0.0, "none", softcap or None, False,
        torch.float32)
    return (-loss).reshape(targets.shape)


class _LigerFusedLinearJSDInFP32(LigerFusedLinearJSDFunction):
    """Liger's fused linear JSD with its log-softmaxes and KL terms in fp32.

    Liger (0.8.5) takes the log-softmax of each chunk's logits in their own dtype: in bf16
    a log-prob near -10 is off by up to 0.03, more than the whole KL of a student close to
    its teacher. Liger's chunking, gradients and loss formula are kept; only the logits
    are cast first. Liger still divides the logits by the temperature in their dtype
    before this cast (one more bf16 rounding of each logit when tau != 1).
    """

    @staticmethod
    def distillation_loss_fn(student_logits, teacher_logits, beta=0.5, target=None, ignore_index=-100):
        return LigerFusedLinearJSDFunction.distillation_loss_fn(student_logits.float(), teacher_logits.float(),
                                                                beta=beta, target=target, ignore_index=ignore_index)


def linear_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, targets: torch.Tensor,
                        teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                        teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None, loss: str = "kl",
                        alpha: float = 0.9, beta: float = 0.5, temperature: float = 1.0, top_k: int = 0,
                        ignore_index: int = -100, chunk_size: int = 0, student_softcap: float = 0.0,
                        teacher_softcap: float = 0.0, compiled: bool = True) -> tuple[torch.Tensor, dict]:
    """"kl" and "jsd" through Liger's fused linear JSD (`liger_kernel.chunked_loss`,
    `LigerFusedLinearJSDFunction`), where it computes what `distill.linear_distill_loss` does.

    How kiln's options map onto Liger's (0.8.5): weight_hard_loss 0 and weight_soft_loss 1
    (the distillation term alone, whose label cross-entropy Liger then skips); jsd_beta =
    `beta` for "jsd", and 0 for "kl", which Liger computes as the forward KL(P_T || P_S)
    (`jsd_loss.py`: `if beta == 0: F.kl_div(student_log_probs, teacher_log_probs,
    log_target=True)`); "kl" is then multiplied by tau^2, which Liger does not apply. Liger
    divides by the number of non-ignored tokens clamped to 1 (0, not NaN, when all are
    ignored), as the reference. Both lm_heads are cut to their common rows first: Liger
    would pad a smaller student vocabulary with zero logits, which are probabilities, not
    absent tokens. Its log-softmaxes are made fp32 (`_LigerFusedLinearJSDInFP32`).

    What runs the reference instead (`distill.linear_distill_loss`): "top1_mix", `top_k`,
    `teacher_topk`, a `student_softcap` or `teacher_softcap` (Liger has none of them: its
    fused linear JSD takes no final-logit soft-cap in 0.8.5) and calls without gradients
    (evaluation: Liger computes gradients in its forward whether or not they are wanted).
    The metrics are not a by-product of Liger's chunks, so they cost one more no-grad pass
    of the reference over both lm_heads (`distill.distill_metrics`). Not the same as the
    reference: Liger accumulates grad_weight over chunks in the weight's dtype (bf16
    under mixed precision; the reference sums in fp32) and chooses its own chunks from
    `chunk_size` (at least that many tokens each). `compiled` is Liger's torch.compile of
    each chunk's step (tests run it uncompiled on the CPU).
    """
    kwargs = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_topk=teacher_topk,
                  loss=loss, alpha=alpha, beta=beta, temperature=temperature, top_k=top_k,
                  ignore_index=ignore_index, chunk_size=chunk_size, student_softcap=student_softcap,
                  teacher_softcap=teacher_softcap)
    grads_wanted = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
    liger_computes_it = (loss in ("kl", "jsd") and not top_k and teacher_topk is None
                         and not (student_softcap or teacher_softcap))
    if not (liger_computes_it and grads_wanted):
        return distill.linear_distill_loss(student_hidden, student_weight, targets, **kwargs)
    x = distill.check_distill_inputs("linear_distill_loss", student_hidden, student_weight, targets, **kwargs)
    metrics = distill.distill_metrics(x)
    with torch.autocast(x.hidden.device.type, enabled=False):
        # (student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias,
        #  weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, compiled, chunk_size,
        #  return_soft_hard_loss)
        value = _LigerFusedLinearJSDInFP32.apply(
            x.hidden, x.weight, x.teacher.hidden, x.teacher.weight, x.targets, None, None, 0.0, 1.0,
            0.0 if loss == "kl" else beta, ignore_index, temperature, compiled, x.chunk, False)
    if loss == "kl" and temperature != 1.0:
        value = value * temperature**2
    return value, metrics


def apply_liger_to_model(model: torch.nn.Module) -> None:
    """Swap a transformers model's RMSNorm, gated MLP and RoPE for Liger's: Llama, Mistral
    (kiln's sliding-window model) and Qwen 2 with their SwiGLU MLP, Gemma 2 with its GeGLU
    MLP (tanh-approximated GELU, as Gemma 2's `gelu_pytorch_tanh`) and its RMSNorm's
    (1 + weight) scaling.

    Cross-entropy is left alone: kiln's model computes the loss itself through
    `kiln.kernels.linear_cross_entropy` (inside the forward FSDP2 wraps; `softcap` there
    for Gemma 2's final-logit soft-capping). Apply before `fully_shard` and
    `torch.compile`. Liger patches the model instance's norms and MLPs, but RoPE by
    replacing `apply_rotary_pos_emb` in transformers' modeling module for the whole process
    (every model of that type built afterwards uses it too).
    """
    from liger_kernel.transformers import (apply_liger_kernel_to_gemma2, apply_liger_kernel_to_llama,
                                           apply_liger_kernel_to_mistral, apply_liger_kernel_to_qwen2)

    # model_type -> (Liger's applier, the name of its gated-MLP switch)
    appliers = {"llama": (apply_liger_kernel_to_llama, "swiglu"),
                "mistral": (apply_liger_kernel_to_mistral, "swiglu"),
                "qwen2": (apply_liger_kernel_to_qwen2, "swiglu"),
                "gemma2": (apply_liger_kernel_to_gemma2, "geglu")}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in appliers:
        # Liger's own dispatcher logs and does nothing for an unknown type; a run that
        # asked for Liger should not silently train without it.
        raise ValueError(f"apply_liger_to_model: model type {model_type!r} is not supported "
                         f"(supported: {', '.join(appliers)})")
    apply, mlp_switch = appliers[model_type]
    apply(model=model, rope=True, rms_norm=True, cross_entropy=False, fused_linear_cross_entropy=False,
          **{mlp_switch: True})
