"""PyTorch references for the fused ops.

`linear_cross_entropy` is what the model's loss runs off CUDA (through
`kiln.kernels.linear_cross_entropy`), and what Liger's fused loss is tested against.
It is the one that differs from the obvious code: it never holds the (tokens x vocab)
logits (see `ChunkedLinearCrossEntropy`).

`rms_norm`, `swiglu` and `apply_rope` are test references, not called by the model:
off CUDA the model runs transformers' own Llama modules, which these follow op for op
(tests/kernels checks them bitwise equal), and on CUDA it runs Liger's modules patched
in by `kiln.kernels.apply_liger_to_model`, whose ops tests/kernels checks against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Default chunk of `linear_cross_entropy`: as many tokens as keep one chunk's fp32 logits
# within CHUNK_BYTES, and at most CHUNK_ROWS. The byte bound is what makes the saving
# independent of the batch (Liger instead bounds a chunk by the hidden states' size,
# chunk x V <= tokens x H, which grows with the batch). The row cap is the time side:
# every chunk re-reads and re-writes the whole fp32 (V, H) grad_weight accumulator in
# its addmm, whose arithmetic intensity is ~rows/4 flop per byte, so thin chunks are
# memory-bound. Time of one forward + backward relative to naive full logits, 2 CPU
# cores, H = 2048, fp32: at V = 128k, 128 rows 1.22x, 256 rows 1.11x, 512 rows 1.00x;
# at V = 32k, 256 rows 1.11x, 512 rows 1.00x, 1024 rows 1.01x. 512 rows cost 64 MiB of logits at V = 32k and 256 MiB at 128k, a fraction
# (512 / H) of grad_weight, which every method must hold anyway.
CHUNK_BYTES = 256 * 2**20
CHUNK_ROWS = 512


# --------------------------------------------------------------------------- test references
# The ops Liger patches into the model on CUDA; nothing in kiln calls these.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Llama's RMSNorm: normalize in fp32, cast back to x's dtype, then scale.

    The cast comes before the multiply by `weight` (as in transformers' LlamaRMSNorm),
    so a bf16 model rounds the normalized value once and the product once.
    """
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the SwiGLU activation between Llama's gate/up and down projections."""
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in transformers' "rotate half" layout (not the interleaved pairs of
    the RoPE paper): q (B, Hq, T, D), k (B, Hkv, T, D), cos/sin (B, T, D) or (1, T, D)."""
    cos = cos.unsqueeze(1)  # (B, 1, T, D): broadcast over heads
    sin = sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# --------------------------------------------------------------------------- the loss


def default_chunk_size(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk: the largest power of two whose fp32 logits fit CHUNK_BYTES, at most
    CHUNK_ROWS and at most `n_tokens` (a problem that fits in one chunk runs as one)."""
    rows = max(1, CHUNK_BYTES // (4 * vocab))
    rows = min(CHUNK_ROWS, 1 << (rows.bit_length() - 1))
    return max(1, min(n_tokens, rows))


def _chunked_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int, reduction: str, chunk_size: int,
                            grad_hidden_wanted: bool, grad_weight_wanted: bool):
    """The chunk loop shared by the autograd Function and the no-grad path.

    Returns (loss fp32 scalar, grad_hidden or None, grad_weight in fp32 or None), the
    gradients being those of the loss itself (grad_output = 1).
    """
    n, _ = hidden.shape
    vocab = weight.shape[0]
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(f"linear_cross_entropy: target {first} is outside the vocabulary [0, {vocab}) "
                         f"and is not ignore_index ({ignore_index})")
    n_valid = int(valid.sum())
    # mean over non-ignored tokens; with every token ignored the loss is 0 (not 0/0 = NaN
    # as in F.cross_entropy), so a fully masked micro-batch contributes nothing.
    scale = 1.0 if reduction == "sum" else 1.0 / max(n_valid, 1)
    safe_targets = torch.where(valid, targets, 0)
    want_grads = grad_hidden_wanted or grad_weight_wanted

    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grad_hidden_wanted else None
    # fp32 accumulator for bf16/fp16 weights too: summed over many chunks in bf16, the
    # gradient would be rounded once per chunk instead of once.
    grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                   if grad_weight_wanted else None)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        h = hidden[start:stop]  # (c, H)
        t = safe_targets[start:stop]  # (c,)
        row_ok = valid[start:stop]
        # The matmul runs in the input dtype (as `hidden @ weight.T` would), then log-sum-exp
        # and softmax in fp32: exp() of bf16 logits would lose the small probabilities.
        logits = (h @ weight.T).float()  # (c, V)
        target_logit = logits.gather(1, t[:, None]).squeeze(1)  # (c,)
        # log-sum-exp by hand rather than torch.logsumexp, which allocates a second (c, V)
        # buffer: exp(logits - max) goes in place over the logits and, for the gradient,
        # is normalized in place into the softmax.
        row_max = logits.amax(dim=-1, keepdim=True)  # (c, 1)
        exp = logits.sub_(row_max).exp_()  # (c, V), the logits buffer
        sum_exp = exp.sum(dim=-1, keepdim=True)  # (c, 1)
        lse = (row_max + sum_exp.log()).squeeze(1)  # (c,)
        loss += ((lse - target_logit) * row_ok).sum()
        if not want_grads:
            continue
        # d loss / d logits = (softmax - one_hot) * scale on valid rows, 0 on ignored ones.
        row_scale = (row_ok * scale)[:, None]  # (c, 1)
        dlogits = exp.mul_(row_scale / sum_exp)
        dlogits[torch.arange(stop - start, device=t.device), t] -= row_scale.squeeze(1)
        if grad_hidden_wanted:
            torch.mm(dlogits.to(hidden.dtype), weight, out=grad_hidden[start:stop])  # (c, H)
        if grad_weight_wanted:
            grad_weight.addmm_(dlogits.T, h.float())  # (V, H) += (V, c) @ (c, H)
        del logits, exp, dlogits
    return loss * scale, grad_hidden, grad_weight


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` without the (tokens x vocab) logits.

    The naive loss keeps the full fp32 logits for backward, plus their softmax and
    gradient while backward runs: three or four (N, V) fp32 tensors, 2 GiB each for
    4096 tokens at a 128k vocabulary. Here the forward walks over chunks of tokens;
    for each it computes the chunk's logits in fp32, their log-sum-exp and loss, and
    at once the gradient of the loss with respect to those logits (softmax - one-hot,
    times 1/n_valid for the mean). That gradient is projected straight away onto
    grad_hidden (this chunk's rows) and grad_weight (accumulated over chunks), and the
    chunk's logits are dropped. Backward has nothing left to compute: it scales the
    stored gradients by grad_output. Peak extra memory is one chunk's logits
    (chunk x V, at most 256 MiB by default) instead of N x V. This is Liger-Kernel's fused linear cross-entropy
    (`liger_kernel/ops/fused_linear_cross_entropy.py`), written with PyTorch ops.

    The price: gradients are computed even if backward never runs (evaluation should
    call under `torch.no_grad()`, which takes a loss-only path), and the stored
    gradients are scaled in place and released by backward, so backward can run once
    (a second `backward(retain_graph=True)` raises).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size,
                grad_hidden_wanted, grad_weight_wanted):
        loss, grad_hidden, grad_weight = _chunked_loss_and_grads(
            hidden, weight, targets, ignore_index, reduction, chunk_size, grad_hidden_wanted, grad_weight_wanted)
        # Plain attributes, not save_for_backward: these are outputs of our own computation
        # that backward overwrites, not inputs autograd must guard against modification.
        ctx.grad_hidden, ctx.grad_weight = grad_hidden, grad_weight
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if not hasattr(ctx, "grad_hidden"):
            raise RuntimeError("linear_cross_entropy: backward ran twice through the same loss; its gradients "
                               "are computed in forward and released by the first backward")
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        del ctx.grad_hidden, ctx.grad_weight
        # In place: a copy would double grad_weight's (V, H) memory at the end of backward.
        if grad_hidden is not None:
            grad_hidden.mul_(grad_output)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 0) -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T` against `targets`, chunked over tokens.

    hidden (..., H), weight (V, H) (a bias-free lm_head), targets (...) with values in
    [0, V) or `ignore_index`. reduction "mean" (over non-ignored tokens; 0 when all are
    ignored) or "sum". The loss is fp32 whatever the input dtype. chunk_size 0 picks
    `default_chunk_size`. Under autocast the matmuls run in the autocast dtype, as
    `F.linear` would.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "do not fit (weight must be (vocab, hidden))")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} do not match hidden "
                         f"{tuple(hidden.shape)} without its last dimension")
    if chunk_size < 0:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 0 (0 = automatic), got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    # Casts happen outside the Function so autograd carries the gradients back through them.
    hidden2d = hidden.to(dtype).reshape(-1, hidden.shape[-1])
    weight = weight.to(dtype)
    targets1d = targets.reshape(-1)
    chunk = chunk_size or default_chunk_size(hidden2d.shape[0], weight.shape[0])
    grad_on = torch.is_grad_enabled()
    grad_hidden_wanted = grad_on and hidden2d.requires_grad
    grad_weight_wanted = grad_on and weight.requires_grad
    with torch.autocast(device_type, enabled=False):
        if not (grad_hidden_wanted or grad_weight_wanted):
            return _chunked_loss_and_grads(hidden2d, weight, targets1d, ignore_index, reduction, chunk,
                                           False, False)[0]
        return ChunkedLinearCrossEntropy.apply(hidden2d, weight, targets1d, ignore_index, reduction, chunk,
                                               grad_hidden_wanted, grad_weight_wanted)
