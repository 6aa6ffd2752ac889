"""Knowledge distillation from hidden states: the chunked reference of `kiln.kernels.linear_distill_loss`.

A student learns from a teacher's next-token distribution. Both models' logits are
(tokens x vocab) tensors, 2 GiB each in fp32 for 4096 tokens at a 128k vocabulary, so
the loss walks over chunks of tokens as `reference.linear_cross_entropy` does: per chunk
it computes the student's logits (and the teacher's, from its hidden states), the loss,
its gradient with respect to the student's logits and, from the same logits, the
metrics; the gradient goes straight onto grad_hidden and grad_weight and the logits are
dropped (`ChunkedLinearDistill`). The teacher is a constant: it gets no gradient.

The teacher comes as its last hidden states and lm_head, or as a cache of its top-k
logits and their token ids (`teacher_topk_logits` makes one), so that it need not be
resident while the student trains.

Loss kinds, with P_S and P_T the student's and teacher's softmax of logits / temperature,
all in fp32 whatever the input dtype, each a mean over non-ignored tokens:

- "kl": tau^2 KL(P_T || P_S), Hinton et al.'s (2015) scaling, which keeps the gradient's
  size independent of tau; Gemma 2's distillation. Its gradient is that of the
  cross-entropy to P_T, but its value is 0 when the student matches the teacher.
- "top1_mix": -[alpha log P_S(teacher's argmax) + (1 - alpha) log P_S(label)], Apple
  AFM's target alpha one-hot(teacher top-1) + (1 - alpha) one-hot(label). The temperature
  divides the student's logits (the teacher's argmax does not depend on it); no tau^2.
- "jsd": generalized Jensen-Shannon in Liger-Kernel's convention (liger-kernel 0.8.5,
  `chunked_loss/jsd_loss.py` `LigerFusedLinearJSDFunction.distillation_loss_fn`, the
  same as its Triton `ops/jsd.py`): with M = beta P_T +
  (1 - beta) P_S, beta KL(P_T || M) + (1 - beta) KL(P_S || M), so beta weighs the
  teacher's side; beta = 0 is the forward KL(P_T || P_S) and beta = 1 the reverse
  KL(P_S || P_T). Those two ends are special cases, not the formula's limits (it tends to
  0 at both). No tau^2 (Liger has none).

With top-k (`top_k` > 0, or a cache), P_T is the softmax over the teacher's k largest
logits, and the KL and JSD sums run over those k tokens, P_S being the student's
full-vocabulary softmax read at them (it does not sum to 1 there); "top1_mix" takes the
largest of the k.

Logits are the models' own: a model with Gemma 2's final-logit soft-capping (softcap x
tanh(logits / softcap), before the softmax) has its cap applied to its fp32 logits before
anything above, the temperature included (`student_softcap`, `teacher_softcap`; a cache
holds the capped logits, `teacher_topk_logits(softcap=...)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kiln.kernels import reference

DISTILL_LOSSES = ("kl", "top1_mix", "jsd")


@dataclass(frozen=True)
class DistillOptions:
    loss: str  # one of DISTILL_LOSSES
    alpha: float  # top1_mix: the weight of the teacher's top-1
    beta: float  # jsd: the weight of the teacher's side of M
    temperature: float
    student_softcap: float = 0.0  # the student's final-logit soft-cap; 0 = off


@dataclass
class Teacher:
    """One call's teacher, detached: hidden states (N, H_t) and lm_head rows (V, H_t) in
    their matmul dtype, `top_k` 0 for the full vocabulary, `softcap` its final-logit
    soft-cap (0 = off); or a cache, values (N, k) fp32 (capped already, if the teacher
    caps) and indices (N, k) int64."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    top_k: int = 0
    softcap: float = 0.0
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def logits(self, start: int, stop: int, row_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens [start, stop)'s teacher logits (fp32) on their support: (c, V) and None,
        or (c, k) and the (c, k) token ids they belong to."""
        if self.values is None:
            logits = reference.soft_cap_((self.hidden[start:stop] @ self.weight.T).float(), self.softcap)  # (c, V)
            if not self.top_k:
                return logits, None
            return logits.topk(self.top_k, dim=-1)
        # An ignored row of a cache may hold anything (padding written as -1, say): give it
        # ids that gather safely and finite logits; its loss is dropped.
        ok = row_ok[:, None]
        k = self.values.shape[1]
        ids = torch.where(ok, self.indices[start:stop], torch.arange(k, device=ok.device))
        return torch.where(ok, self.values[start:stop], 0.0), ids


@dataclass
class DistillInputs:
    """`linear_distill_loss`'s arguments checked and flattened: student hidden (N, H_s) and
    lm_head rows (V, H_s) on the common vocabulary, in their matmul dtype; targets and their
    non-ignored mask (N,); the teacher; tokens per chunk."""

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    teacher: Teacher
    options: DistillOptions
    chunk: int


def _matmul_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The dtype `a @ b.T` runs in: autocast's under autocast (as F.linear), else the promoted one."""
    device_type = a.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(a.dtype, b.dtype)


def check_distill_inputs(name: str, student_hidden, student_weight, targets, teacher_hidden, teacher_weight,
                         teacher_topk, loss, alpha, beta, temperature, top_k, ignore_index,
                         chunk_size, student_softcap=0.0, teacher_softcap=0.0) -> DistillInputs:
    """Raise a ValueError naming `name` for anything `linear_distill_loss` cannot run, else
    the inputs flattened, cast and cut to the common vocabulary."""
    if loss not in DISTILL_LOSSES:
        raise ValueError(f"{name}: unknown loss {loss!r} (known: {', '.join(DISTILL_LOSSES)})")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{name}: alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name}: beta must be in [0, 1], got {beta}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{name}: temperature must be > 0 and finite, got {temperature}")
    if top_k < 0:
        raise ValueError(f"{name}: top_k must be >= 0 (0 = the full vocabulary), got {top_k}")
    reference.check_softcap(name, student_softcap, "student_softcap")
    reference.check_softcap(name, teacher_softcap, "teacher_softcap")
    if (teacher_hidden is None) == (teacher_topk is None):
        raise ValueError(f"{name}: give the teacher as teacher_hidden with teacher_weight, or as teacher_topk "
                         "(values, indices), exactly one of them")
    if (teacher_weight is None) != (teacher_hidden is None):
        raise ValueError(f"{name}: teacher_weight goes with teacher_hidden (one without the other)")
    if student_weight.dim() != 2:
        raise ValueError(f"{name}: student_weight must be (vocab, hidden), got {tuple(student_weight.shape)}")
    # The student's shapes (as reference._flat_inputs words them) before the teacher's, which are compared to them.
    if student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"{name}: hidden {tuple(student_hidden.shape)} and weight {tuple(student_weight.shape)} "
                         "do not fit (weight must be (vocab, hidden))")
    if student_hidden.shape[:-1] != targets.shape:
        raise ValueError(f"{name}: targets {tuple(targets.shape)} do not match hidden "
                         f"{tuple(student_hidden.shape)} without its last dimension")

    teacher_tensors = (teacher_hidden, teacher_weight) if teacher_hidden is not None else tuple(teacher_topk)
    if any(torch.is_tensor(x) and x.device != student_hidden.device for x in teacher_tensors):
        raise ValueError(f"{name}: the teacher's tensors must be on the student's device ({student_hidden.device}), "
                         f"got {', '.join(str(x.device) for x in teacher_tensors if torch.is_tensor(x))}")
    if teacher_hidden is not None:
        if teacher_weight.dim() != 2 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(f"{name}: teacher_hidden {tuple(teacher_hidden.shape)} and teacher_weight "
                             f"{tuple(teacher_weight.shape)} do not fit (weight must be (vocab, hidden))")
        if teacher_hidden.shape[:-1] != targets.shape:
            raise ValueError(f"{name}: teacher_hidden {tuple(teacher_hidden.shape)} does not match targets "
                             f"{tuple(targets.shape)} (one hidden state per target)")
        # Vocabularies padded to different multiples share their first rows, which hold every
        # token the tokenizer produces (the caller's check); the rows beyond are never targets.
        vocab = min(student_weight.shape[0], teacher_weight.shape[0])
        if top_k > vocab:
            raise ValueError(f"{name}: top_k {top_k} is larger than the vocabulary ({vocab})")
    else:
        if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
            raise ValueError(f"{name}: teacher_topk must be a pair (values, indices)")
        values, indices = teacher_topk
        if values.shape != indices.shape or values.shape[:-1] != targets.shape:
            raise ValueError(f"{name}: teacher_topk values {tuple(values.shape)} and indices "
                             f"{tuple(indices.shape)} must both be targets' shape {tuple(targets.shape)} plus k")
        if not values.is_floating_point() or indices.is_floating_point() or indices.is_complex():
            raise ValueError(f"{name}: teacher_topk must be (float values, integer indices), got "
                             f"({values.dtype}, {indices.dtype})")
        vocab = student_weight.shape[0]
        k = values.shape[-1]
        if not 1 <= k <= vocab:
            raise ValueError(f"{name}: teacher_topk holds k = {k} logits per token; k must be in [1, {vocab}]")
        if top_k not in (0, k):
            raise ValueError(f"{name}: top_k {top_k} differs from the teacher_topk cache's k = {k} "
                             "(give 0 or k)")
        if teacher_softcap:
            # Capping here would cap a cache made with teacher_topk_logits(softcap=...) twice.
            raise ValueError(f"{name}: teacher_softcap applies to teacher_hidden; a teacher_topk cache holds "
                             "the logits as made, so cap them there (teacher_topk_logits(softcap=...))")

    hidden2d, weight, targets1d, chunk = reference._flat_inputs(name, student_hidden, student_weight[:vocab],
                                                                targets, chunk_size)
    valid = reference._valid_targets(name, targets1d, vocab, ignore_index)
    options = DistillOptions(loss, float(alpha), float(beta), float(temperature), float(student_softcap))
    if teacher_hidden is not None:
        dtype = _matmul_dtype(teacher_hidden, teacher_weight)
        teacher = Teacher(hidden=teacher_hidden.detach().to(dtype).reshape(-1, teacher_hidden.shape[-1]),
                          weight=teacher_weight.detach()[:vocab].to(dtype), top_k=top_k,
                          softcap=float(teacher_softcap))
    else:
        values = values.detach().float().reshape(-1, k)
        indices = indices.detach().long().reshape(-1, k)
        bad = valid[:, None] & ((indices < 0) | (indices >= vocab))
        if bool(bad.any()):
            raise ValueError(f"{name}: teacher_topk index {int(indices[bad][0])} at a non-ignored token is outside "
                             f"the student's vocabulary [0, {vocab}); make the cache from the teacher's lm_head "
                             f"rows [:{vocab}]")
        teacher = Teacher(values=values, indices=indices)
    return DistillInputs(hidden2d, weight, targets1d, valid, teacher, options, chunk)


# --------------------------------------------------------------------------- one chunk


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension in place (torch.log_softmax would hold a second (c, V))."""
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p_v (log p_v - log q_v) per row."""
    return log_p.exp().mul_(log_p - log_q).sum(-1)


def _chunk_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor | None,
                 labels: torch.Tensor, o: DistillOptions, want_grad: bool):
    """One chunk's per-token loss, metrics and d loss / d student logits.

    student_logits (c, V) fp32, soft-capped already if the student caps; teacher_logits
    (c, V) fp32 with ids None, or (c, k) at token ids (c, k); both are overwritten. Returns
    (loss, kl at tau = 1, agreement, nll), each (c,), and the (c, V) gradient of each
    token's own loss with respect to the (capped) student logits, or None. Besides the two
    logits, at most three (c, V) fp32 tensors live at a time.
    """
    tau = o.temperature

    def on_support(log_probs):
        return log_probs if ids is None else log_probs.gather(1, ids)

    teacher_top = teacher_logits.argmax(-1)  # (c,)
    if ids is not None:
        teacher_top = ids.gather(1, teacher_top[:, None]).squeeze(1)
    agreement = student_logits.argmax(-1) == teacher_top  # (c,)
    log_ps = _log_softmax_(student_logits)  # (c, V)
    log_pt = _log_softmax_(teacher_logits)  # (c, V) or (c, k)
    nll = -log_ps.gather(1, labels[:, None]).squeeze(1)
    # The metrics are at tau = 1 whatever the loss's temperature: what recipes compare students
    # by. The "kl" loss at tau = 1 is this KL itself, taken from the loss below.
    forward_kl = o.loss == "kl" or (o.loss == "jsd" and o.beta == 0.0)
    kl = None if forward_kl and tau == 1.0 else _kl(log_pt, on_support(log_ps))
    if tau != 1.0:
        # log_softmax(z / tau) = log_softmax(log_softmax(z) / tau): a row's constant shift cancels.
        log_ps = _log_softmax_(log_ps.div_(tau))
        log_pt = _log_softmax_(log_pt.div_(tau))

    # Each kind's per-token loss and its gradient with respect to the student's log-probs on
    # the support (`grad`); top1_mix's target distribution is written in directly below.
    log_ps_sup = on_support(log_ps)
    if o.loss == "top1_mix":
        loss = -(o.alpha * log_ps.gather(1, teacher_top[:, None]) +
                 (1 - o.alpha) * log_ps.gather(1, labels[:, None])).squeeze(1)
    elif forward_kl:  # KL(P_T || P_S); "kl" scaled by tau^2
        factor = tau**2 if o.loss == "kl" else 1.0
        pt = log_pt.exp()
        loss = (pt * (log_pt - log_ps_sup)).sum(-1).mul_(factor)
        grad = pt.mul_(-factor)
    elif o.beta == 1.0:  # reverse KL(P_S || P_T)
        ps = log_ps_sup.exp()
        ratio = log_ps_sup - log_pt
        loss = (ps * ratio).sum(-1)
        grad = ps.mul_(ratio.add_(1.0))
    else:
        # log M in log space (logaddexp): M itself underflows where both probabilities are tiny.
        log_m = torch.logaddexp(log_pt + math.log(o.beta), log_ps_sup + math.log1p(-o.beta))
        loss = o.beta * _kl(log_pt, log_m)
        student_side = log_ps_sup - log_m
        del log_m
        ps = log_ps_sup.exp()
        loss += (1 - o.beta) * (ps * student_side).sum(-1)
        # d/dP_S of the JSD is (1 - beta) log(P_S / M) (the other terms cancel), so d/dlog P_S
        # is (1 - beta) P_S log(P_S / M).
        grad = ps.mul_(student_side).mul_(1 - o.beta)
    if kl is None:
        kl = loss
    if not want_grad:
        return loss, kl, agreement, nll, None

    # log P_S = z/tau - logsumexp(z/tau): d/dz = (g - P_S sum(g)) / tau for a gradient g on
    # the log-probs, scattered from the support onto the vocabulary.
    ps_full = log_ps.exp_()  # (c, V), in place: the log-probs are not needed any more
    if o.loss == "top1_mix":
        rows = torch.arange(ps_full.shape[0], device=ps_full.device)
        dlogits = ps_full
        dlogits[rows, teacher_top] -= o.alpha  # two statements: teacher_top may equal the label
        dlogits[rows, labels] -= 1 - o.alpha
    else:
        dlogits = ps_full.mul_(-grad.sum(-1, keepdim=True))
        if ids is None:
            dlogits.add_(grad)
        else:
            dlogits.scatter_add_(1, ids, grad)
    if tau != 1.0:
        dlogits.div_(tau)
    return loss, kl, agreement, nll, dlogits


# --------------------------------------------------------------------------- the chunk loop


def _distill_chunks(x: DistillInputs, grad_hidden_wanted: bool, grad_weight_wanted: bool):
    """Loss, kl, teacher_agreement, nll (fp32 scalars, means over non-ignored tokens, 0 when
    there are none) and the loss's gradients: grad_hidden (N, H_s) and grad_weight (V, H_s)
    in fp32, or None where not wanted."""
    hidden, weight, valid = x.hidden, x.weight, x.valid
    n = hidden.shape[0]
    scale = 1.0 / max(int(valid.sum()), 1)
    labels = torch.where(valid, x.targets, 0)
    want_grads = grad_hidden_wanted or grad_weight_wanted
    sums = torch.zeros(4, dtype=torch.float32, device=hidden.device)  # loss, kl, agreement, nll
    grad_hidden = torch.empty_like(hidden) if grad_hidden_wanted else None
    # fp32 accumulator, as in reference._chunked_loss_and_grads: bf16 would round once per chunk.
    grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                   if grad_weight_wanted else None)
    for start in range(0, n, x.chunk):
        stop = min(start + x.chunk, n)
        h = hidden[start:stop]  # (c, H_s)
        row_ok = valid[start:stop]  # (c,)
        student_logits = (h @ weight.T).float()  # (c, V)
        if want_grads:
            student_logits, tanh = reference.soft_cap_keeping_tanh(student_logits, x.options.student_softcap)
        else:
            student_logits = reference.soft_cap_(student_logits, x.options.student_softcap)
        loss, kl, agreement, nll, dlogits = _chunk_terms(student_logits, *x.teacher.logits(start, stop, row_ok),
                                                         labels[start:stop], x.options, want_grads)
        sums += torch.where(row_ok, torch.stack([loss, kl, agreement.float(), nll]), 0.0).sum(1)
        if dlogits is None:
            continue
        reference.soft_cap_backward_(dlogits, tanh)  # d/d capped logits -> d/d raw logits
        dlogits.mul_((row_ok * scale)[:, None])  # (c, V): the mean's share, 0 on ignored tokens
        if grad_hidden_wanted:
            torch.mm(dlogits.to(hidden.dtype), weight, out=grad_hidden[start:stop])  # (c, H_s)
        if grad_weight_wanted:
            grad_weight.addmm_(dlogits.T, h.float())  # (V, H_s) += (V, c) @ (c, H_s)
        del dlogits, tanh
    loss, kl, agreement, nll = (s.clone() for s in (sums * scale).unbind())
    return loss, kl, agreement, nll, grad_hidden, grad_weight


class ChunkedLinearDistill(torch.autograd.Function):
    """A distillation loss of the student's `hidden @ weight.T` without the (tokens x vocab) logits.

    The loss is a scalar, so, as in `reference.ChunkedLinearCrossEntropy` (and Liger's
    fused distillation losses), each chunk's gradient is known in the forward: the chunk's
    d loss / d logits goes onto grad_hidden (its rows) and grad_weight (an fp32
    accumulator) at once, and backward only scales them by grad_output. Recomputing the
    chunks in backward instead (`reference.ChunkedLinearLogprobs`' way) would run both
    models' lm_head matmuls twice, and the teacher's, with its larger hidden size, is
    the costliest. Same price as the cross-entropy's: gradients are computed even if
    backward never runs (no-grad calls take a loss-only path), and backward runs once.

    Outputs: loss (differentiable in hidden and weight), then kl, teacher_agreement and
    nll (not differentiable). The teacher is data, never differentiated.
    """

    @staticmethod
    def forward(ctx, hidden, weight, inputs, grad_hidden_wanted, grad_weight_wanted):
        loss, kl, agreement, nll, grad_hidden, grad_weight = _distill_chunks(inputs, grad_hidden_wanted,
                                                                             grad_weight_wanted)
        ctx.grad_hidden, ctx.grad_weight = grad_hidden, grad_weight
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(kl, agreement, nll)
        return loss, kl, agreement, nll

    @staticmethod
    def backward(ctx, grad_loss, *_):
        return (*reference.release_gradients(ctx, grad_loss, "linear_distill_loss"), None, None, None)


def _metrics(kl: torch.Tensor, agreement: torch.Tensor, nll: torch.Tensor) -> dict:
    return {"kl": kl.detach(), "teacher_agreement": agreement.detach(), "nll": nll.detach()}


def distill_metrics(inputs: DistillInputs) -> dict:
    """The metrics alone, one no-grad pass over the chunks (for a loss computed elsewhere: Liger's)."""
    with torch.no_grad(), torch.autocast(inputs.hidden.device.type, enabled=False):
        _, kl, agreement, nll, _, _ = _distill_chunks(inputs, False, False)
    return _metrics(kl, agreement, nll)


def linear_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, targets: torch.Tensor,
                        teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                        teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None, loss: str = "kl",
                        alpha: float = 0.9, beta: float = 0.5, temperature: float = 1.0, top_k: int = 0,
                        ignore_index: int = -100, chunk_size: int = 0, student_softcap: float = 0.0,
                        teacher_softcap: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The distillation loss of `kiln.kernels.linear_distill_loss`, chunked over tokens
    (`ChunkedLinearDistill`). Returns (loss, metrics), both fp32.

    chunk_size 0 picks `reference.default_chunk_size` for the common vocabulary, which
    bounds one chunk's fp32 logits by 256 MiB; a chunk here holds up to five such (c, V)
    tensors at once (both models' logits and three temporaries; six with a
    `student_softcap`, whose tanh is kept for the chain rule), so pass a smaller
    chunk_size where that peak matters more than the thinner chunks' time.
    """
    x = check_distill_inputs("linear_distill_loss", student_hidden, student_weight, targets, teacher_hidden,
                             teacher_weight, teacher_topk, loss, alpha, beta, temperature, top_k, ignore_index,
                             chunk_size, student_softcap, teacher_softcap)
    grad_on = torch.is_grad_enabled()
    grad_hidden_wanted = grad_on and x.hidden.requires_grad
    grad_weight_wanted = grad_on and x.weight.requires_grad
    with torch.autocast(x.hidden.device.type, enabled=False):
        if grad_hidden_wanted or grad_weight_wanted:
            value, kl, agreement, nll = ChunkedLinearDistill.apply(x.hidden, x.weight, x, grad_hidden_wanted,
                                                                   grad_weight_wanted)
        else:
            value, kl, agreement, nll, _, _ = _distill_chunks(x, False, False)
    return value, _metrics(kl, agreement, nll)


def teacher_topk_logits(hidden: torch.Tensor, weight: torch.Tensor, k: int,
                        chunk_size: int = 0, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of `hidden @ weight.T` per token and their token ids, chunked,
    without gradients: the cache `linear_distill_loss(teacher_topk=...)` reads.

    hidden (..., H), weight (V, H). Returns values fp32 and indices int64, both (..., k),
    largest first. Pass the lm_head rows the student shares (weight[:V_student] when the
    teacher's vocabulary is padded further): the loss refuses ids outside the student's.
    The matmul runs in the dtype `linear_distill_loss` runs the teacher's in, so the cache
    holds what `teacher_hidden` with `top_k` = k would compute. softcap > 0 stores the
    teacher's soft-capped logits, softcap x tanh(logits / softcap) (a Gemma 2 teacher), what
    `teacher_softcap` = softcap would compute from its hidden states.
    """
    name = "teacher_topk_logits"
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not fit "
                         "(weight must be (vocab, hidden))")
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"{name}: k must be in [1, {weight.shape[0]}], got {k}")
    if chunk_size < 0:
        raise ValueError(f"{name}: chunk_size must be >= 0 (0 = automatic), got {chunk_size}")
    reference.check_softcap(name, softcap)
    dtype = _matmul_dtype(hidden, weight)
    hidden2d = hidden.detach().to(dtype).reshape(-1, hidden.shape[-1])
    weight = weight.detach().to(dtype)
    n = hidden2d.shape[0]
    chunk = chunk_size or reference.default_chunk_size(n, weight.shape[0])
    values = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=hidden.device)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            logits = reference.soft_cap_((hidden2d[start:stop] @ weight.T).float(), softcap)  # (c, V)
            torch.topk(logits, k, dim=-1, out=(values[start:stop], indices[start:stop]))
    return values.reshape(*hidden.shape[:-1], k), indices.reshape(*hidden.shape[:-1], k)
