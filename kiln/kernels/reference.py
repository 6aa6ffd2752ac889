"""PyTorch references for the fused ops.

`linear_cross_entropy` is what the model's loss runs off CUDA (through
`kiln.kernels.linear_cross_entropy`), and what Liger's fused loss is tested against;
`linear_logprobs` (per-token log-probs, for DPO and SFT) likewise. They are the ones
that differ from the obvious code: they never hold the (tokens x vocab) logits (see
`ChunkedLinearCrossEntropy` and `ChunkedLinearLogprobs`).

Both take Gemma 2's final-logit soft-capping, `softcap` x tanh(logits / `softcap`) before
the softmax (`softcap` 30 in Gemma 2; 0 = off), applied to each chunk's fp32 logits, with
its factor 1 - tanh^2 in the hand-written gradients (`soft_cap_`, `soft_cap_keeping_tanh`,
`soft_cap_backward_`, which `kiln.kernels.distill` uses too).

`rms_norm`, `swiglu` and `apply_rope` are test references, not called by the model:
off CUDA the model runs transformers' own Llama modules, which these follow op for op
(tests/kernels checks them bitwise equal), and on CUDA it runs Liger's modules patched
in by `kiln.kernels.apply_liger_to_model`, whose ops tests/kernels checks against these.
"""

from __future__ import annotations

import math

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
# at V = 32k, 256 rows 1.11x, 512 rows 1.00x, 1024 rows 1.01x. 512 rows cost 64 MiB of
# logits at V = 32k and 256 MiB at 128k, a fraction (512 / H) of grad_weight, which every
# method must hold anyway.
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


# --------------------------------------------------------------------------- final-logit soft-capping


def check_softcap(name: str, softcap: float, arg: str = "softcap") -> None:
    """0 is off; a cap is positive and finite (an infinite one would give 0 x inf = NaN, not "off")."""
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"{name}: {arg} must be >= 0 and finite (0 = off), got {softcap}")


def soft_cap_(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """Gemma 2's final-logit soft-capping, softcap x tanh(logits / softcap), in place over
    fp32 logits (no gradient kept); softcap 0 returns the logits untouched."""
    if not softcap:
        return logits
    return logits.div_(softcap).tanh_().mul_(softcap)


def soft_cap_keeping_tanh(logits: torch.Tensor, softcap: float, out: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`soft_cap_` for a chunk whose gradient follows: (capped logits, tanh(logits / softcap)).

    The tanh overwrites the logits, and the capped logits go to `out` (a new tensor when
    None): one more fp32 buffer of the chunk's size, since the chain rule needs the tanh
    after the softmax has been written over the capped logits. softcap 0 returns (logits,
    None), and nothing changes.
    """
    if not softcap:
        return logits, None
    tanh = logits.div_(softcap).tanh_()
    if out is None:
        return tanh * softcap, tanh
    return torch.mul(tanh, softcap, out=out), tanh


def soft_cap_backward_(dlogits: torch.Tensor, tanh: torch.Tensor | None) -> torch.Tensor:
    """The gradient with respect to the capped logits, turned in place into the one with respect
    to the raw logits: d/dz of softcap x tanh(z / softcap) is 1 - tanh(z / softcap)^2. `tanh`
    (from `soft_cap_keeping_tanh`) is overwritten; None (no cap) leaves dlogits as it is."""
    if tanh is None:
        return dlogits
    return dlogits.mul_(tanh.square_().neg_().add_(1.0))


# --------------------------------------------------------------------------- the loss


def default_chunk_size(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk: the largest power of two whose fp32 logits fit CHUNK_BYTES, at most
    CHUNK_ROWS and at most `n_tokens` (a problem that fits in one chunk runs as one)."""
    rows = max(1, CHUNK_BYTES // (4 * vocab))
    rows = min(CHUNK_ROWS, 1 << (rows.bit_length() - 1))
    return max(1, min(n_tokens, rows))


def _valid_targets(name: str, targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """The mask of targets that are not `ignore_index`; any other target outside [0, vocab) is an error
    (gather would read out of bounds or fail far from the cause)."""
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(f"{name}: target {first} is outside the vocabulary [0, {vocab}) "
                         f"and is not ignore_index ({ignore_index})")
    return valid


def _chunked_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int, reduction: str, chunk_size: int,
                            grad_hidden_wanted: bool, grad_weight_wanted: bool, softcap: float = 0.0):
    """The chunk loop shared by the autograd Function and the no-grad path.

    Returns (loss fp32 scalar, grad_hidden or None, grad_weight in fp32 or None), the
    gradients being those of the loss itself (grad_output = 1).
    """
    n, _ = hidden.shape
    valid = _valid_targets("linear_cross_entropy", targets, weight.shape[0], ignore_index)
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
        if want_grads:
            logits, tanh = soft_cap_keeping_tanh(logits, softcap)  # (c, V) each, tanh None without a cap
        else:
            logits = soft_cap_(logits, softcap)
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
        soft_cap_backward_(dlogits, tanh)
        if grad_hidden_wanted:
            torch.mm(dlogits.to(hidden.dtype), weight, out=grad_hidden[start:stop])  # (c, H)
        if grad_weight_wanted:
            grad_weight.addmm_(dlogits.T, h.float())  # (V, H) += (V, c) @ (c, H)
        del logits, exp, dlogits, tanh
    return loss * scale, grad_hidden, grad_weight


def release_gradients(ctx, grad_output: torch.Tensor, name: str) -> tuple:
    """The backward of a scalar loss whose forward already computed (grad_hidden,
    grad_weight) for an upstream gradient of 1 and kept them on `ctx`: scaled by the
    upstream gradient and released, so a second backward through the same loss fails
    clearly instead of reusing freed buffers."""
    if not hasattr(ctx, "grad_hidden"):
        raise RuntimeError(f"{name}: backward ran twice through the same loss; its gradients are computed in "
                           "forward and released by the first backward")
    grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
    del ctx.grad_hidden, ctx.grad_weight
    # In place: a copy would double grad_weight's (V, H) memory at the end of backward.
    if grad_hidden is not None:
        grad_hidden.mul_(grad_output)
    if grad_weight is not None:
        grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
    return grad_hidden, grad_weight


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
    (a second `backward(retain_graph=True)` raises). With a soft-cap, a chunk holds a
    second (chunk x V) fp32 tensor, the tanh, for the chain rule.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size,
                grad_hidden_wanted, grad_weight_wanted, softcap):
        loss, grad_hidden, grad_weight = _chunked_loss_and_grads(
            hidden, weight, targets, ignore_index, reduction, chunk_size, grad_hidden_wanted, grad_weight_wanted,
            softcap)
        # Plain attributes, not save_for_backward: these are outputs of our own computation
        # that backward overwrites, not inputs autograd must guard against modification.
        ctx.grad_hidden, ctx.grad_weight = grad_hidden, grad_weight
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return (*release_gradients(ctx, grad_output, "linear_cross_entropy"), None, None, None, None, None, None,
                None)


def _flat_inputs(name: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
    """Checked (N, H) hidden, (V, H) weight and (N,) targets in the dtype the logits matmul
    runs in (the autocast dtype under autocast, as `F.linear` would; else the promoted one),
    and the chunk size (0 picks `default_chunk_size`)."""
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "do not fit (weight must be (vocab, hidden))")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"{name}: targets {tuple(targets.shape)} do not match hidden "
                         f"{tuple(hidden.shape)} without its last dimension")
    if chunk_size < 0:
        raise ValueError(f"{name}: chunk_size must be >= 0 (0 = automatic), got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    # Casts happen outside the autograd Functions so autograd carries the gradients back through them.
    hidden2d = hidden.to(dtype).reshape(-1, hidden.shape[-1])
    weight = weight.to(dtype)
    chunk = chunk_size or default_chunk_size(hidden2d.shape[0], weight.shape[0])
    return hidden2d, weight, targets.reshape(-1), chunk


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 0,
                         softcap: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T` against `targets`, chunked over tokens.

    hidden (..., H), weight (V, H) (a bias-free lm_head), targets (...) with values in
    [0, V) or `ignore_index`. reduction "mean" (over non-ignored tokens; 0 when all are
    ignored) or "sum". The loss is fp32 whatever the input dtype. chunk_size 0 picks
    `default_chunk_size`. Under autocast the matmuls run in the autocast dtype, as
    `F.linear` would. softcap > 0 soft-caps the fp32 logits first, softcap x
    tanh(logits / softcap) (Gemma 2); 0 is off.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    check_softcap("linear_cross_entropy", softcap)
    hidden2d, weight, targets1d, chunk = _flat_inputs("linear_cross_entropy", hidden, weight, targets, chunk_size)
    device_type = hidden.device.type
    grad_on = torch.is_grad_enabled()
    grad_hidden_wanted = grad_on and hidden2d.requires_grad
    grad_weight_wanted = grad_on and weight.requires_grad
    with torch.autocast(device_type, enabled=False):
        if not (grad_hidden_wanted or grad_weight_wanted):
            return _chunked_loss_and_grads(hidden2d, weight, targets1d, ignore_index, reduction, chunk,
                                           False, False, softcap)[0]
        return ChunkedLinearCrossEntropy.apply(hidden2d, weight, targets1d, ignore_index, reduction, chunk,
                                               grad_hidden_wanted, grad_weight_wanted, softcap)


# --------------------------------------------------------------------------- per-token log-probs


def _logits_buffer(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Flat fp32 storage for one chunk's logits, reused by every chunk. A fresh (chunk, V)
    tensor per chunk would, on the CPU, page-fault its way through each new allocation
    (~0.08 s per 256 MiB on 2 cores, a fifth of that chunk's matmul)."""
    rows = min(chunk_size, hidden.shape[0])
    return torch.empty(weight.shape[0] * rows, dtype=torch.float32, device=hidden.device)


def _chunk_logits_t(h: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """The chunk's logits, transposed: fp32 (V, c) in the front of `buffer`, the matmul in the
    input dtype as `(h @ weight.T).float()` would do it.

    Vocabulary-major because MKL computes `weight @ h.T` (V, c) faster than `h @ weight.T`
    (c, V), and backward's `addmm(grad_weight, dlogits_t, h)` then needs no transpose: 0.39
    vs 0.46 s and 0.40 vs 0.42 s at c = 512, H = 512, V = 128k on 2 cores, where the
    reductions over the vocabulary, now strided, cost under 0.01 s more.
    """
    vocab, rows = weight.shape[0], h.shape[0]
    logits_t = buffer[:vocab * rows].view(vocab, rows)  # contiguous, for mm's out=
    if h.dtype == torch.float32:
        return torch.mm(weight, h.T, out=logits_t)
    return logits_t.copy_(weight @ h.T)


def _chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                      chunk_size: int, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) fp32 log p(target) (0 where not `valid`) and (N,) fp32 log-sum-exp of each token's
    (soft-capped) logits."""
    n = hidden.shape[0]
    safe_targets = torch.where(valid, targets, 0)
    logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    buffer = _logits_buffer(hidden, weight, chunk_size)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        # As in `_chunked_loss_and_grads`: log-sum-exp in fp32, exp() in place over the
        # logits (torch.logsumexp would allocate a second (V, c) tensor).
        logits_t = soft_cap_(_chunk_logits_t(hidden[start:stop], weight, buffer), softcap)  # (V, c)
        target_logit = logits_t[safe_targets[start:stop], torch.arange(stop - start, device=hidden.device)]  # (c,)
        col_max = logits_t.amax(dim=0)  # (c,)
        sum_exp = logits_t.sub_(col_max).exp_().sum(dim=0)  # (c,)
        lse[start:stop] = col_max + sum_exp.log()
        logps[start:stop] = torch.where(valid[start:stop], target_logit - lse[start:stop], 0.0)
    return logps, lse


class ChunkedLinearLogprobs(torch.autograd.Function):
    """Per-token log p(target) under softmax(`hidden @ weight.T`), without the (tokens x vocab) logits.

    Unlike the cross-entropy's, these gradients cannot be computed in the forward: the
    upstream gradient of each token is known only after the whole forward (a DPO loss
    weighs a token by a function of its sequence's total log-prob), and grad_weight sums
    over tokens, so it cannot be rescaled per token afterwards. So forward keeps only each
    token's log-sum-exp (N floats) beside its inputs, and backward recomputes each chunk's
    logits, turns them in place into d/dlogits = grad_output x (one-hot - softmax) (the
    softmax as exp(logits - lse), no second reduction), and projects that onto grad_hidden
    (this chunk's rows) and grad_weight (an fp32 accumulator). Peak extra memory is one
    chunk's fp32 logits, as for `ChunkedLinearCrossEntropy`. The price is a fourth
    (N, H) x (H, V) matmul where naive autograd, which keeps the logits instead, does three;
    what it saves is naive's passes over full (N, V) tensors, which weigh less as H grows.
    benchmarks/post_memory.py, a DPO forward + backward on 2 CPU cores: 0.93-1.09x naive's
    time at H = 512 and 2048 tokens; 1.18-1.33x at H = 2048 and 1024 tokens
    (`--hidden 2048 --seq 256`), the 4/3 of the matmuls alone. Liger's fused linear
    cross-entropy with reduction "none" makes the same trade (`ctx.defer_grads`). With a
    soft-cap, backward holds a second chunk of fp32 logits: the tanh, for the chain rule.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, valid, chunk_size, softcap):
        logps, lse = _chunked_logprobs(hidden, weight, targets, valid, chunk_size, softcap)
        ctx.save_for_backward(hidden, weight, targets, valid, lse)
        ctx.chunk_size = chunk_size
        ctx.softcap = softcap
        return logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        hidden, weight, targets, valid, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        n = hidden.shape[0]
        # An ignored token's output is the constant 0: whatever its upstream gradient, it passes nothing on.
        token_grad = torch.where(valid, grad_output.float(), 0.0)  # (N,)
        safe_targets = torch.where(valid, targets, 0)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # fp32 accumulator whatever the weight dtype, as in `_chunked_loss_and_grads`; the
        # first chunk writes it (mm) and the others add to it (addmm), saving a pass of zeros.
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        buffer = _logits_buffer(hidden, weight, ctx.chunk_size)
        capped_buffer = _logits_buffer(hidden, weight, ctx.chunk_size) if ctx.softcap else None
        for start in range(0, n, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, n)
            h = hidden[start:stop]  # (c, H)
            g = token_grad[start:stop]  # (c,)
            logits_t = _chunk_logits_t(h, weight, buffer)  # (V, c)
            out = None if capped_buffer is None else capped_buffer[:logits_t.numel()].view(logits_t.shape)
            logits_t, tanh = soft_cap_keeping_tanh(logits_t, ctx.softcap, out=out)  # (V, c) each
            # d logp_i / d logits_i = one_hot(t_i) - softmax_i, times the upstream g_i.
            dlogits_t = logits_t.sub_(lse[start:stop]).exp_().mul_(-g)  # (V, c)
            dlogits_t[safe_targets[start:stop], torch.arange(stop - start, device=h.device)] += g
            soft_cap_backward_(dlogits_t, tanh)
            if want_hidden:
                torch.mm(dlogits_t.T.to(hidden.dtype), weight, out=grad_hidden[start:stop])  # (c, H)
            if want_weight and start == 0:
                torch.mm(dlogits_t, h.float(), out=grad_weight)  # (V, H) = (V, c) @ (c, H)
            elif want_weight:
                grad_weight.addmm_(dlogits_t, h.float())  # (V, H) += (V, c) @ (c, H)
        del buffer, capped_buffer
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                    chunk_size: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """log softmax(`hidden @ weight.T`)[target] of every token, chunked over tokens.

    hidden (..., H), weight (V, H) (a bias-free lm_head), targets (...) with values in
    [0, V) or `ignore_index`. Returns fp32 of the targets' shape, 0.0 at ignored tokens
    (so a sum over a row is its sequence log-prob). Differentiable in hidden and weight
    (see `ChunkedLinearLogprobs`). chunk_size 0 picks `default_chunk_size`; autocast and
    softcap as in `linear_cross_entropy`.
    """
    check_softcap("linear_logprobs", softcap)
    hidden2d, weight, targets1d, chunk = _flat_inputs("linear_logprobs", hidden, weight, targets, chunk_size)
    valid = _valid_targets("linear_logprobs", targets1d, weight.shape[0], ignore_index)
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden2d.requires_grad or weight.requires_grad):
            logps = ChunkedLinearLogprobs.apply(hidden2d, weight, targets1d, valid, chunk, softcap)
        else:
            logps = _chunked_logprobs(hidden2d, weight, targets1d, valid, chunk, softcap)[0]
    return logps.reshape(targets.shape)
