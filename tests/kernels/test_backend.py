"""The backend switch: what "auto", "reference" and "liger" resolve to, the `use_backend`
context that tests force a path with (and that leaks nothing), a CPU run that never
imports Liger or Triton, the model types Liger can be patched into, and (on CUDA) Liger
patched into transformers Llama, Qwen 2 and Gemma 2 models."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import kiln.kernels as K
from kiln.config import ConfigError, from_dict
from kiln.kernels import backend
from tests.kernels.common import LIGER_REDUCED_TOL, LIGER_TOL, cuda_only


def test_use_backend_names_and_restores():
    assert K.default_backend() == "auto"
    with K.use_backend("reference"):
        assert K.default_backend() == "reference"
        with pytest.raises(RuntimeError), K.use_backend("liger"):
            raise RuntimeError("inside")
        assert K.default_backend() == "reference"  # restored after an exception too
    assert K.default_backend() == "auto"
    with pytest.raises(ConfigError, match=r"unknown backend 'cuda' \(known: auto, reference, liger\)"):
        with K.use_backend("cuda"):
            pass
    assert K.default_backend() == "auto"
    assert not hasattr(K, "set_backend")  # no setter whose choice outlives a block


def test_kernels_config_is_strict():
    table = {"backend": "reference", "ce_chunk_size": 256}
    assert from_dict(K.KernelsConfig, table) == K.KernelsConfig("reference", 256)
    with pytest.raises(ConfigError, match="unknown key 'chunk'"):
        from_dict(K.KernelsConfig, {"chunk": 3})
    with pytest.raises(ConfigError, match=r"r.toml: \[kernels\] backend: unknown backend 'triton'"):
        K.KernelsConfig(backend="triton").check("r.toml: [kernels]")
    with pytest.raises(ConfigError, match=r"\[kernels\] ce_chunk_size: must be >= 0"):
        K.KernelsConfig(ce_chunk_size=-1).check()


def test_resolve_backend_per_device(monkeypatch):
    assert K.resolve_backend("reference", "cpu") == "reference"
    assert K.resolve_backend("auto", "cpu") == "reference"
    with pytest.raises(ConfigError, match="'liger' needs CUDA, but this runs on cpu"):
        K.resolve_backend("liger", "cpu")
    # A CUDA device is only a name here: resolving does not touch the GPU.
    monkeypatch.setattr(backend, "liger_importable", lambda: True)
    assert K.resolve_backend("auto", "cuda") == "liger"
    assert K.resolve_backend("liger", "cuda:1") == "liger"
    assert K.resolve_backend("reference", "cuda") == "reference"
    monkeypatch.setattr(backend, "liger_importable", lambda: False)
    assert K.resolve_backend("auto", "cuda") == "reference"
    with pytest.raises(ConfigError, match="'liger' but liger_kernel does not import"):
        K.resolve_backend("liger", "cuda")


def test_reference_backend_never_touches_liger(monkeypatch):
    # A None entry in sys.modules makes any import of the module raise ImportError, so a
    # call routed to Liger would fail here instead of passing silently.
    monkeypatch.setitem(sys.modules, "kiln.kernels.liger", None)
    x, w, t = torch.randn(2, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 5))
    want = K.reference.linear_cross_entropy(x, w, t)
    for name in ("reference", "auto"):  # "auto" on CPU tensors is the reference too
        torch.testing.assert_close(K.linear_cross_entropy(x, w, t, backend=name), want, atol=0, rtol=0)
        with K.use_backend(name):
            torch.testing.assert_close(K.linear_cross_entropy(x, w, t), want, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="'liger' needs CUDA, but this runs on cpu"):
        K.linear_cross_entropy(x, w, t, backend="liger")
    with K.use_backend("liger"), pytest.raises(ConfigError, match="needs CUDA"):
        K.linear_cross_entropy(x, w, t)
    # An explicit backend wins over the switch: the model's loss follows its recipe.
    with K.use_backend("liger"):
        torch.testing.assert_close(K.linear_cross_entropy(x, w, t, backend="reference"), want, atol=0, rtol=0)


def test_cpu_run_does_not_import_liger_or_triton():
    """In a fresh interpreter: the loss under "auto" on CPU, forward and backward, loads
    neither liger_kernel nor Triton (about 1 GB, seconds to import); nor does the debug
    model parallelized under "auto" on CPU load liger_kernel. (Building a transformers
    model imports torch._dynamo, which imports Triton itself when it is installed.)"""
    code = (
        "import sys, torch\n"
        "import kiln.kernels as K\n"
        "def loaded(*roots): return sorted(m for m in sys.modules if m.split('.')[0] in roots)\n"
        "x = torch.randn(2, 3, 4, requires_grad=True)\n"
        "K.linear_cross_entropy(x, torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)).backward()\n"
        "print(loaded('liger_kernel', 'triton'))\n"
        "from kiln.training.distributed import World\n"
        "from kiln.training.model import CausalLM, ModelConfig, build_model, resolve\n"
        "from kiln.training.parallelize import ParallelConfig, parallelize\n"
        "model = CausalLM(build_model(resolve(ModelConfig(preset='debug'), vocab_size=256)))\n"
        "parallelize(model, ParallelConfig(), World(), K.KernelsConfig('auto'))\n"
        "ids = torch.randint(0, 256, (2, 9))\n"
        "model(ids[:, :-1], ids[:, 1:]).backward()\n"
        "print(model.kernels.backend, 'kiln.kernels.liger' in sys.modules, loaded('liger_kernel'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kernels_only, model_run = out.stdout.strip().splitlines()
    assert kernels_only == "[]"
    assert model_run == "reference False []"


@cuda_only
def test_auto_routes_cuda_tensors_to_liger():
    h, w = torch.randn(6, 8, device="cuda"), torch.randn(11, 8, device="cuda")
    with K.use_backend("auto"):
        K.linear_cross_entropy(h, w, torch.randint(0, 11, (6,), device="cuda"))
    assert "kiln.kernels.liger" in sys.modules and "liger_kernel.ops.fused_linear_cross_entropy" in sys.modules


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
    K.apply_liger_to_model(fused)
    assert fused.model.norm._get_name() == "LigerRMSNorm"
    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    got = fused.model(input_ids=ids).last_hidden_state
    got_grads = torch.autograd.grad(got.square().mean(), list(fused.model.parameters()))
    torch.testing.assert_close(got, want, **LIGER_TOL[torch.float32])
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e, **LIGER_REDUCED_TOL[torch.float32])


def test_apply_liger_to_model_refuses_an_unsupported_type_naming_the_supported_ones():
    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(model_type="gpt2")
    with pytest.raises(ValueError, match=r"model type 'gpt2' is not supported "
                                         r"\(supported: llama, mistral, qwen2, gemma2\)"):
        K.apply_liger_to_model(model)


@cuda_only
@pytest.mark.parametrize("model_type", ["qwen2", "gemma2"])
def test_apply_liger_to_qwen2_and_gemma2_models_matches_eager(monkeypatch, model_type):
    """Qwen 2 gets Liger's SwiGLU MLP, Gemma 2 its GeGLU MLP (tanh GELU) and the RMSNorm with
    Gemma's (1 + weight) offset; both Liger's RoPE. Same hidden states and gradients as eager."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.qwen2 import modeling_qwen2

    shape = dict(vocab_size=257, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    if model_type == "qwen2":
        module, names, mlp = modeling_qwen2, ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP"), "LigerSwiGLUMLP"
        cls, cfg = Qwen2ForCausalLM, Qwen2Config(**shape)
    else:
        # Eager attention: Gemma 2's attention-logit soft-capping is not in SDPA.
        module, names, mlp = modeling_gemma2, ("apply_rotary_pos_emb", "Gemma2RMSNorm", "Gemma2MLP"), "LigerGEGLUMLP"
        cls, cfg = Gemma2ForCausalLM, Gemma2Config(**shape, head_dim=16, attn_implementation="eager")
    # Liger swaps these names in transformers' module for the whole process; monkeypatch
    # puts the originals back after the test so later tests build eager models.
    for name in names:
        monkeypatch.setattr(module, name, getattr(module, name))
    torch.manual_seed(0)
    eager = cls(cfg).cuda()
    with torch.no_grad():  # Gemma's RMSNorm weights start at 0 (a scale of 1 + 0): make the offset matter
        for name, p in eager.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)
    fused = cls(cfg).cuda()
    fused.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 257, (2, 13), device="cuda")
    want = eager.model(input_ids=ids).last_hidden_state  # before patching: RoPE is patched process-wide
    want_grads = torch.autograd.grad(want.square().mean(), list(eager.model.parameters()))
    K.apply_liger_to_model(fused)
    assert fused.model.norm._get_name() == "LigerRMSNorm"
    assert fused.model.layers[0].mlp._get_name() == mlp
    assert module.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    got = fused.model(input_ids=ids).last_hidden_state
    got_grads = torch.autograd.grad(got.square().mean(), list(fused.model.parameters()))
    torch.testing.assert_close(got, want, **LIGER_TOL[torch.float32])
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e, **LIGER_REDUCED_TOL[torch.float32])
