"""kiln.kernels' post-training losses: `linear_logprobs` (the chunked reference against
naive full-logits log-softmax, outputs and gradients of a weighted sum), `dpo_loss` and
`reward_loss` against hand computations and `dpo_loss` against Liger's DPO loss function,
`linear_dpo_loss` against a naive full-logits DPO loss (NLL of fully masked chosen rows
included) and against Liger's fused DPO loss run on the CPU, both log-prob losses with
Gemma 2's final-logit soft-capping, and (on CUDA) the Liger path against the reference.
Tolerances: tests/kernels/common.py and test_linear_cross_entropy.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kiln.kernels as K
from tests.kernels.common import DTYPES, LIGER_TOL, cuda_only, grads, leaf, soft_cap
from tests.kernels.test_linear_cross_entropy import (LCE_GRAD_TOL, LCE_LOSS_TOL, SOFTCAP_CASES, assert_grad_close,
                                                     lce_inputs)

# --------------------------------------------------------------------------- naive versions (full logits)


def naive_logprobs(h, w, t, ignore_index=-100, softcap=0.0):
    valid = t != ignore_index
    log_softmax = F.log_softmax(soft_cap((h @ w.T).float(), softcap), dim=-1)
    logps = log_softmax.gather(-1, torch.where(valid, t, 0)[..., None]).squeeze(-1)
    return logps * valid


def naive_dpo(h, w, t, ref_chosen, ref_rejected, beta, loss_type, nll_weight, softcap=0.0):
    """DPO written out from full logits, as TRL's DPOTrainer computes it (summed log-probs)."""
    token_logps = naive_logprobs(h, w, t, softcap=softcap)  # (2B, T)
    pairs = t.shape[0] // 2
    seq = token_logps.sum(-1)
    logits = (seq[:pairs] - ref_chosen) - (seq[pairs:] - ref_rejected)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * logits).mean()
    elif loss_type == "ipo":
        loss = ((logits - 1 / (2 * beta)) ** 2).mean()
    else:
        loss = torch.relu(1 - beta * logits).mean()
    nll = -token_logps[:pairs].sum() / (t[:pairs] != -100).sum()
    return loss + nll_weight * nll, seq, nll


def assert_dpo_grad_close(got, want, dtype):
    """`assert_grad_close`, with fp32's absolute slack scaled by the largest gradient when that
    is above 1: IPO's upstream gradient per token is 2 (h - 1 / (2 beta)) / B, tens here, and
    rounding errors scale with the terms summed, not with the result."""
    if dtype == torch.float32:
        scale = max(1.0, want.abs().max().item())
        tolerances = {dtype: {k: v * scale if k == "atol" else v for k, v in LCE_GRAD_TOL[dtype].items()}}
        assert_grad_close(got, want, dtype, tolerances)
    else:
        assert_grad_close(got, want, dtype)


def dpo_inputs(pairs, seq, hidden, vocab, dtype, seed=0):
    """(2B, T) rows whose prompts (of 1 to T/2 tokens) and right padding are ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * pairs, seq, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype)
    t = torch.randint(0, vocab, (2 * pairs, seq), generator=g)
    for row in range(2 * pairs):
        prompt = int(torch.randint(1, seq // 2 + 1, (), generator=g))
        pad = int(torch.randint(0, seq // 4 + 1, (), generator=g))
        t[row, :prompt] = -100
        t[row, seq - pad:] = -100
    # Near a uniform model's, -log V per scored token, jittered so that some pairs rank either way.
    ref = -(t != -100).sum(-1).float() * math.log(vocab) + 10 * torch.randn(2 * pairs, generator=g)
    return h, w, t, ref[:pairs], ref[pairs:]


# --------------------------------------------------------------------------- linear_logprobs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_shape,hidden,vocab,n_ignored,chunk_size", [
    ((3, 7), 48, 257, 0, 0),  # default chunk: one chunk of 21 tokens
    ((3, 7), 48, 257, 5, 4),  # 4 does not divide 21: a last chunk of one token
    ((3, 7), 48, 257, 5, 1),  # one token per chunk
    ((37,), 33, 1000, 12, 16),  # flat tokens, odd hidden size, 16 does not divide 37
])
def test_linear_logprobs_matches_naive(dtype, batch_shape, hidden, vocab, n_ignored, chunk_size):
    h, w, t = lce_inputs(batch_shape, hidden, vocab, dtype, n_ignored)
    hr, wr = leaf(h), leaf(w)
    with K.use_backend("reference"):
        out = K.linear_logprobs(hr, wr, t, chunk_size=chunk_size)
    gh, gw = grads(out, [hr, wr])  # a random weighting of the outputs: each token's own upstream gradient
    hn, wn = leaf(h), leaf(w)
    out_n = naive_logprobs(hn, wn, t)
    ghn, gwn = grads(out_n, [hn, wn])
    assert out.dtype == torch.float32 and out.shape == t.shape
    assert gh.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(out, out_n.detach(), **LCE_LOSS_TOL[dtype])
    assert_grad_close(gh, ghn, dtype)
    assert_grad_close(gw, gwn, dtype)
    ignored = t == -100
    assert int(ignored.sum()) == n_ignored
    assert torch.all(out[ignored] == 0.0)  # exactly 0, so a row's sum is its sequence log-prob
    assert torch.count_nonzero(gh[ignored]) == 0


def test_linear_logprobs_chunking_partial_grads_no_grad_and_autocast():
    h, w, t = lce_inputs((3, 7), 48, 257, torch.float32, n_ignored=4)
    hn, wn = leaf(h), leaf(w)
    out_n = naive_logprobs(hn, wn, t)
    ghn, gwn = grads(out_n, [hn, wn])
    tol = dict(atol=1e-6, rtol=1e-5)
    with K.use_backend("reference"):
        for chunk in (1, 5, 8, 21):
            hr, wr = leaf(h), leaf(w)
            torch.testing.assert_close(grads(K.linear_logprobs(hr, wr, t, chunk_size=chunk), [hr, wr]),
                                       (ghn, gwn), **tol)
        hr = leaf(h)  # frozen lm_head: grad_hidden only
        torch.testing.assert_close(grads(K.linear_logprobs(hr, w, t, chunk_size=4), [hr])[0], ghn, **tol)
        wr = leaf(w)  # frozen trunk: grad_weight only
        torch.testing.assert_close(grads(K.linear_logprobs(h, wr, t, chunk_size=4), [wr])[0], gwn, **tol)
        with torch.no_grad():  # the reference model's log-probs: nothing saved for backward
            out = K.linear_logprobs(leaf(h), leaf(w), t, chunk_size=4)
        assert not out.requires_grad
        torch.testing.assert_close(out, out_n.detach(), **LCE_LOSS_TOL[torch.float32])
        # Under bf16 autocast the logits matmul runs in bf16 on the fp32 parameters, as F.linear's would.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hr, wr = leaf(h), leaf(w)
            out = K.linear_logprobs(hr, wr, t, chunk_size=4)
            gh, gw = grads(out, [hr, wr])
            hn, wn = leaf(h), leaf(w)
            out_n = naive_logprobs(hn, wn, t)  # h @ w.T is autocast to bf16 too
            ghn, gwn = grads(out_n, [hn, wn])
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(out, out_n.detach(), **LCE_LOSS_TOL[torch.bfloat16])
    assert_grad_close(gh, ghn, torch.bfloat16)
    assert_grad_close(gw, gwn, torch.bfloat16)


def test_linear_logprobs_rejects_bad_input():
    h, w, t = lce_inputs((3, 7), 48, 257, torch.float32)
    bad = t.clone()
    bad[2, 6] = -1
    with K.use_backend("reference"):
        with pytest.raises(ValueError, match=r"linear_logprobs: target -1 is outside the vocabulary \[0, 257\)"):
            K.linear_logprobs(h, w, bad)
        with pytest.raises(ValueError, match=r"linear_logprobs: hidden .* do not fit"):
            K.linear_logprobs(h, w.T, t)
        with pytest.raises(ValueError, match="linear_logprobs: targets .* do not match hidden"):
            K.linear_logprobs(h, w, t[:, :5])
        with pytest.raises(ValueError, match="linear_logprobs: chunk_size must be >= 0"):
            K.linear_logprobs(h, w, t, chunk_size=-1)
        with pytest.raises(ValueError, match=r"linear_logprobs: softcap must be >= 0 and finite \(0 = off\), got nan"):
            K.linear_logprobs(h, w, t, softcap=float("nan"))


@pytest.mark.parametrize("dtype,softcap,scale", SOFTCAP_CASES)
@pytest.mark.parametrize("chunk_size", [4, 0])
def test_softcapped_linear_logprobs_matches_naive(dtype, softcap, scale, chunk_size):
    """The cap in forward's chunks and again in backward's recomputed ones, whose gradient
    takes each token's own upstream weight before 1 - tanh^2."""
    h, w, t = lce_inputs((3, 7), 48, 257, dtype, n_ignored=5)
    w = w * scale
    hr, wr = leaf(h), leaf(w)
    with K.use_backend("reference"):
        out = K.linear_logprobs(hr, wr, t, chunk_size=chunk_size, softcap=softcap)
        uncapped = K.linear_logprobs(h, w, t, chunk_size=chunk_size)
        with torch.no_grad():
            no_grad = K.linear_logprobs(leaf(h), leaf(w), t, chunk_size=chunk_size, softcap=softcap)
    gh, gw = grads(out, [hr, wr])
    hn, wn = leaf(h), leaf(w)
    out_n = naive_logprobs(hn, wn, t, softcap=softcap)
    ghn, gwn = grads(out_n, [hn, wn])
    assert (out - uncapped).abs().max().item() > 0.25  # the cap moves some log-probs by half a nat at cap 2
    torch.testing.assert_close(out, out_n.detach(), **LCE_LOSS_TOL[dtype])
    torch.testing.assert_close(no_grad, out.detach(), atol=0, rtol=0)
    assert_grad_close(gh, ghn, dtype)
    assert_grad_close(gw, gwn, dtype)
    assert torch.all(out[t == -100] == 0.0)
    assert torch.count_nonzero(gh[t == -100]) == 0


def test_softcap_zero_is_off_for_logprobs_and_dpo():
    """softcap 0 is the uncapped path to the bit, log-probs, DPO loss and gradients alike."""
    h, w, t, ref_c, ref_r = dpo_inputs(pairs=2, seq=6, hidden=48, vocab=257, dtype=torch.float32)

    def logprobs_and_dpo(**softcap):
        hr, wr = leaf(h), leaf(w)
        out = K.linear_logprobs(hr, wr, t, chunk_size=4, **softcap)
        loss, _ = K.linear_dpo_loss(hr, wr, t, ref_c, ref_r, nll_weight=0.2, chunk_size=4, **softcap)
        return out, loss, *grads((out, loss), [hr, wr])

    with K.use_backend("reference"):
        torch.testing.assert_close(logprobs_and_dpo(softcap=0.0), logprobs_and_dpo(), atol=0, rtol=0)


# --------------------------------------------------------------------------- dpo_loss


def test_dpo_loss_by_hand():
    # Pair 1: chosen -10 vs ref -11 (+1), rejected -12 vs ref -11 (-1): h = 2.
    # Pair 2: chosen -15 vs ref -12 (-3), rejected -9 vs ref -10 (+1): h = -4.
    chosen, rejected = torch.tensor([-10.0, -15.0]), torch.tensor([-12.0, -9.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -12.0]), torch.tensor([-11.0, -10.0])
    beta = 0.1

    def neg_log_sigmoid(x):
        return math.log(1 + math.exp(-x))

    want = {
        "sigmoid": (neg_log_sigmoid(0.2) + neg_log_sigmoid(-0.4)) / 2,  # -log sigma(beta h)
        "ipo": ((2 - 5) ** 2 + (-4 - 5) ** 2) / 2,  # (h - 1 / (2 beta))^2, 1 / (2 x 0.1) = 5
        "hinge": ((1 - 0.2) + (1 + 0.4)) / 2,  # relu(1 - beta h)
    }
    for loss_type, value in want.items():
        loss, chosen_rewards, rejected_rewards = K.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
                                                            loss_type=loss_type)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(value, rel=1e-6), loss_type
        torch.testing.assert_close(chosen_rewards, torch.tensor([0.1, -0.3]))  # beta (chosen - ref_chosen)
        torch.testing.assert_close(rejected_rewards, torch.tensor([-0.1, 0.1]))
        assert not chosen_rewards.requires_grad
    # cDPO: a share e of labels flipped, -(1 - e) log sigma(beta h) - e log sigma(-beta h).
    loss, _, _ = K.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, label_smoothing=0.1)
    value = (0.9 * neg_log_sigmoid(0.2) + 0.1 * neg_log_sigmoid(-0.2)
             + 0.9 * neg_log_sigmoid(-0.4) + 0.1 * neg_log_sigmoid(0.4)) / 2
    assert loss.item() == pytest.approx(value, rel=1e-6)
    # The gradient of the sigmoid loss in the chosen log-prob: -beta sigma(-beta h) / B.
    c = leaf(chosen)
    K.dpo_loss(c, rejected, ref_chosen, ref_rejected, beta=beta)[0].backward()
    sigma = [1 / (1 + math.exp(0.2)), 1 / (1 + math.exp(-0.4))]
    torch.testing.assert_close(c.grad, torch.tensor([-0.1 * sigma[0] / 2, -0.1 * sigma[1] / 2]))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_dpo_loss_matches_liger_preference_loss_fn(loss_type):
    """Liger's DPO loss function (plain PyTorch) divides each chunk's summed losses by the
    number of pairs in the whole batch (`full_target.shape[0] // 2`), so it is called here
    once on the whole batch and once per chunk of pairs, summed; both are kiln's mean.
    Liger has no IPO (NotImplementedError in 0.8.5)."""
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

    g = torch.Generator().manual_seed(0)
    pairs = 6
    chosen, rejected, ref_chosen, ref_rejected = (-100 + 20 * torch.randn(pairs, generator=g) for _ in range(4))
    full_target = torch.zeros(2 * pairs, 9, dtype=torch.long)  # only its number of rows is read
    loss, chosen_rewards, rejected_rewards = K.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.05,
                                                        loss_type=loss_type)
    fn = LigerFusedLinearDPOFunction.preference_loss_fn
    liger_loss, liger_chosen, liger_rejected = fn(chosen, rejected, full_target, ref_chosen, ref_rejected,
                                                  beta=0.05, loss_type=loss_type)
    torch.testing.assert_close(loss, liger_loss, atol=0, rtol=1e-6)
    torch.testing.assert_close((chosen_rewards, rejected_rewards), (liger_chosen, liger_rejected), atol=0, rtol=0)
    per_chunk = sum(fn(chosen[s], rejected[s], full_target, ref_chosen[s], ref_rejected[s], beta=0.05,
                       loss_type=loss_type)[0] for s in (slice(0, 4), slice(4, 6)))
    torch.testing.assert_close(loss, per_chunk, atol=0, rtol=1e-6)


def test_dpo_loss_rejects_bad_options():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unknown loss_type 'kto' \(known: sigmoid, ipo, hinge\)"):
        K.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\), got 0.5"):
        K.dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type 'sigmoid' only, not 'ipo'"):
        K.dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"must all be \(B,\), got \(3,\), \(3,\), \(2,\), \(3,\)"):
        K.dpo_loss(x, x, torch.zeros(2), x)


# --------------------------------------------------------------------------- linear_dpo_loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("nll_weight,chunk_size", [(0.0, 0), (0.2, 5)])
def test_linear_dpo_loss_matches_naive(dtype, loss_type, nll_weight, chunk_size):
    h, w, t, ref_c, ref_r = dpo_inputs(pairs=3, seq=9, hidden=48, vocab=257, dtype=dtype)
    t[1] = -100  # one chosen row entirely masked: its log-prob is 0 and it adds no NLL tokens
    hr, wr = leaf(h), leaf(w)
    with K.use_backend("reference"):
        loss, metrics = K.linear_dpo_loss(hr, wr, t, ref_c, ref_r, beta=0.1, loss_type=loss_type,
                                          nll_weight=nll_weight, chunk_size=chunk_size)
    loss.backward()
    hn, wn = leaf(h), leaf(w)
    loss_n, seq_n, nll_n = naive_dpo(hn, wn, t, ref_c, ref_r, 0.1, loss_type, nll_weight)
    loss_n.backward()

    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Sequence log-probs sum ~7 token log-probs of ~-5.5: the per-token tolerance, summed.
    torch.testing.assert_close(metrics["chosen_logps"], seq_n[:3].detach(), **LCE_LOSS_TOL[dtype])
    torch.testing.assert_close(metrics["rejected_logps"], seq_n[3:].detach(), **LCE_LOSS_TOL[dtype])
    assert metrics["chosen_logps"][1].item() == 0.0
    torch.testing.assert_close(metrics["nll"], nll_n.detach(), **LCE_LOSS_TOL[dtype])
    torch.testing.assert_close(loss.detach(), loss_n.detach(), **LCE_LOSS_TOL[dtype])
    chosen_rewards = 0.1 * (metrics["chosen_logps"] - ref_c)
    rejected_rewards = 0.1 * (metrics["rejected_logps"] - ref_r)
    torch.testing.assert_close(metrics["chosen_rewards"], chosen_rewards, atol=0, rtol=0)
    torch.testing.assert_close(metrics["rejected_rewards"], rejected_rewards, atol=0, rtol=0)
    n_right = int((chosen_rewards > rejected_rewards).sum())
    assert 0 < n_right < 3  # the inputs rank pairs both ways
    assert metrics["accuracy"].item() == pytest.approx(n_right / 3)
    torch.testing.assert_close(metrics["margin"], (chosen_rewards - rejected_rewards).mean())
    assert all(not v.requires_grad for v in metrics.values())
    assert_dpo_grad_close(hr.grad, hn.grad, dtype)
    assert_dpo_grad_close(wr.grad, wn.grad, dtype)
    assert torch.count_nonzero(hr.grad[t == -100]) == 0


@pytest.mark.parametrize("dtype,loss_type", [(torch.float32, "sigmoid"), (torch.float32, "ipo"),
                                             (torch.bfloat16, "sigmoid")])
def test_softcapped_linear_dpo_loss_matches_naive(dtype, loss_type):
    """The policy's log-probs soft-capped (cap 2 on O(1) logits) through the DPO loss and its NLL term."""
    h, w, t, ref_c, ref_r = dpo_inputs(pairs=3, seq=9, hidden=48, vocab=257, dtype=dtype)
    hr, wr = leaf(h), leaf(w)
    with K.use_backend("reference"):
        loss, metrics = K.linear_dpo_loss(hr, wr, t, ref_c, ref_r, beta=0.1, loss_type=loss_type, nll_weight=0.2,
                                          chunk_size=5, softcap=2.0)
        _, uncapped = K.linear_dpo_loss(h, w, t, ref_c, ref_r, beta=0.1, loss_type=loss_type, chunk_size=5)
    loss.backward()
    hn, wn = leaf(h), leaf(w)
    loss_n, seq_n, nll_n = naive_dpo(hn, wn, t, ref_c, ref_r, 0.1, loss_type, 0.2, softcap=2.0)
    loss_n.backward()
    # Capping moves the chosen sequence log-probs by 0.2 to 1.6 nats here.
    assert (metrics["chosen_logps"] - uncapped["chosen_logps"]).abs().max().item() > 1.0
    torch.testing.assert_close(metrics["chosen_logps"], seq_n[:3].detach(), **LCE_LOSS_TOL[dtype])
    torch.testing.assert_close(metrics["rejected_logps"], seq_n[3:].detach(), **LCE_LOSS_TOL[dtype])
    torch.testing.assert_close(metrics["nll"], nll_n.detach(), **LCE_LOSS_TOL[dtype])
    torch.testing.assert_close(loss.detach(), loss_n.detach(), **LCE_LOSS_TOL[dtype])
    assert_dpo_grad_close(hr.grad, hn.grad, dtype)
    assert_dpo_grad_close(wr.grad, wn.grad, dtype)


def test_linear_dpo_loss_nll_is_zero_not_nan_when_every_chosen_token_is_masked():
    h, w, t, ref_c, ref_r = dpo_inputs(pairs=2, seq=6, hidden=48, vocab=257, dtype=torch.float32)
    t[:2] = -100  # both chosen rows: nothing to imitate
    with K.use_backend("reference"):
        hr, wr = leaf(h), leaf(w)
        loss, metrics = K.linear_dpo_loss(hr, wr, t, ref_c, ref_r, nll_weight=0.5, chunk_size=4)
        loss.backward()
        loss0, _ = K.linear_dpo_loss(h, w, t, ref_c, ref_r, nll_weight=0.0, chunk_size=4)
    assert metrics["nll"].item() == 0.0
    assert loss.item() == loss0.item()  # the NLL term adds exactly nothing
    assert torch.isfinite(hr.grad).all() and torch.isfinite(wr.grad).all()
    # What a mean over no tokens gives instead (TRL's and Liger's NLL).
    assert torch.isnan(naive_dpo(h, w, t, ref_c, ref_r, 0.1, "sigmoid", 0.5)[2])


@pytest.mark.parametrize("loss_type,pairs_per_chunk", [("sigmoid", 1), ("hinge", 2)])
def test_linear_dpo_loss_matches_liger_fused_dpo_on_cpu(loss_type, pairs_per_chunk):
    """Liger's fused DPO loss is plain PyTorch with compiled=False, so it runs here. It takes
    the reference as a reference model's hidden states and lm_head; kiln takes that model's
    sequence log-probs, computed here with linear_logprobs. Same summed log-probs
    (average_log_prob=False), same NLL (mean per non-ignored chosen token, alpha =
    nll_weight), same loss and gradients."""
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

    h, w, t, _, _ = dpo_inputs(pairs=3, seq=9, hidden=48, vocab=257, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    ref_h = h + 0.3 * torch.randn(h.shape, generator=g)
    ref_w = w + 0.3 * torch.randn(w.shape, generator=g) / 48**0.5
    with K.use_backend("reference"):
        ref_logps = K.linear_logprobs(ref_h, ref_w, t).sum(-1)
        hr, wr = leaf(h), leaf(w)
        loss, metrics = K.linear_dpo_loss(hr, wr, t, ref_logps[:3], ref_logps[3:], beta=0.2, loss_type=loss_type,
                                          nll_weight=0.3, chunk_size=4)
    loss.backward()
    hl, wl = leaf(h), leaf(w)
    # (input, weight, target, bias, ref_input, ref_weight, ref_bias, ignore_index, beta, compute_nll_loss,
    #  compiled, use_ref_model, average_log_prob, chunk_size, loss_type, label_smoothing, discopop_tau, alpha)
    liger_loss, aux = LigerFusedLinearDPOFunction.apply(hl, wl, t, None, ref_h, ref_w, None, -100, 0.2, True, False,
                                                        True, False, pairs_per_chunk, loss_type, 0.0, 0.05, 0.3)
    liger_loss.backward()
    chosen_logps, rejected_logps, _, _, nll = aux[:5]
    tol = dict(atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(loss.detach(), liger_loss.detach(), **tol)
    torch.testing.assert_close((metrics["chosen_logps"], metrics["rejected_logps"], metrics["nll"]),
                               (chosen_logps, rejected_logps, nll), **tol)
    torch.testing.assert_close((hr.grad, wr.grad), (hl.grad, wl.grad), atol=1e-6, rtol=1e-5)


def test_linear_dpo_loss_rejects_bad_input():
    h, w, t, ref_c, ref_r = dpo_inputs(pairs=2, seq=6, hidden=48, vocab=257, dtype=torch.float32)
    with K.use_backend("reference"):
        with pytest.raises(ValueError, match=r"hidden must be \(2B, T, H\) and targets \(2B, T\)"):
            K.linear_dpo_loss(h[:3], w, t[:3], ref_c, ref_r)
        with pytest.raises(ValueError, match=r"reference log-probs must be \(2,\) for 4 rows, got \(4,\)"):
            K.linear_dpo_loss(h, w, t, torch.cat([ref_c, ref_r]), ref_r)
        with pytest.raises(ValueError, match="linear_dpo_loss: unknown loss_type 'simpo'"):
            K.linear_dpo_loss(h, w, t, ref_c, ref_r, loss_type="simpo")


# --------------------------------------------------------------------------- reward_loss


def test_reward_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])  # r_c - r_r = 1, -1, -0.5
    margin = torch.tensor([0.5, 0.0, 1.0])

    def neg_log_sigmoid(x):
        return math.log(1 + math.exp(-x))

    loss, metrics = K.reward_loss(chosen, rejected)
    assert loss.item() == pytest.approx((neg_log_sigmoid(1) + neg_log_sigmoid(-1) + neg_log_sigmoid(-0.5)) / 3,
                                        rel=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)
    assert metrics["margin"].item() == pytest.approx(-1 / 6)
    # Llama 2's margin: -log sigma(r_c - r_r - m), differences 0.5, -1, -1.5.
    loss, metrics = K.reward_loss(chosen, rejected, margin)
    with_margin = (neg_log_sigmoid(0.5) + neg_log_sigmoid(-1) + neg_log_sigmoid(-1.5)) / 3
    assert loss.item() == pytest.approx(with_margin, rel=1e-6)
    assert metrics["margin"].item() == pytest.approx(-1 / 6)  # the rewards' margin, not the given one
    # Centring: + c x mean((r_c + r_r)^2), sums 1, 0, 4.5.
    c = leaf(chosen)
    loss, _ = K.reward_loss(c, rejected, margin, center_coefficient=0.01)
    assert loss.item() == pytest.approx(with_margin + 0.01 * (1 + 0 + 4.5**2) / 3, rel=1e-6)
    loss.backward()
    # d/d r_c: -sigma(-(d - m)) / B + c x 2 (r_c + r_r) / B
    want = [(-1 / (1 + math.exp(x)) + 0.01 * 2 * s) / 3 for x, s in ((0.5, 1.0), (-1.0, 0.0), (-1.5, 4.5))]
    torch.testing.assert_close(c.grad, torch.tensor(want))


def test_reward_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"chosen \(3,\), rejected \(3,\) and margin \(2,\) must have one shape"):
        K.reward_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2))


# --------------------------------------------------------------------------- Liger vs the reference (CUDA)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_linear_logprobs_matches_reference(dtype):
    h, w, t = (x.cuda() for x in lce_inputs((3, 7), 48, 1000, dtype, n_ignored=5))
    results = []
    for backend in ("reference", "liger"):
        hr, wr = leaf(h), leaf(w)
        out = K.linear_logprobs(hr, wr, t, backend=backend)
        results.append((out, grads(out, [hr, wr])))
    (out_r, (gh_r, gw_r)), (out_l, (gh_l, gw_l)) = results
    torch.testing.assert_close(out_l, out_r, **LIGER_TOL[dtype])
    assert torch.all(out_l[t == -100] == 0.0)
    assert_grad_close(gh_l, gh_r, dtype, LIGER_TOL)
    assert_grad_close(gw_l, gw_r, dtype, LIGER_TOL)


@cuda_only
@pytest.mark.parametrize("dtype,softcap,scale", SOFTCAP_CASES)
def test_liger_softcapped_linear_logprobs_matches_reference(dtype, softcap, scale):
    """Liger's reduction "none" recomputes the capped logits in its backward, as the reference does."""
    h, w, t = (x.cuda() for x in lce_inputs((3, 7), 48, 1000, dtype, n_ignored=5))
    w = w * scale
    results = []
    for backend in ("reference", "liger"):
        hr, wr = leaf(h), leaf(w)
        out = K.linear_logprobs(hr, wr, t, backend=backend, softcap=softcap)
        results.append((out, grads(out, [hr, wr])))
    (out_r, (gh_r, gw_r)), (out_l, (gh_l, gw_l)) = results
    torch.testing.assert_close(out_l, out_r, **LIGER_TOL[dtype])
    assert torch.all(out_l[t == -100] == 0.0)
    assert_grad_close(gh_l, gh_r, dtype, LIGER_TOL)
    assert_grad_close(gw_l, gw_r, dtype, LIGER_TOL)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type,nll_weight,softcap", [("sigmoid", 0.0, 0.0), ("sigmoid", 0.2, 0.0),
                                                         ("ipo", 0.2, 0.0), ("sigmoid", 0.2, 2.0)])
def test_liger_linear_dpo_loss_matches_reference(dtype, loss_type, nll_weight, softcap):
    h, w, t, ref_c, ref_r = (x.cuda() for x in dpo_inputs(pairs=3, seq=9, hidden=48, vocab=1000, dtype=dtype))
    t[1] = -100
    results = []
    for backend in ("reference", "liger"):
        hr, wr = leaf(h), leaf(w)
        loss, metrics = K.linear_dpo_loss(hr, wr, t, ref_c, ref_r, loss_type=loss_type, nll_weight=nll_weight,
                                          backend=backend, softcap=softcap)
        loss.backward()
        results.append((loss.detach(), metrics, hr.grad, wr.grad))
    (loss_r, m_r, gh_r, gw_r), (loss_l, m_l, gh_l, gw_l) = results
    # A sequence log-prob sums up to 7 token log-probs: 7 times Liger's per-token absolute
    # tolerance (the relative one holds for a sum of same-sign terms as it is).
    tol = dict(LIGER_TOL[dtype], atol=7 * LIGER_TOL[dtype]["atol"])
    torch.testing.assert_close(m_l["chosen_logps"], m_r["chosen_logps"], **tol)
    torch.testing.assert_close(m_l["rejected_logps"], m_r["rejected_logps"], **tol)
    torch.testing.assert_close(loss_l, loss_r, **tol)
    assert_grad_close(gh_l, gh_r, dtype, LIGER_TOL)
    assert_grad_close(gw_l, gw_r, dtype, LIGER_TOL)
