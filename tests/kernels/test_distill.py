"""kiln.kernels.linear_distill_loss: the chunked reference against naive full-logits
distillation losses written out with log_softmax (every kind, temperature, top-k, a
teacher top-k cache, ignored tokens, padded vocabularies, chunkings, Gemma 2's final-logit
soft-capping of either model; values, gradients and metrics), the cases with known
answers (a teacher as its own student, top1_mix by hand, every token ignored), the cache
against the teacher's hidden states (capped or not), Liger's fused linear JSD run on the
CPU (and, on CUDA, the Liger backend) against the reference, and the errors.
Tolerances: tests/kernels/test_linear_cross_entropy.py.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import kiln.kernels as K
from tests.kernels.common import LIGER_TOL, cuda_only, grads, leaf, soft_cap
from tests.kernels.test_linear_cross_entropy import LCE_LOSS_TOL, assert_grad_close

H_S, H_T, V_S = 24, 40, 130


def distill_inputs(batch_shape=(3, 7), vocab_s=V_S, vocab_t=V_S + 64, n_ignored=5, dtype=torch.float32, seed=0):
    """A student and a teacher that disagree (different hidden states and lm_heads) but not
    wildly: the teacher's logits are twice as large, so its distribution is peakier."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*batch_shape, H_S, generator=g).to(dtype)
    ws = (torch.randn(vocab_s, H_S, generator=g) / H_S**0.5).to(dtype)
    ht = torch.randn(*batch_shape, H_T, generator=g).to(dtype)
    wt = (2 * torch.randn(vocab_t, H_T, generator=g) / H_T**0.5).to(dtype)
    t = torch.randint(0, min(vocab_s, vocab_t), batch_shape, generator=g)
    t.view(-1)[torch.randperm(t.numel(), generator=g)[:n_ignored]] = -100
    return hs, ws, ht, wt, t


# --------------------------------------------------------------------------- the naive version (full logits)


def naive_distill(hs, ws, t, ht=None, wt=None, topk=None, loss="kl", alpha=0.9, beta=0.5, tau=1.0, top_k=0,
                  student_softcap=0.0, teacher_softcap=0.0):
    """(loss, metrics) from the full logits of every token at once."""
    vocab = ws.shape[0] if wt is None else min(ws.shape[0], wt.shape[0])
    valid = t != -100
    labels = torch.where(valid, t, 0)
    zs = soft_cap((hs @ ws[:vocab].T).float(), student_softcap)
    if topk is None:
        zt = soft_cap((ht @ wt[:vocab].T).float(), teacher_softcap).detach()
        values, ids = zt.topk(top_k, dim=-1) if top_k else (zt, None)
    else:
        values, ids = topk[0].float(), topk[1]

    def support(x):
        return x if ids is None else x.gather(-1, ids)

    def kl_div(log_p, log_q):  # KL(p || q) per token
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)

    ls, lt = F.log_softmax(zs / tau, -1), F.log_softmax(values / tau, -1)
    teacher_top = values.argmax(-1, keepdim=True) if ids is None else ids.gather(-1, values.argmax(-1, keepdim=True))
    if loss == "kl":
        per_token = tau**2 * kl_div(lt, support(ls))
    elif loss == "top1_mix":
        per_token = -(alpha * ls.gather(-1, teacher_top) + (1 - alpha) * ls.gather(-1, labels[..., None])).squeeze(-1)
    elif beta == 0:
        per_token = kl_div(lt, support(ls))
    elif beta == 1:
        per_token = kl_div(support(ls), lt)
    else:
        log_m = torch.logsumexp(torch.stack([lt + math.log(beta), support(ls) + math.log(1 - beta)]), 0)
        per_token = beta * kl_div(lt, log_m) + (1 - beta) * kl_div(support(ls), log_m)
    n = valid.sum().clamp(min=1)

    def mean(x):
        return (x * valid).sum() / n

    ls1, lt1 = F.log_softmax(zs, -1), F.log_softmax(values, -1)
    metrics = {"kl": mean(kl_div(lt1, support(ls1))),
               "teacher_agreement": mean((zs.argmax(-1) == teacher_top.squeeze(-1)).float()),
               "nll": mean(-ls1.gather(-1, labels[..., None]).squeeze(-1))}
    return mean(per_token), {k: v.detach() for k, v in metrics.items()}


def run(fn, hs, ws, t, **kw):
    """fn's (loss, metrics, grad_hidden, grad_weight) on fresh student leaves, the loss
    backpropagated with a random upstream gradient (so a wrong grad_output scaling shows)."""
    hr, wr = leaf(hs), leaf(ws)
    value, metrics = fn(hr, wr, t, **kw)
    gh, gw = grads(value, [hr, wr])
    return value.detach(), metrics, gh, gw


def reference(hs, ws, t, **kw):
    return K.linear_distill_loss(hs, ws, t, backend="reference", **kw)


# --------------------------------------------------------------------------- the reference against naive

CASES = [
    # (loss, beta, temperature, top_k, teacher as: hidden or cache, chunk_size); tau != 1 and
    # chunks that do not divide the 21 tokens throughout
    ("kl", 0.5, 1.0, 0, "hidden", 0),
    ("kl", 0.5, 2.0, 0, "hidden", 4),
    ("kl", 0.5, 0.7, 5, "hidden", 1),
    ("kl", 0.5, 2.0, 5, "cache", 8),
    ("top1_mix", 0.5, 1.0, 0, "hidden", 4),
    ("top1_mix", 0.5, 1.5, 3, "hidden", 5),
    ("top1_mix", 0.5, 2.0, 4, "cache", 16),
    ("jsd", 0.5, 1.0, 0, "hidden", 4),
    ("jsd", 0.0, 2.0, 0, "hidden", 5),  # Liger's beta = 0: forward KL
    ("jsd", 1.0, 2.0, 0, "hidden", 8),  # beta = 1: reverse KL
    ("jsd", 0.1, 1.5, 6, "hidden", 4),
    ("jsd", 1.0, 1.0, 6, "hidden", 4),
    ("jsd", 0.9, 0.5, 5, "cache", 0),
]


@pytest.mark.parametrize("loss,beta,tau,top_k,source,chunk_size", CASES)
def test_reference_matches_naive(loss, beta, tau, top_k, source, chunk_size):
    hs, ws, ht, wt, t = distill_inputs()
    alpha = 0.7
    if source == "cache":
        full = (ht @ wt[:V_S].T)
        topk = full.topk(top_k, dim=-1)
        teacher, naive_teacher = dict(teacher_topk=topk), dict(topk=topk)
    else:
        teacher = dict(teacher_hidden=ht, teacher_weight=wt, top_k=top_k)
        naive_teacher = dict(ht=ht, wt=wt, top_k=top_k)
    value, metrics, gh, gw = run(reference, hs, ws, t, loss=loss, alpha=alpha, beta=beta, temperature=tau,
                                 chunk_size=chunk_size, **teacher)
    value_n, metrics_n, ghn, gwn = run(naive_distill, hs, ws, t, loss=loss, alpha=alpha, beta=beta, tau=tau,
                                       **naive_teacher)
    assert value.dtype == torch.float32 and value.shape == ()
    # A real disagreement, not a vacuous 0 = 0 (the reverse KL over a top-k, where P_S does not
    # sum to 1, may be negative).
    assert abs(value.item()) > 0.05
    torch.testing.assert_close(value, value_n, **LCE_LOSS_TOL[torch.float32])
    assert_grad_close(gh, ghn, torch.float32)
    assert_grad_close(gw, gwn, torch.float32)
    assert set(metrics) == {"kl", "teacher_agreement", "nll"}
    for name in metrics:
        assert not metrics[name].requires_grad
        torch.testing.assert_close(metrics[name], metrics_n[name], **LCE_LOSS_TOL[torch.float32])
    assert torch.count_nonzero(gh[t == -100]) == 0  # ignored tokens pass nothing back


# (loss, beta, temperature, top_k, student_softcap, teacher_softcap, chunk_size): caps of 1.5 and
# 2.5 on logits whose largest are 4.7 (student) and 8 (teacher), each model capped alone and both.
SOFTCAP_CASES = [
    ("kl", 0.5, 1.0, 0, 1.5, 2.5, 4),
    ("kl", 0.5, 2.0, 5, 1.5, 0.0, 5),
    ("kl", 0.5, 1.5, 0, 0.0, 2.5, 8),
    ("top1_mix", 0.5, 1.5, 0, 1.5, 2.5, 4),
    ("top1_mix", 0.5, 1.0, 3, 1.5, 0.0, 0),
    ("jsd", 0.5, 1.0, 0, 1.5, 2.5, 4),
    ("jsd", 0.0, 2.0, 0, 0.0, 2.5, 5),
    ("jsd", 1.0, 1.5, 6, 1.5, 2.5, 4),
    ("jsd", 0.3, 0.7, 0, 1.5, 0.0, 16),
]


@pytest.mark.parametrize("loss,beta,tau,top_k,student_softcap,teacher_softcap,chunk_size", SOFTCAP_CASES)
def test_softcapped_reference_matches_naive(loss, beta, tau, top_k, student_softcap, teacher_softcap, chunk_size):
    """Each model's logits capped before the temperature, top-k and metrics; the student's
    gradient through 1 - tanh^2."""
    hs, ws, ht, wt, t = distill_inputs()
    kw = dict(loss=loss, alpha=0.7, beta=beta)
    caps = dict(student_softcap=student_softcap, teacher_softcap=teacher_softcap)
    value, metrics, gh, gw = run(reference, hs, ws, t, teacher_hidden=ht, teacher_weight=wt, top_k=top_k,
                                 temperature=tau, chunk_size=chunk_size, **caps, **kw)
    value_n, metrics_n, ghn, gwn = run(naive_distill, hs, ws, t, ht=ht, wt=wt, top_k=top_k, tau=tau, **caps, **kw)
    with torch.no_grad():  # the no-grad path caps the student in place: the same value
        no_grad, _ = reference(hs, ws, t, teacher_hidden=ht, teacher_weight=wt, top_k=top_k, temperature=tau,
                               chunk_size=chunk_size, **caps, **kw)
    uncapped, _ = reference(hs, ws, t, teacher_hidden=ht, teacher_weight=wt, top_k=top_k, temperature=tau,
                            chunk_size=chunk_size, **kw)
    # The caps move the loss by a thousand times its tolerance or more (top1_mix reads the
    # teacher only through its argmax, which a cap keeps: there the student's cap moves it).
    assert abs(value.item() - uncapped.item()) > 0.01
    torch.testing.assert_close(value, value_n, **LCE_LOSS_TOL[torch.float32])
    torch.testing.assert_close(no_grad, value, atol=0, rtol=0)
    assert_grad_close(gh, ghn, torch.float32)
    assert_grad_close(gw, gwn, torch.float32)
    for name in metrics:
        torch.testing.assert_close(metrics[name], metrics_n[name], **LCE_LOSS_TOL[torch.float32])
    assert torch.count_nonzero(gh[t == -100]) == 0


def test_softcap_zero_is_off_for_distillation():
    """Both caps 0 (and the cache's) are the uncapped path to the bit."""
    hs, ws, ht, wt, t = distill_inputs()
    for loss in ("kl", "top1_mix", "jsd"):
        kw = dict(teacher_hidden=ht, teacher_weight=wt, loss=loss, beta=0.3, temperature=1.5, chunk_size=4)
        torch.testing.assert_close(run(reference, hs, ws, t, student_softcap=0.0, teacher_softcap=0.0, **kw),
                                   run(reference, hs, ws, t, **kw), atol=0, rtol=0)
    torch.testing.assert_close(K.teacher_topk_logits(ht, wt[:V_S], 6, chunk_size=4, softcap=0.0),
                               K.teacher_topk_logits(ht, wt[:V_S], 6, chunk_size=4), atol=0, rtol=0)


def test_reference_matches_naive_bf16_student_vocab_padded_further_and_teacher_constant():
    """bf16 inputs (fp32 softmax math), a student vocabulary 64 rows longer than the
    teacher's (its extra rows get a zero gradient), and a teacher whose tensors require
    grad but receive none."""
    hs, ws, ht, wt, t = distill_inputs(vocab_s=V_S + 64, vocab_t=V_S, dtype=torch.bfloat16)
    hs_, ws_, ht_, wt_, _ = distill_inputs(vocab_s=V_S + 64, vocab_t=V_S, dtype=torch.float32)
    for dtype, (h, w, th, tw) in ((torch.bfloat16, (hs, ws, ht, wt)), (torch.float32, (hs_, ws_, ht_, wt_))):
        th, tw = leaf(th), leaf(tw)
        for loss in ("kl", "jsd"):
            value, metrics, gh, gw = run(reference, h, w, t, teacher_hidden=th, teacher_weight=tw, loss=loss,
                                         beta=0.3, temperature=2.0, chunk_size=4)
            value_n, metrics_n, ghn, gwn = run(naive_distill, h, w, t, ht=th, wt=tw, loss=loss, beta=0.3, tau=2.0)
            assert gh.dtype == dtype and gw.dtype == dtype
            torch.testing.assert_close(value, value_n, **LCE_LOSS_TOL[dtype])
            torch.testing.assert_close(metrics["nll"], metrics_n["nll"], **LCE_LOSS_TOL[dtype])
            assert_grad_close(gh, ghn, dtype)
            assert_grad_close(gw, gwn, dtype)
            assert torch.count_nonzero(gw[V_S:]) == 0
            assert th.grad is None and tw.grad is None


def test_no_grad_partial_grads_and_autocast():
    hs, ws, ht, wt, t = distill_inputs()
    kw = dict(teacher_hidden=ht, teacher_weight=wt, loss="jsd", beta=0.4, temperature=1.5, chunk_size=4)
    value_n, metrics_n, ghn, gwn = run(naive_distill, hs, ws, t, ht=ht, wt=wt, loss="jsd", beta=0.4, tau=1.5)
    with torch.no_grad():
        value, metrics = reference(leaf(hs), leaf(ws), t, **kw)
    assert not value.requires_grad
    torch.testing.assert_close(value, value_n, **LCE_LOSS_TOL[torch.float32])
    torch.testing.assert_close(metrics["kl"], metrics_n["kl"], **LCE_LOSS_TOL[torch.float32])
    hr = leaf(hs)  # frozen lm_head
    torch.testing.assert_close(grads(reference(hr, ws, t, **kw)[0], [hr])[0], ghn, atol=1e-6, rtol=1e-5)
    wr = leaf(ws)  # frozen trunk
    torch.testing.assert_close(grads(reference(hs, wr, t, **kw)[0], [wr])[0], gwn, atol=1e-6, rtol=1e-5)
    # Under bf16 autocast both models' matmuls run in bf16, as F.linear's would.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, _, gh, gw = run(reference, hs, ws, t, **kw)
        value_n, _, ghn, gwn = run(naive_distill, hs, ws, t, ht=ht, wt=wt, loss="jsd", beta=0.4, tau=1.5)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(value, value_n, **LCE_LOSS_TOL[torch.bfloat16])
    assert_grad_close(gh, ghn, torch.bfloat16)
    assert_grad_close(gw, gwn, torch.bfloat16)


def test_backward_runs_once():
    hs, ws, ht, wt, t = distill_inputs()
    value, _ = reference(leaf(hs), leaf(ws), t, teacher_hidden=ht, teacher_weight=wt)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        value.backward()


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("loss,beta,tau", [("kl", 0.5, 1.0), ("kl", 0.5, 2.0), ("jsd", 0.5, 1.0),
                                           ("jsd", 0.0, 2.0), ("jsd", 1.0, 0.5), ("jsd", 0.2, 1.5)])
def test_teacher_as_its_own_student_has_zero_loss_and_gradient(loss, beta, tau):
    hs, ws, _, _, t = distill_inputs()
    value, metrics, gh, gw = run(reference, hs, ws, t, teacher_hidden=hs, teacher_weight=ws, loss=loss, beta=beta,
                                 temperature=tau, chunk_size=4)
    assert abs(value.item()) <= 1e-6
    assert gh.abs().max().item() <= 1e-6 and gw.abs().max().item() <= 1e-6
    assert abs(metrics["kl"].item()) <= 1e-6
    assert metrics["teacher_agreement"].item() == 1.0
    # Against another teacher the same call's gradient is a hundred times that bound, or more.
    _, ws2, _, _, _ = distill_inputs(seed=1)
    _, _, gh2, _ = run(reference, hs, ws, t, teacher_hidden=hs, teacher_weight=ws2, loss=loss, beta=beta,
                       temperature=tau, chunk_size=4)
    assert gh2.abs().max().item() > 1e-4


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_top1_mix_by_hand(tau):
    """Identity lm_heads, so the hidden states are the logits. Token 0: the teacher's top-1
    is 1, the label 3; token 1: teacher top-1 0, label 2; token 2 ignored (the mean is over 2)."""
    student = [[1.0, 2.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0], [5.0, 0.0, 0.0, 0.0]]
    teacher = [[0.0, 5.0, 1.0, 0.0], [2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 9.0]]
    labels, teacher_top, alpha = [3, 2], [1, 0], 0.7
    hs, ht = torch.tensor(student), torch.tensor(teacher)
    eye = torch.eye(4)
    hr = leaf(hs)
    value, metrics = reference(hr, eye, torch.tensor([3, 2, -100]), teacher_hidden=ht, teacher_weight=eye,
                               loss="top1_mix", alpha=alpha, temperature=tau, chunk_size=2)
    value.backward()

    want, want_grad = 0.0, torch.zeros(3, 4)
    for i in range(2):
        z = [v / tau for v in student[i]]
        log_z = math.log(sum(math.exp(v) for v in z))
        want += -(alpha * (z[teacher_top[i]] - log_z) + (1 - alpha) * (z[labels[i]] - log_z)) / 2
        for v in range(4):  # d/dz_v: (softmax_v - target_v) / tau, over 2 tokens
            target = alpha * (v == teacher_top[i]) + (1 - alpha) * (v == labels[i])
            want_grad[i, v] = (math.exp(z[v] - log_z) - target) / tau / 2
    assert value.item() == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(hr.grad, want_grad, atol=1e-7, rtol=1e-6)
    assert metrics["teacher_agreement"].item() == 0.5  # student argmaxes 1, 2; the teacher's 1, 0
    assert metrics["nll"].item() == pytest.approx(
        sum(math.log(sum(math.exp(v) for v in student[i])) - student[i][labels[i]] for i in range(2)) / 2, rel=1e-6)


def test_top1_mix_agreement_by_hand():
    # The student's argmaxes 1, 2, 0; the teacher's 1, 0, 0: two of three tokens agree.
    eye = torch.eye(3)
    hs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    ht = torch.tensor([[0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [2.0, 0.0, 1.0]])
    _, metrics = reference(hs, eye, torch.tensor([0, 1, 2]), teacher_hidden=ht, teacher_weight=eye)
    assert metrics["teacher_agreement"].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("loss", ["kl", "top1_mix", "jsd"])
def test_every_token_ignored_gives_zero_not_nan(loss):
    hs, ws, ht, wt, t = distill_inputs(n_ignored=21)
    for teacher in (dict(teacher_hidden=ht, teacher_weight=wt),
                    dict(teacher_topk=(torch.full((3, 7, 4), float("nan")), torch.full((3, 7, 4), -1)))):
        value, metrics, gh, gw = run(reference, hs, ws, t, loss=loss, beta=0.3, temperature=2.0, chunk_size=4,
                                     **teacher)
        assert value.item() == 0.0
        assert all(m.item() == 0.0 for m in metrics.values())
        assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


# --------------------------------------------------------------------------- the teacher top-k cache


def test_teacher_topk_cache_equals_teacher_hidden_with_top_k():
    hs, ws, ht, wt, t = distill_inputs()
    values, indices = K.teacher_topk_logits(ht, wt[:V_S], 6, chunk_size=4)
    full = (ht @ wt[:V_S].T).float()
    assert values.shape == indices.shape == (3, 7, 6)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    want_values, want_indices = full.topk(6, dim=-1)
    torch.testing.assert_close(values, want_values, atol=1e-6, rtol=1e-6)
    assert torch.equal(indices, want_indices)
    for loss in ("kl", "top1_mix", "jsd"):
        kw = dict(loss=loss, beta=0.3, temperature=1.5, chunk_size=4)
        from_hidden = run(reference, hs, ws, t, teacher_hidden=ht, teacher_weight=wt, top_k=6, **kw)
        from_cache = run(reference, hs, ws, t, teacher_topk=(values, indices), **kw)
        # A cache stored compactly (bf16 would change the values; int32 ids do not change anything).
        from_int32 = run(reference, hs, ws, t, teacher_topk=(values, indices.int()), top_k=6, **kw)
        for got in (from_cache, from_int32):
            torch.testing.assert_close(got[0], from_hidden[0], atol=0, rtol=0)
            torch.testing.assert_close(got[1], from_hidden[1], atol=0, rtol=0)
            torch.testing.assert_close(got[2:], from_hidden[2:], atol=0, rtol=0)


def test_softcapped_teacher_topk_cache_equals_capped_teacher_hidden_with_top_k():
    """teacher_topk_logits(softcap=) holds the capped logits' top k, what teacher_softcap with
    top_k computes from the hidden states: the same loss, metrics and gradients to the bit."""
    hs, ws, ht, wt, t = distill_inputs()
    values, indices = K.teacher_topk_logits(ht, wt[:V_S], 6, chunk_size=4, softcap=2.5)
    want_values, want_indices = soft_cap((ht @ wt[:V_S].T).float(), 2.5).topk(6, dim=-1)
    torch.testing.assert_close(values, want_values, atol=1e-6, rtol=1e-6)
    assert torch.equal(indices, want_indices)
    assert values.abs().max().item() < 2.5  # capped, not raw (the raw largest is 8)
    for loss in ("kl", "top1_mix", "jsd"):
        kw = dict(loss=loss, beta=0.3, temperature=1.5, chunk_size=4, student_softcap=1.5)
        from_hidden = run(reference, hs, ws, t, teacher_hidden=ht, teacher_weight=wt, top_k=6, teacher_softcap=2.5,
                          **kw)
        from_cache = run(reference, hs, ws, t, teacher_topk=(values, indices), **kw)
        torch.testing.assert_close(from_cache, from_hidden, atol=0, rtol=0)


# --------------------------------------------------------------------------- Liger


@pytest.mark.parametrize("loss,beta,tau,vocab_t,chunk_size", [
    ("kl", 0.5, 1.0, V_S, 4),
    ("kl", 0.5, 2.0, V_S + 64, 5),  # tau^2, and a teacher vocabulary padded further
    ("jsd", 0.0, 1.5, V_S + 64, 4),
    ("jsd", 0.5, 1.0, V_S - 64, 8),  # a student vocabulary padded further
    ("jsd", 0.3, 2.0, V_S + 64, 4),
    ("jsd", 1.0, 0.7, V_S, 16),
])
def test_liger_fused_linear_jsd_on_cpu_matches_reference(loss, beta, tau, vocab_t, chunk_size):
    """Liger's fused linear JSD is plain PyTorch with compiled=False, so the CUDA path's
    call (options, kl's tau^2, the cut to the common vocabulary) runs here."""
    from kiln.kernels import liger

    hs, ws, ht, wt, t = distill_inputs(vocab_t=vocab_t)
    kw = dict(teacher_hidden=ht, teacher_weight=wt, loss=loss, beta=beta, temperature=tau, chunk_size=chunk_size)
    value, metrics, gh, gw = run(reference, hs, ws, t, **kw)
    value_l, metrics_l, gh_l, gw_l = run(functools.partial(liger.linear_distill_loss, compiled=False), hs, ws, t,
                                         **kw)
    torch.testing.assert_close(value_l, value, **LCE_LOSS_TOL[torch.float32])
    assert_grad_close(gh_l, gh, torch.float32)
    assert_grad_close(gw_l, gw, torch.float32)
    torch.testing.assert_close(metrics_l, metrics, atol=0, rtol=0)


def test_liger_path_falls_back_to_the_reference():
    from kiln.kernels import liger

    hs, ws, ht, wt, t = distill_inputs()
    cache = (ht @ wt[:V_S].T).topk(5)
    # Liger's fused linear JSD has no final-logit soft-cap: a capped student or teacher runs the reference.
    for kw in (dict(loss="top1_mix"), dict(loss="kl", top_k=5), dict(loss="jsd", teacher_topk=cache),
               dict(loss="kl", student_softcap=1.5), dict(loss="jsd", teacher_softcap=2.5)):
        teacher = {} if "teacher_topk" in kw else dict(teacher_hidden=ht, teacher_weight=wt)
        got = run(liger.linear_distill_loss, hs, ws, t, chunk_size=4, **teacher, **kw)
        want = run(reference, hs, ws, t, chunk_size=4, **teacher, **kw)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    with torch.no_grad():
        got = liger.linear_distill_loss(leaf(hs), leaf(ws), t, teacher_hidden=ht, teacher_weight=wt, chunk_size=4)
    torch.testing.assert_close(got, reference(hs, ws, t, teacher_hidden=ht, teacher_weight=wt, chunk_size=4),
                               atol=0, rtol=0)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss,beta,tau", [("kl", 0.5, 2.0), ("jsd", 0.5, 1.0), ("jsd", 0.0, 1.0)])
def test_liger_backend_matches_reference(dtype, loss, beta, tau):
    hs, ws, ht, wt, t = (x.cuda() for x in distill_inputs(vocab_s=1000, vocab_t=1064, dtype=dtype))
    kw = dict(teacher_hidden=ht, teacher_weight=wt, loss=loss, beta=beta, temperature=tau)
    results = [run(functools.partial(K.linear_distill_loss, backend=backend), hs, ws, t, **kw)
               for backend in ("reference", "liger")]
    (value_r, metrics_r, gh_r, gw_r), (value_l, metrics_l, gh_l, gw_l) = results
    torch.testing.assert_close(value_l, value_r, **LIGER_TOL[dtype])
    torch.testing.assert_close(metrics_l, metrics_r, atol=0, rtol=0)  # the same reference pass
    assert_grad_close(gh_l, gh_r, dtype, LIGER_TOL)
    assert_grad_close(gw_l, gw_r, dtype, LIGER_TOL)


# --------------------------------------------------------------------------- errors


def test_rejects_bad_input():
    hs, ws, ht, wt, t = distill_inputs()
    teacher = dict(teacher_hidden=ht, teacher_weight=wt)
    topk = K.teacher_topk_logits(ht, wt[:V_S], 4)
    cases = [
        (dict(loss="mse", **teacher), r"unknown loss 'mse' \(known: kl, top1_mix, jsd\)"),
        (dict(alpha=1.5, **teacher), r"alpha must be in \[0, 1\], got 1.5"),
        (dict(beta=-0.1, **teacher), r"beta must be in \[0, 1\], got -0.1"),
        (dict(temperature=0.0, **teacher), "temperature must be > 0 and finite, got 0.0"),
        (dict(top_k=-1, **teacher), "top_k must be >= 0"),
        (dict(top_k=V_S + 1, **teacher), f"top_k {V_S + 1} is larger than the vocabulary \\({V_S}\\)"),
        (dict(chunk_size=-1, **teacher), "chunk_size must be >= 0"),
        (dict(teacher_hidden=ht.to("meta"), teacher_weight=wt), r"must be on the student's device \(cpu\), got meta"),
        ({}, "exactly one of them"),
        (dict(teacher_topk=topk, **teacher), "exactly one of them"),
        (dict(teacher_hidden=ht), "teacher_weight goes with teacher_hidden"),
        (dict(teacher_topk=topk, teacher_weight=wt), "teacher_weight goes with teacher_hidden"),
        (dict(teacher_hidden=ht, teacher_weight=wt.T), r"teacher_hidden \(3, 7, 40\) and teacher_weight .* do not fit"),
        (dict(teacher_hidden=ht[:, :5], teacher_weight=wt), r"does not match targets \(3, 7\)"),
        (dict(teacher_topk=(topk[0], topk[1][:, :5])), "must both be targets' shape"),
        (dict(teacher_topk=topk[0]), r"must be a pair \(values, indices\)"),
        (dict(teacher_topk=(topk[0], topk[1].float())), "float values, integer indices"),
        (dict(teacher_topk=topk, top_k=3), "top_k 3 differs from the teacher_topk cache's k = 4"),
        (dict(teacher_topk=(topk[0], topk[1] + V_S)),
         rf"teacher_topk index \d+ at a non-ignored token is outside the student's vocabulary \[0, {V_S}\)"),
        (dict(student_softcap=-1.0, **teacher), r"student_softcap must be >= 0 and finite \(0 = off\), got -1.0"),
        (dict(teacher_softcap=float("inf"), **teacher), "teacher_softcap must be >= 0 and finite"),
        # A cache is capped when it is made; capping it here could cap it twice.
        (dict(teacher_topk=topk, teacher_softcap=30.0), r"teacher_softcap applies to teacher_hidden; .* "
                                                        r"\(teacher_topk_logits\(softcap=\.\.\.\)\)"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            reference(hs, ws, t, **kw)
    with pytest.raises(ValueError, match=r"student_weight must be \(vocab, hidden\)"):
        reference(hs, ws[0], t, **teacher)
    with pytest.raises(ValueError, match=r"linear_distill_loss: hidden .* do not fit"):
        reference(hs, ws[:, :5], t, **teacher)
    with pytest.raises(ValueError, match=r"linear_distill_loss: targets \(3, 5\) do not match hidden"):
        reference(hs, ws, t[:, :5], **teacher)
    # A target in the teacher's padding rows, beyond the student's vocabulary.
    bad = t.clone()
    bad[0, 0] = V_S
    with pytest.raises(ValueError, match=rf"target {V_S} is outside the vocabulary \[0, {V_S}\)"):
        reference(hs, ws, bad, **teacher)
    with pytest.raises(ValueError, match=r"teacher_topk_logits: k must be in \[1, 130\], got 0"):
        K.teacher_topk_logits(ht, wt[:V_S], 0)
    with pytest.raises(ValueError, match="teacher_topk_logits: hidden .* do not fit"):
        K.teacher_topk_logits(ht, wt.T, 4)
    with pytest.raises(ValueError, match="teacher_topk_logits: softcap must be >= 0 and finite"):
        K.teacher_topk_logits(ht, wt[:V_S], 4, softcap=-30.0)
    # The Liger path checks the same way before it calls Liger.
    from kiln.kernels import liger

    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        liger.linear_distill_loss(leaf(hs), ws, t, alpha=2.0, **teacher)
    with pytest.raises(ValueError, match="teacher_weight goes with teacher_hidden"):
        liger.linear_distill_loss(leaf(hs), ws, t, teacher_hidden=ht)
