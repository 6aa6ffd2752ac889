"""The model file: presets, sliding-window attention, RoPE theta changes, document masking,
the loss and the kernels parallelize() applies, activation checkpointing, and the
learning-rate schedules."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from kiln.config import ConfigError
from kiln.kernels import KernelsConfig, linear_cross_entropy
from kiln.training.distributed import World
from kiln.training.model import CausalLM, ModelConfig, build_model, document_mask, resolve, set_rope_theta
from kiln.training.parallelize import ParallelConfig, parallelize
from kiln.training.recipe import StageConfig, batch_size_at, lr_at


def test_presets_have_the_papers_shapes():
    model = build_model(resolve(ModelConfig(preset="8b"), vocab_size=128_256), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Llama 3 8B
    assert model.config.num_key_value_heads == 8 and model.config.rope_parameters["rope_theta"] == 500_000.0
    cfg = resolve(ModelConfig(preset="debug", hidden_size=128), vocab_size=1000)
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (128, 2, 1024)  # explicit fields win; vocab to x64
    with pytest.raises(ConfigError, match="preset: unknown 'huge'"):
        resolve(ModelConfig(preset="huge"), vocab_size=100)
    with pytest.raises(ConfigError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        resolve(ModelConfig(num_kv_heads=3), vocab_size=100)


def test_sliding_window_is_local_attention():
    model = build_model(resolve(ModelConfig(preset="debug", family="mistral", sliding_window=4), vocab_size=256))
    assert type(model).__name__ == "MistralForCausalLM" and model.config.sliding_window == 4
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % 256  # changes token 0 only
    with torch.no_grad():
        a, b = model.model(input_ids=x).last_hidden_state, model.model(input_ids=y).last_hidden_state
    assert (a[0, 1:4] - b[0, 1:4]).abs().max() > 1e-4  # inside the window, it is seen
    # Two layers of a 4-token window reach back at most 6 tokens: token 10 cannot see token 0.
    assert torch.equal(a[0, 10:], b[0, 10:])


def test_set_rope_theta_matches_a_model_built_with_it():
    raised = build_model(resolve(ModelConfig(preset="debug", rope_theta=500_000.0), vocab_size=256))
    model = build_model(resolve(ModelConfig(preset="debug"), vocab_size=256))
    set_rope_theta(model, 500_000.0)
    assert torch.equal(model.model.rotary_emb.inv_freq, raised.model.rotary_emb.inv_freq)
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(model.model(input_ids=x).last_hidden_state, raised.model(input_ids=x).last_hidden_state)


def test_document_masking_equals_separate_documents():
    model = CausalLM(build_model(resolve(ModelConfig(preset="debug"), vocab_size=256)))
    docs = [torch.randint(1, 256, (n,)) for n in (5, 9, 6)]
    packed = torch.cat(docs)[None]  # (1, 20)
    segments = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        hidden = model.hf.model(input_ids=packed, attention_mask=document_mask(segments),
                                position_ids=positions).last_hidden_state[0]
        start = 0
        for d in docs:
            alone = model.hf.model(input_ids=d[None]).last_hidden_state[0]
            torch.testing.assert_close(hidden[start:start + len(d)], alone, rtol=1e-5, atol=1e-5)
            start += len(d)


def test_parallelize_applies_the_kernels_table_on_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "kiln.kernels.liger", None)  # a path routed to Liger would fail here
    cfg = resolve(ModelConfig(preset="debug"), vocab_size=256)
    model = CausalLM(build_model(cfg, seed=3))
    parallelize(model, ParallelConfig(), World(), KernelsConfig(backend="auto", ce_chunk_size=8))
    assert model.kernels == KernelsConfig(backend="reference", ce_chunk_size=8)  # "auto" off CUDA
    assert model.hf.model.norm._get_name() == "LlamaRMSNorm"  # transformers' own modules
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(x[:, :-1], x[:, 1:])
        hidden = model.hf.model(input_ids=x[:, :-1]).last_hidden_state
        logits = model.hf(input_ids=x[:, :-1]).logits
    # The loss is linear_cross_entropy of the decoder's hidden states, in the table's chunks...
    direct = linear_cross_entropy(hidden.flatten(0, 1), model.hf.lm_head.weight, x[:, 1:].flatten(), chunk_size=8,
                                  backend="reference")
    torch.testing.assert_close(loss, direct, atol=0, rtol=0)
    # ...which is transformers' cross-entropy of the full logits, to fp32 reassociation.
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()), atol=1e-5, rtol=1e-6)
    with pytest.raises(ConfigError, match="'liger' needs CUDA, but this runs on cpu"):
        parallelize(CausalLM(build_model(cfg)), ParallelConfig(), World(), KernelsConfig(backend="liger"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel needs a CUDA GPU")
def test_parallelize_on_cuda_runs_liger(monkeypatch):
    from transformers.models.llama import modeling_llama

    # Liger replaces these in transformers' module for the whole process; put them back after.
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    cfg = resolve(ModelConfig(preset="debug"), vocab_size=256)
    world = World(device=torch.device("cuda", 0))
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0)).cuda()
    reference = parallelize(CausalLM(build_model(cfg, seed=3)).cuda(), ParallelConfig(), world,
                            KernelsConfig(backend="reference"))
    with torch.no_grad():
        want = reference(x[:, :-1], x[:, 1:])  # before Liger patches RoPE process-wide
    fused = parallelize(CausalLM(build_model(cfg, seed=3)).cuda(), ParallelConfig(), world, KernelsConfig())
    assert fused.kernels.backend == "liger"  # "auto" on CUDA with liger_kernel installed
    assert fused.hf.model.norm._get_name() == "LigerRMSNorm"
    with torch.no_grad():
        got = fused(x[:, :-1], x[:, 1:])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # Liger-Kernel's own fp32 tolerance


def test_activation_checkpointing_gives_the_same_gradients():
    def grads(ac: bool):
        model = CausalLM(build_model(resolve(ModelConfig(preset="debug"), vocab_size=256), seed=3))
        parallelize(model, ParallelConfig(activation_checkpointing=ac), World())
        x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (l0, g0), (l1, g1) = grads(False), grads(True)
    assert torch.equal(l0, l1)
    assert g0.keys() == {k.replace("._checkpoint_wrapped_module", "") for k in g1}
    for name, grad in g1.items():
        torch.testing.assert_close(grad, g0[name.replace("._checkpoint_wrapped_module", "")], rtol=0, atol=0)


def test_schedules_and_batch_ramp():
    cosine = StageConfig(tokens=1000, lr=1.0, warmup=0.1, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_at(cosine, t) for t in (0, 50, 100, 550, 1000)] == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1])
    wsd = StageConfig(tokens=1000, lr=1.0, schedule="wsd", decay=0.2, min_lr_ratio=0.0)
    assert [lr_at(wsd, t) for t in (0, 799, 900, 1000)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    linear = StageConfig(tokens=1000, lr=2.0, schedule="linear")
    assert [lr_at(linear, t) for t in (0, 250, 1000)] == pytest.approx([2.0, 1.5, 0.0])
    ramp = StageConfig(tokens=10_000, batch_size=8, batch_ramp=[[5000, 32], [1000, 16]])
    assert [batch_size_at(ramp, t) for t in (0, 999, 1000, 5000)] == [8, 8, 16, 32]
