"""kiln.kernels.linear_cross_entropy, the model's loss: the chunked reference against
naive full-logits cross-entropy (every dtype, odd shapes, ignored tokens, chunkings,
autocast, partial gradients, Gemma 2's final-logit soft-capping), inside an
FSDP2-sharded module's forward as CausalLM.forward calls it, and (on CUDA) Liger's fused
loss against the reference. Tolerances: see tests/kernels/common.py and the comments below."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kiln.kernels as K
from kiln.kernels import reference
from tests.kernels.common import DTYPES, LIGER_TOL, cuda_only, leaf, soft_cap

# The logits matmul runs in the input dtype in both versions; they differ in (a) the
# order of the fp32 log-sum-exp/softmax arithmetic, (b) the chunked matmuls' blocking,
# which can move a bf16 logit or a bf16 dlogit by one step, and (c) grad_weight: the
# reference sums chunks in fp32 and rounds once, naive autograd rounds the (N, V)
# dlogits to bf16 before its single matmul. A 1-step difference in one logit moves a
# mean loss of ~6 by far less than 1e-3.
LCE_LOSS_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-6), torch.bfloat16: dict(atol=1e-3, rtol=1e-4)}
LCE_GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=0.0, rtol=1.6e-2)}


def assert_grad_close(got, want, dtype, tolerances=None):
    """bf16: naive autograd's per-term roundings (relative 2^-9 each) add up relative to
    the sum of |terms|, not to the result, which cancels towards 0 for many grad_weight
    entries; so the absolute slack is two bf16 steps of the largest entry (2^-7 x max)."""
    tol = dict((tolerances or LCE_GRAD_TOL)[dtype])
    if dtype == torch.bfloat16:
        tol["atol"] = 2**-7 * want.abs().max().item()
    torch.testing.assert_close(got, want, **tol)


def lce_inputs(batch_shape, hidden, vocab, dtype, n_ignored=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*batch_shape, hidden, generator=g).to(dtype)
    # lm_head-like scale (std 1/sqrt(H)) so logits are O(1) and the softmax is not one-hot
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype)
    t = torch.randint(0, vocab, batch_shape, generator=g)
    flat = t.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_ignored]] = -100
    return h, w, t


def naive_lce(h, w, t, reduction="mean", softcap=0.0):
    return F.cross_entropy(soft_cap((h @ w.T).float(), softcap), t, ignore_index=-100, reduction=reduction)


def run_lce(fn, h, w, t, **kw):
    hr, wr = leaf(h), leaf(w)
    loss = fn(hr, wr, t, **kw)
    loss.backward()
    return loss.detach(), hr.grad, wr.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_shape,hidden,vocab,n_ignored,chunk_size,reduction", [
    ((3, 7), 48, 257, 0, 0, "mean"),  # default chunk: one chunk of 21 tokens
    ((3, 7), 48, 257, 5, 4, "mean"),  # 4 does not divide 21: a last chunk of one token
    ((3, 7), 48, 257, 5, 1, "sum"),  # one token per chunk, summed
    ((2, 9), 48, 1000, 7, 5, "sum"),
    ((37,), 33, 1000, 12, 16, "mean"),  # flat tokens, odd hidden size
])
def test_linear_cross_entropy_matches_naive(dtype, batch_shape, hidden, vocab, n_ignored, chunk_size, reduction):
    h, w, t = lce_inputs(batch_shape, hidden, vocab, dtype, n_ignored)
    with K.use_backend("reference"):
        loss, gh, gw = run_lce(K.linear_cross_entropy, h, w, t, chunk_size=chunk_size, reduction=reduction)
    loss_n, ghn, gwn = run_lce(lambda a, b, c: naive_lce(a.reshape(-1, hidden), b, c.reshape(-1), reduction),
                               h, w, t)
    assert loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    assert gh.shape == h.shape
    torch.testing.assert_close(loss, loss_n, **LCE_LOSS_TOL[dtype])
    assert_grad_close(gh, ghn, dtype)
    assert_grad_close(gw, gwn, dtype)
    # Ignored tokens get exactly no gradient.
    ignored = t == -100
    assert int(ignored.sum()) == n_ignored
    assert torch.count_nonzero(gh[ignored]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_chunking_does_not_change_the_result(dtype):
    h, w, t = lce_inputs((21,), 48, 257, dtype, n_ignored=3)
    with K.use_backend("reference"):
        loss, gh, gw = run_lce(K.linear_cross_entropy, h, w, t, chunk_size=21)
        for chunk in (1, 4, 8, 20):
            loss_c, gh_c, gw_c = run_lce(K.linear_cross_entropy, h, w, t, chunk_size=chunk)
            torch.testing.assert_close(loss_c, loss, **LCE_LOSS_TOL[dtype])
            assert_grad_close(gh_c, gh, dtype)
            assert_grad_close(gw_c, gw, dtype)


def test_linear_cross_entropy_gradient_scaled_by_grad_output():
    h, w, t = lce_inputs((3, 7), 48, 257, torch.float32, n_ignored=2)
    hr, wr = leaf(h), leaf(w)
    with K.use_backend("reference"):
        (0.25 * K.linear_cross_entropy(hr, wr, t, chunk_size=4)).backward()
    _, ghn, gwn = run_lce(lambda a, b, c: 0.25 * naive_lce(a.reshape(-1, 48), b, c.reshape(-1)), h, w, t)
    torch.testing.assert_close((hr.grad, wr.grad), (ghn, gwn), **LCE_GRAD_TOL[torch.float32])


def test_linear_cross_entropy_all_ignored_is_zero_not_nan():
    h, w, t = lce_inputs((2, 5), 48, 257, torch.float32)
    t[:] = -100
    with K.use_backend("reference"):
        for reduction in ("mean", "sum"):
            loss, gh, gw = run_lce(K.linear_cross_entropy, h, w, t, chunk_size=3, reduction=reduction)
            assert loss.item() == 0.0
            assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    assert torch.isnan(naive_lce(h.reshape(-1, 48), w, t.reshape(-1)))  # what the naive mean gives


def test_linear_cross_entropy_partial_requires_grad_and_no_grad():
    h, w, t = lce_inputs((3, 7), 48, 257, torch.float32, n_ignored=4)
    loss_n, ghn, gwn = run_lce(lambda a, b, c: naive_lce(a.reshape(-1, 48), b, c.reshape(-1)), h, w, t)
    tol = LCE_GRAD_TOL[torch.float32]
    with K.use_backend("reference"):
        hr = leaf(h)  # frozen lm_head: only grad_hidden
        K.linear_cross_entropy(hr, w, t, chunk_size=4).backward()
        torch.testing.assert_close(hr.grad, ghn, **tol)
        wr = leaf(w)  # hidden without grad (e.g. a frozen trunk): only grad_weight
        K.linear_cross_entropy(h, wr, t, chunk_size=4).backward()
        torch.testing.assert_close(wr.grad, gwn, **tol)
        with torch.no_grad():  # evaluation: the loss only, nothing to backpropagate
            loss = K.linear_cross_entropy(leaf(h), leaf(w), t, chunk_size=4)
        assert not loss.requires_grad
        torch.testing.assert_close(loss, loss_n, **LCE_LOSS_TOL[torch.float32])


def test_linear_cross_entropy_under_cpu_autocast_matches_naive():
    """Under bf16 autocast F.linear runs in bf16 on fp32 parameters; so must the reference."""
    h, w, t = lce_inputs((3, 7), 48, 257, torch.float32, n_ignored=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), K.use_backend("reference"):
        loss, gh, gw = run_lce(K.linear_cross_entropy, h, w, t, chunk_size=4)
        loss_n, ghn, gwn = run_lce(
            lambda a, b, c: F.cross_entropy(F.linear(a.reshape(-1, 48), b).float(), c.reshape(-1)), h, w, t)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32  # grads of the fp32 leaves
    torch.testing.assert_close(loss, loss_n, **LCE_LOSS_TOL[torch.bfloat16])
    assert_grad_close(gh, ghn, torch.bfloat16)
    assert_grad_close(gw, gwn, torch.bfloat16)


def test_linear_cross_entropy_rejects_bad_input_and_second_backward():
    h, w, t = lce_inputs((3, 7), 48, 257, torch.float32)
    with K.use_backend("reference"):
        bad = t.clone()
        bad[1, 2] = 257
        with pytest.raises(ValueError, match=r"target 257 is outside the vocabulary \[0, 257\)"):
            K.linear_cross_entropy(h, w, bad)
        with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
            K.linear_cross_entropy(h, w, t, reduction="none")
        with pytest.raises(ValueError, match=r"do not fit \(weight must be \(vocab, hidden\)\)"):
            K.linear_cross_entropy(h, w.T, t)
        with pytest.raises(ValueError, match="targets .* do not match hidden"):
            K.linear_cross_entropy(h, w, t.reshape(-1))
        with pytest.raises(ValueError, match=r"softcap must be >= 0 and finite \(0 = off\), got -30.0"):
            K.linear_cross_entropy(h, w, t, softcap=-30.0)
        with pytest.raises(ValueError, match="softcap must be >= 0 and finite"):
            K.linear_cross_entropy(h, w, t, softcap=float("inf"))  # 30 x tanh(z / inf) would be 0 x inf = NaN
        loss = K.linear_cross_entropy(leaf(h), leaf(w), t)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="backward ran twice"):
            loss.backward()


def test_default_chunk_size_bounds_rows_and_bytes():
    assert (reference.CHUNK_BYTES, reference.CHUNK_ROWS) == (256 * 2**20, 512)
    # at most 512 rows, at most 256 MiB of fp32 logits (a power of two), at most the tokens
    assert reference.default_chunk_size(4096, 32_000) == 512  # 64 MiB
    assert reference.default_chunk_size(4096, 128_256) == 512  # 250 MiB
    assert reference.default_chunk_size(4096, 256_000) == 256  # the byte bound: 512 rows would be 500 MiB
    assert reference.default_chunk_size(21, 257) == 21
    assert reference.default_chunk_size(0, 257) == 1
    assert reference.default_chunk_size(10, 10**9) == 1


# --------------------------------------------------------------------------- final-logit soft-capping

# (dtype, softcap, logit scale): Gemma 2's cap of 30 on logits of that order (lm_head x 16:
# std 16, the largest 67, which the cap brings under 30), and a cap of 2 on O(1) logits
# (the largest 4), in both dtypes. Either way tanh is far from linear on the logits that
# count. The scales are powers of two, exact in bf16.
SOFTCAP_CASES = [(torch.float32, 30.0, 16.0), (torch.float32, 2.0, 1.0), (torch.bfloat16, 2.0, 1.0)]


@pytest.mark.parametrize("dtype,softcap,scale", SOFTCAP_CASES)
@pytest.mark.parametrize("reduction,chunk_size", [("mean", 4), ("sum", 0)])
def test_softcapped_linear_cross_entropy_matches_naive(dtype, softcap, scale, reduction, chunk_size):
    """cap x tanh(logits / cap) inside each chunk, its 1 - tanh^2 in the hand-written gradients:
    against autograd through the capped full logits."""
    h, w, t = lce_inputs((3, 7), 48, 257, dtype, n_ignored=5)
    w = w * scale
    with K.use_backend("reference"):
        loss, gh, gw = run_lce(K.linear_cross_entropy, h, w, t, chunk_size=chunk_size, reduction=reduction,
                               softcap=softcap)
        uncapped = K.linear_cross_entropy(h, w, t, chunk_size=chunk_size, reduction=reduction)
        with torch.no_grad():  # the loss-only path caps in place: the same value
            no_grad = K.linear_cross_entropy(leaf(h), leaf(w), t, chunk_size=chunk_size, reduction=reduction,
                                             softcap=softcap)
    loss_n, ghn, gwn = run_lce(lambda a, b, c: naive_lce(a.reshape(-1, 48), b, c.reshape(-1), reduction, softcap),
                               h, w, t)
    # The cap moves the loss (by 3 % at cap 2, 38 % at cap 30) far beyond the tolerance.
    assert abs(loss.item() - uncapped.item()) > 0.02 * abs(uncapped.item())
    assert gh.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(loss, loss_n, **LCE_LOSS_TOL[dtype])
    assert_grad_close(gh, ghn, dtype)
    assert_grad_close(gw, gwn, dtype)
    torch.testing.assert_close(no_grad, loss, atol=0, rtol=0)
    assert torch.count_nonzero(gh[t == -100]) == 0


def test_softcap_zero_is_off():
    """softcap 0 is the uncapped loss to the bit (the tests above hold that one to the naive
    loss): 0 never reaches the cap's arithmetic, where 0 x tanh(z / 0) would be NaN."""
    h, w, t = lce_inputs((3, 7), 48, 257, torch.float32, n_ignored=3)
    with K.use_backend("reference"):
        for reduction in ("mean", "sum"):
            got = run_lce(K.linear_cross_entropy, h, w, t, chunk_size=4, reduction=reduction, softcap=0.0)
            want = run_lce(K.linear_cross_entropy, h, w, t, chunk_size=4, reduction=reduction)
            torch.testing.assert_close(got, want, atol=0, rtol=0)


# --------------------------------------------------------------------------- under FSDP2


class HeadLoss(torch.nn.Module):
    """The tail of CausalLM.forward: the fused loss reads lm_head's weight inside a forward."""

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(48, 257, bias=False)

    def forward(self, hidden, targets):
        return K.linear_cross_entropy(hidden, self.lm_head.weight, targets, chunk_size=4)


@pytest.fixture
def gloo_world(tmp_path):
    """A one-process gloo world: enough for fully_shard to turn parameters into DTensors
    and run its unshard/reshard hooks, without paying for a second process."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this test process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mixed_precision", [False, True])
def test_linear_cross_entropy_inside_an_fsdp2_forward_matches_unsharded(gloo_world, mixed_precision):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    head = torch.nn.Linear(48, 257, bias=False)
    h, _, t = lce_inputs((3, 7), 48, 257, torch.float32, n_ignored=3)
    compute = torch.bfloat16 if mixed_precision else torch.float32

    # Expected: no FSDP, the computation FSDP2's policy implies (bf16 copies of hidden and weight).
    with K.use_backend("reference"):
        loss_ref, gh_ref, gw_ref = run_lce(
            lambda a, b, c: K.linear_cross_entropy(a.to(compute), b.to(compute), c, chunk_size=4),
            h, head.weight.detach(), t)

    sharded = HeadLoss()
    sharded.lm_head.load_state_dict(head.state_dict())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    fully_shard(sharded, mp_policy=policy, reshard_after_forward=True)
    # Outside a forward the weight is FSDP2's shard: exactly what a fused loss must not read.
    assert isinstance(sharded.lm_head.weight, DTensor)
    with K.use_backend("reference"), pytest.raises(ValueError, match="sharded DTensor"):
        K.linear_cross_entropy(h, sharded.lm_head.weight, t)

    hr = leaf(h)
    with K.use_backend("reference"):
        loss = sharded(hr, t)
    loss.backward()
    grad_w = sharded.lm_head.weight.grad
    assert isinstance(grad_w, DTensor)
    # Same numbers: with one rank the reduce-scatter is the identity, and the bf16
    # gradient is reduced in fp32 (reduce_dtype) before landing on the fp32 shard.
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), loss_ref, atol=0, rtol=0)
    torch.testing.assert_close(hr.grad, gh_ref.float(), atol=0, rtol=0)
    torch.testing.assert_close(grad_w.full_tensor(), gw_ref.float(), atol=0, rtol=0)


# --------------------------------------------------------------------------- Liger vs the reference (CUDA)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_liger_linear_cross_entropy_matches_reference(dtype, reduction):
    h, w, t = (x.cuda() for x in lce_inputs((3, 7), 48, 1000, dtype, n_ignored=5))
    results = []
    for backend in ("reference", "liger"):
        with K.use_backend(backend):
            results.append(run_lce(K.linear_cross_entropy, h, w, t, chunk_size=4, reduction=reduction))
    (loss_r, gh_r, gw_r), (loss_l, gh_l, gw_l) = results
    torch.testing.assert_close(loss_l, loss_r, **LIGER_TOL[dtype])
    # Liger writes each chunk's dlogits over its logits buffer, in the input dtype: its
    # bf16 grad_weight rounds dlogits as naive autograd does, hence the same slack.
    assert_grad_close(gh_l, gh_r, dtype, LIGER_TOL)
    assert_grad_close(gw_l, gw_r, dtype, LIGER_TOL)


@cuda_only
@pytest.mark.parametrize("dtype,softcap,scale", SOFTCAP_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_liger_softcapped_linear_cross_entropy_matches_reference(dtype, softcap, scale, reduction):
    """Liger's `softcap` (its Triton kernel caps in fp32 and applies 1 - tanh^2) against the
    reference's, with the tolerances of the uncapped comparison above."""
    h, w, t = (x.cuda() for x in lce_inputs((3, 7), 48, 1000, dtype, n_ignored=5))
    w = w * scale
    results = []
    for backend in ("reference", "liger"):
        with K.use_backend(backend):
            results.append(run_lce(K.linear_cross_entropy, h, w, t, chunk_size=4, reduction=reduction,
                                   softcap=softcap))
    (loss_r, gh_r, gw_r), (loss_l, gh_l, gw_l) = results
    torch.testing.assert_close(loss_l, loss_r, **LIGER_TOL[dtype])
    assert_grad_close(gh_l, gh_r, dtype, LIGER_TOL)
    assert_grad_close(gw_l, gw_r, dtype, LIGER_TOL)


@cuda_only
def test_liger_linear_cross_entropy_weight_grad_without_hidden_grad():
    h, w, t = (x.cuda() for x in lce_inputs((3, 7), 48, 257, torch.float32, n_ignored=2))
    out = []
    for backend in ("reference", "liger"):
        wr = leaf(w)
        with K.use_backend(backend):
            K.linear_cross_entropy(h, wr, t).backward()
        out.append(wr.grad)
    torch.testing.assert_close(out[1], out[0], **LIGER_TOL[torch.float32])
