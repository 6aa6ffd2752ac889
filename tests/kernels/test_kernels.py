"""kiln.kernels: each op against a naive PyTorch version written out here, against the
transformers code kiln's model runs, and (on CUDA) Liger against the references.

Tolerances are per dtype. fp32 results differ from the naive versions only by the order
of floating-point operations, so they are held to 1e-5-ish. bf16 has an 8-bit mantissa:
one rounding step is a relative 2^-8 (0.4 %), and two implementations that round an
intermediate differently land one or two bf16 steps apart, hence rtol 1.6e-2 (two steps
at the coarsest end of a binade, 2^-7 each; torch.testing's own bf16 default). Where
the reference performs the very same ops as transformers, equality is exact.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kiln.kernels as K
from kiln.config import ConfigError, from_dict
from kiln.kernels import reference

DTYPES = [torch.float32, torch.bfloat16]
# Elementwise ops (norm, activation, rotation): fp32 to a few ulps; bf16 to two steps.
ELEMENTWISE_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-3, rtol=1.6e-2)}
# Gradients that sum over tokens (RMSNorm's weight): in fp32 the two sum in a different
# order (1e-5 absolute on O(1) sums of 21-35 terms); in bf16 both accumulate in fp32 and
# round once, so the elementwise bound holds.
REDUCED_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: ELEMENTWISE_TOL[torch.bfloat16]}

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel needs a CUDA GPU")


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def grads(out, inputs, seed: int = 1):
    """Backpropagate a fixed random upstream gradient (not ones: a sum would hide a
    wrong sign per element) and return the inputs' gradients."""
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=g).to(o.dtype).to(o.device) for o in outs]
    return torch.autograd.grad(outs, inputs, upstream)


# --------------------------------------------------------------------------- RMSNorm


def naive_rms_norm(x, w, eps):
    xf = x.float()
    normed = xf / torch.sqrt((xf * xf).mean(dim=-1, keepdim=True) + eps)
    return w * normed.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 33), (5, 48)])
def test_rms_norm_matches_naive_and_transformers(dtype, shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    with K.use_backend("torch"):
        xr, wr = leaf(x), leaf(w)
        out = K.rms_norm(xr, wr, eps=1e-6)
        gx, gw = grads(out, (xr, wr))
    xn, wn = leaf(x), leaf(w)
    out_n = naive_rms_norm(xn, wn, 1e-6)
    gxn, gwn = grads(out_n, (xn, wn))
    assert out.dtype == dtype
    torch.testing.assert_close(out, out_n, **ELEMENTWISE_TOL[dtype])
    torch.testing.assert_close(gx, gxn, **ELEMENTWISE_TOL[dtype])
    torch.testing.assert_close(gw, gwn, **REDUCED_TOL[dtype])

    # transformers' LlamaRMSNorm runs the same ops in the same order: bitwise equal.
    hf = LlamaRMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
    xh = leaf(x)
    out_h = hf(xh)
    gxh, gwh = grads(out_h, (xh, hf.weight))
    torch.testing.assert_close(out, out_h, atol=0, rtol=0)
    torch.testing.assert_close(gx, gxh, atol=0, rtol=0)
    torch.testing.assert_close(gw, gwh, atol=0, rtol=0)


# --------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_naive_and_llama_mlp(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    gate, up = (torch.randn(3, 7, 35) * 2).to(dtype), torch.randn(3, 7, 35).to(dtype)
    with K.use_backend("torch"):
        g, u = leaf(gate), leaf(up)
        out = K.swiglu(g, u)
        gg, gu = grads(out, (g, u))
    gn, un = leaf(gate), leaf(up)
    # silu(x) = x * sigmoid(x), written out in fp32 and rounded once, as PyTorch's silu
    # kernel does: chained bf16 ops would round its gradient's two terms separately and
    # lose the result where they cancel (near gate = -1.28).
    gf = gn.float()
    out_n = (gf * torch.sigmoid(gf)).to(dtype) * un
    ggn, gun = grads(out_n, (gn, un))
    torch.testing.assert_close(out, out_n, **ELEMENTWISE_TOL[dtype])
    torch.testing.assert_close(gg, ggn, **ELEMENTWISE_TOL[dtype])
    torch.testing.assert_close(gu, gun, **ELEMENTWISE_TOL[dtype])

    # What LlamaMLP computes between its projections: act_fn(gate) * up, bitwise.
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=35, num_attention_heads=2, hidden_act="silu"))
    gh, uh = leaf(gate), leaf(up)
    out_h = mlp.act_fn(gh) * uh
    ggh, guh = grads(out_h, (gh, uh))
    torch.testing.assert_close(out, out_h, atol=0, rtol=0)
    torch.testing.assert_close((gg, gu), (ggh, guh), atol=0, rtol=0)


# --------------------------------------------------------------------------- RoPE


def llama_cos_sin(batch: int, seq: int, head_dim: int, dtype):
    """cos/sin (B, T, D) from transformers' own LlamaRotaryEmbedding, at shifted positions."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=64)
    rope = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(seq)[None].repeat(batch, 1) + torch.arange(batch)[:, None] * 5
    x = torch.zeros(batch, seq, head_dim, dtype=dtype)
    return rope(x, pos)


def naive_rope(x, cos, sin):
    """The rotation written per pair (i, i + D/2): (a, b) -> (a cos - b sin, b cos + a sin)."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]  # the two halves of cos/sin are equal
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rope_matches_naive_and_transformers(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 3, 6, 3, 7, 18  # GQA, odd sequence length, head_dim not a power of 2
    q, k = torch.randn(B, Hq, T, D).to(dtype), torch.randn(B, Hkv, T, D).to(dtype)
    cos, sin = llama_cos_sin(B, T, D, dtype)
    assert cos.shape == (B, T, D) and cos.dtype == dtype
    with K.use_backend("torch"):
        qr, kr = leaf(q), leaf(k)
        out_q, out_k = K.apply_rope(qr, kr, cos, sin)
        gq, gk = grads((out_q, out_k), (qr, kr))
    qn, kn = leaf(q), leaf(k)
    nq, nk = naive_rope(qn, cos, sin), naive_rope(kn, cos, sin)
    gqn, gkn = grads((nq, nk), (qn, kn))
    for got, want in ((out_q, nq), (out_k, nk), (gq, gqn), (gk, gkn)):
        torch.testing.assert_close(got, want, **ELEMENTWISE_TOL[dtype])

    qh, kh = leaf(q), leaf(k)
    hq, hk = apply_rotary_pos_emb(qh, kh, cos, sin)
    ghq, ghk = grads((hq, hk), (qh, kh))
    torch.testing.assert_close((out_q, out_k, gq, gk), (hq, hk, ghq, ghk), atol=0, rtol=0)


# --------------------------------------------------------------------------- linear cross-entropy

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


def naive_lce(h, w, t, reduction="mean"):
    return F.cross_entropy((h @ w.T).float(), t, ignore_index=-100, reduction=reduction)


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
    with K.use_backend("torch"):
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
    with K.use_backend("torch"):
        loss, gh, gw = run_lce(K.linear_cross_entropy, h, w, t, chunk_size=21)
        for chunk in (1, 4, 8, 20):
            loss_c, gh_c, gw_c = run_lce(K.linear_cross_entropy, h, w, t, chunk_size=chunk)
            torch.testing.assert_close(loss_c, loss, **LCE_LOSS_TOL[dtype])
            assert_grad_close(gh_c, gh, dtype)
            assert_grad_close(gw_c, gw, dtype)


def test_linear_cross_entropy_gradient_scaled_by_grad_output():
    h, w, t = lce_inputs((3, 7), 48, 257, torch.float32, n_ignored=2)
    hr, wr = leaf(h), leaf(w)
    with K.use_backend("torch"):
        (0.25 * K.linear_cross_entropy(hr, wr, t, chunk_size=4)).backward()
    _, ghn, gwn = run_lce(lambda a, b, c: 0.25 * naive_lce(a.reshape(-1, 48), b, c.reshape(-1)), h, w, t)
    torch.testing.assert_close((hr.grad, wr.grad), (ghn, gwn), **LCE_GRAD_TOL[torch.float32])


def test_linear_cross_entropy_all_ignored_is_zero_not_nan():
    h, w, t = lce_inputs((2, 5), 48, 257, torch.float32)
    t[:] = -100
    with K.use_backend("torch"):
        for reduction in ("mean", "sum"):
            loss, gh, gw = run_lce(K.linear_cross_entropy, h, w, t, chunk_size=3, reduction=reduction)
            assert loss.item() == 0.0
            assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    assert torch.isnan(naive_lce(h.reshape(-1, 48), w, t.reshape(-1)))  # what the naive mean gives


def test_linear_cross_entropy_partial_requires_grad_and_no_grad():
    h, w, t = lce_inputs((3, 7), 48, 257, torch.float32, n_ignored=4)
    loss_n, ghn, gwn = run_lce(lambda a, b, c: naive_lce(a.reshape(-1, 48), b, c.reshape(-1)), h, w, t)
    tol = LCE_GRAD_TOL[torch.float32]
    with K.use_backend("torch"):
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
    with torch.autocast("cpu", dtype=torch.bfloat16), K.use_backend("torch"):
        loss, gh, gw = run_lce(K.linear_cross_entropy, h, w, t, chunk_size=4)
        loss_n, ghn, gwn = run_lce(
            lambda a, b, c: F.cross_entropy(F.linear(a.reshape(-1, 48), b).float(), c.reshape(-1)), h, w, t)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32  # grads of the fp32 leaves
    torch.testing.assert_close(loss, loss_n, **LCE_LOSS_TOL[torch.bfloat16])
    assert_grad_close(gh, ghn, torch.bfloat16)
    assert_grad_close(gw, gwn, torch.bfloat16)


def test_linear_cross_entropy_rejects_bad_input_and_second_backward():
    h, w, t = lce_inputs((3, 7), 48, 257, torch.float32)
    with K.use_backend("torch"):
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


# --------------------------------------------------------------------------- LMHeadLoss and FSDP2


def test_lm_head_loss_equals_linear_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(48, 257, bias=False)
    h, _, t = lce_inputs((3, 7), 48, 257, torch.float32, n_ignored=3)
    with K.use_backend("torch"):
        loss = K.LMHeadLoss(head, chunk_size=4)(h, t)
        direct = K.linear_cross_entropy(h, head.weight, t, chunk_size=4)
    torch.testing.assert_close(loss, direct, atol=0, rtol=0)
    with pytest.raises(ValueError, match="bias-free nn.Linear"):
        K.LMHeadLoss(torch.nn.Linear(48, 257, bias=True))


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
def test_lm_head_loss_under_fsdp2_matches_unsharded(gloo_world, mixed_precision):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    head = torch.nn.Linear(48, 257, bias=False)
    h, _, t = lce_inputs((3, 7), 48, 257, torch.float32, n_ignored=3)
    compute = torch.bfloat16 if mixed_precision else torch.float32

    # Expected: no FSDP, the computation FSDP2's policy implies (bf16 copies of hidden and weight).
    with K.use_backend("torch"):
        loss_ref, gh_ref, gw_ref = run_lce(
            lambda a, b, c: K.linear_cross_entropy(a.to(compute), b.to(compute), c, chunk_size=4),
            h, head.weight.detach(), t)

    sharded = K.LMHeadLoss(torch.nn.Linear(48, 257, bias=False), chunk_size=4)
    sharded.lm_head.load_state_dict(head.state_dict())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    fully_shard(sharded, mp_policy=policy, reshard_after_forward=True)
    # Outside a forward the weight is FSDP2's shard: exactly what a fused loss must not read.
    assert isinstance(sharded.lm_head.weight, DTensor)
    with K.use_backend("torch"), pytest.raises(ValueError, match="sharded DTensor"):
        K.linear_cross_entropy(h, sharded.lm_head.weight, t)

    hr = leaf(h)
    with K.use_backend("torch"):
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


# --------------------------------------------------------------------------- the switch


def test_backend_switch_names_and_restores():
    assert K.get_backend() == "auto"
    with K.use_backend("torch"):
        assert K.get_backend() == "torch"
        with pytest.raises(RuntimeError), K.use_backend("liger"):
            raise RuntimeError("inside")
        assert K.get_backend() == "torch"  # restored after an exception too
    assert K.get_backend() == "auto"
    with pytest.raises(ConfigError, match=r"unknown backend 'cuda' \(known: auto, liger, torch\)"):
        K.set_backend("cuda")
    assert from_dict(K.KernelsConfig, {"backend": "torch", "ce_chunk_size": 256}) == K.KernelsConfig("torch", 256)
    with pytest.raises(ConfigError, match="unknown key 'chunk'"):
        from_dict(K.KernelsConfig, {"chunk": 3})
    with pytest.raises(ConfigError, match="unknown backend 'triton'"):
        from_dict(K.KernelsConfig, {"backend": "triton"})


def test_torch_backend_never_touches_liger(monkeypatch):
    # A None entry in sys.modules makes any import of the module raise ImportError, so a
    # call routed to Liger would fail here instead of passing silently.
    monkeypatch.setitem(sys.modules, "kiln.kernels.liger", None)
    x = torch.randn(2, 5, 8)
    for backend in ("torch", "auto"):  # "auto" on CPU tensors is the reference too
        with K.use_backend(backend):
            torch.testing.assert_close(K.rms_norm(x, torch.ones(8)), reference.rms_norm(x, torch.ones(8)),
                                       atol=0, rtol=0)
            torch.testing.assert_close(K.swiglu(x, x), reference.swiglu(x, x), atol=0, rtol=0)
            K.apply_rope(x[None], x[None], x, x)
            K.linear_cross_entropy(x, torch.randn(11, 8), torch.randint(0, 11, (2, 5)))
            assert K.maybe_apply_liger(torch.nn.Linear(2, 2)) is False
    with K.use_backend("liger"):
        with pytest.raises(ConfigError, match="'liger' needs CUDA tensors, got tensors on cpu"):
            K.rms_norm(x, torch.ones(8))
        with pytest.raises(ConfigError, match="needs CUDA tensors"):
            K.maybe_apply_liger(torch.nn.Linear(2, 2))


def test_cpu_import_and_calls_do_not_import_liger_or_triton():
    """In a fresh interpreter: importing kiln.kernels and running every op on CPU under
    "auto" loads neither liger_kernel nor Triton (about 1 GB, seconds to import)."""
    code = (
        "import sys, torch\n"
        "import kiln.kernels as K\n"
        "x = torch.randn(2, 3, 4, requires_grad=True)\n"
        "K.rms_norm(x, torch.ones(4)).sum().backward()\n"
        "K.swiglu(x, x); K.apply_rope(x[None], x[None], x, x)\n"
        "K.linear_cross_entropy(x, torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)).backward()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('liger_kernel', 'triton')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- Liger vs references (CUDA)

# Liger's Triton kernels reorder reductions and fuse casts differently from eager
# PyTorch; these are the tolerances Liger-Kernel's own tests use for the same ops
# (test/transformers/test_rms_norm.py, test_swiglu.py, test_rope.py,
# test_fused_linear_cross_entropy.py), fp32 and bf16 each.
LIGER_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
LIGER_REDUCED_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-1, rtol=2e-2)}


def both_backends(fn, inputs):
    """fn(*leaves) under the reference and under Liger, with outputs and input grads."""
    results = []
    for backend in ("torch", "liger"):
        leaves = [leaf(i) for i in inputs]
        with K.use_backend(backend):
            out = fn(*leaves)
        results.append((out, grads(out, leaves)))
    return results


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_rms_norm_matches_reference(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 33, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(33, device="cuda")).to(dtype)
    (out_r, (gx_r, gw_r)), (out_l, (gx_l, gw_l)) = both_backends(lambda a, b: K.rms_norm(a, b, 1e-6), (x, w))
    torch.testing.assert_close(out_l, out_r, **LIGER_TOL[dtype])
    torch.testing.assert_close(gx_l, gx_r, **LIGER_TOL[dtype])
    torch.testing.assert_close(gw_l, gw_r, **LIGER_REDUCED_TOL[dtype])


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_swiglu_matches_reference(dtype):
    torch.manual_seed(0)
    gate, up = torch.randn(3, 7, 35, device="cuda").to(dtype), torch.randn(3, 7, 35, device="cuda").to(dtype)
    (out_r, g_r), (out_l, g_l) = both_backends(K.swiglu, (gate, up))
    torch.testing.assert_close(out_l, out_r, **LIGER_TOL[dtype])
    torch.testing.assert_close(g_l, g_r, **LIGER_TOL[dtype])


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_rope_matches_reference(dtype):
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 3, 6, 3, 7, 18
    q, k = torch.randn(B, Hq, T, D, device="cuda").to(dtype), torch.randn(B, Hkv, T, D, device="cuda").to(dtype)
    cos, sin = (c.cuda() for c in llama_cos_sin(B, T, D, dtype))
    (out_r, g_r), (out_l, g_l) = both_backends(lambda a, b: K.apply_rope(a, b, cos, sin), (q, k))
    torch.testing.assert_close(out_l, out_r, **LIGER_TOL[dtype])
    torch.testing.assert_close(g_l, g_r, **LIGER_TOL[dtype])


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_liger_linear_cross_entropy_matches_reference(dtype, reduction):
    h, w, t = (x.cuda() for x in lce_inputs((3, 7), 48, 1000, dtype, n_ignored=5))
    results = []
    for backend in ("torch", "liger"):
        with K.use_backend(backend):
            results.append(run_lce(K.linear_cross_entropy, h, w, t, chunk_size=4, reduction=reduction))
    (loss_r, gh_r, gw_r), (loss_l, gh_l, gw_l) = results
    torch.testing.assert_close(loss_l, loss_r, **LIGER_TOL[dtype])
    # Liger writes each chunk's dlogits over its logits buffer, in the input dtype: its
    # bf16 grad_weight rounds dlogits as naive autograd does, hence the same slack.
    assert_grad_close(gh_l, gh_r, dtype, LIGER_TOL)
    assert_grad_close(gw_l, gw_r, dtype, LIGER_TOL)


@cuda_only
def test_liger_linear_cross_entropy_weight_grad_without_hidden_grad():
    h, w, t = (x.cuda() for x in lce_inputs((3, 7), 48, 257, torch.float32, n_ignored=2))
    out = []
    for backend in ("torch", "liger"):
        wr = leaf(w)
        with K.use_backend(backend):
            K.linear_cross_entropy(h, wr, t).backward()
        out.append(wr.grad)
    torch.testing.assert_close(out[1], out[0], **LIGER_TOL[torch.float32])


@cuda_only
def test_auto_routes_cuda_tensors_to_liger():
    x = torch.randn(2, 8, device="cuda")
    with K.use_backend("auto"):
        K.rms_norm(x, torch.ones(8, device="cuda"))
    assert "kiln.kernels.liger" in sys.modules and "liger_kernel.ops.rms_norm" in sys.modules


@cuda_only
def test_apply_liger_to_llama_model_matches_eager(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    # Liger swaps these names in transformers' module for the whole process; monkeypatch
    # puts the originals back after the test so later tests build eager models.
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    eager = LlamaForCausalLM(cfg).cuda()
    fused = LlamaForCausalLM(cfg).cuda()
    fused.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 257, (2, 13), device="cuda")
    want = eager.model(input_ids=ids).last_hidden_state  # before patching: RoPE is patched process-wide
    want_grads = torch.autograd.grad(want.square().mean(), list(eager.model.parameters()))
    with K.use_backend("liger"):
        assert K.maybe_apply_liger(fused) is True
    assert fused.model.norm._get_name() == "LigerRMSNorm"
    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    got = fused.model(input_ids=ids).last_hidden_state
    got_grads = torch.autograd.grad(got.square().mean(), list(fused.model.parameters()))
    torch.testing.assert_close(got, want, **LIGER_TOL[torch.float32])
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e, **LIGER_REDUCED_TOL[torch.float32])
