"""Model families: the papers' sizes against their published parameter counts, and for
each family's tiny preset: kiln's loss equal to transformers' own, the export reloaded
as the same class with the same logits, config_of round trips, features refused on a
family without them, sliding windows kept under packed-document masks, and a short
`kiln train` run of the Qwen 2 and Gemma 2 presets."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from kiln.config import ConfigError
from kiln.kernels import KernelsConfig, linear_cross_entropy
from kiln.training import recipe as recipes
from kiln.training.distributed import World
from kiln.training.model import (CausalLM, ModelConfig, build_model, config_of, count_params, document_mask,
                                 final_softcap, hf_config, packed_attention_mask, resolve, save_hf)
from kiln.training.parallelize import ParallelConfig, parallelize
from kiln.training.presets import PRESETS, PUBLISHED
from kiln.training.train import train
from tests.training.corpus import build_corpus, recipe_text

TINY = ["llama3-tiny", "mistral-tiny", "qwen2-tiny", "gemma2-tiny", "afm-tiny"]
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "gemma2": "Gemma2ForCausalLM"}
VOCAB = 512


def tiny(name: str, seed: int = 0):
    cfg = resolve(ModelConfig(preset=name), vocab_size=VOCAB)
    return cfg, build_model(cfg, seed=seed)


def tokens(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the papers' sizes


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_paper_presets_have_the_published_parameter_counts(name):
    published = PUBLISHED[name]
    cfg = resolve(ModelConfig(preset=name))  # paper sizes carry their vocabulary
    built = count_params(cfg)
    ratio = built / published.params
    assert abs(ratio - 1) <= published.tolerance, (
        f"{name}: {built:,} parameters built, {published.params:,} published ({published.source}): ratio {ratio:.4f}")
    if published.non_embedding:  # Gemma 2's Table 2 is exact: so is the model
        assert count_params(cfg, non_embedding=True) == published.non_embedding


def test_the_inferred_afm_ffn_width_fits_the_published_non_embedding_count():
    # 8064 is not published: AFM's 2.58B non-embedding parameters decide it.
    non_embedding = count_params(resolve(ModelConfig(preset="afm-3b")), non_embedding=True)
    assert non_embedding == 2_586_737_664 and abs(non_embedding / 2.58e9 - 1) < 0.003


def test_kiln_presets_keep_their_shapes():
    assert count_params(resolve(ModelConfig(preset="8b"), vocab_size=128_256)) == 8_030_261_248  # Llama 3 8B
    assert count_params(resolve(ModelConfig(preset="llama3.1-8b"))) == 8_030_261_248
    assert {PRESETS[n]["family"] for n in ("debug", "tiny", "small", "125m", "350m", "1b", "3b", "8b")} == {"llama"}


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_of_inverts_hf_config_for_every_preset(name):
    cfg = resolve(ModelConfig(preset=name), vocab_size=VOCAB)
    config = hf_config(cfg)
    assert type(config).__name__ == CLASSES[cfg.family].replace("ForCausalLM", "Config")
    assert config_of(config) == dataclasses.replace(cfg, preset="")
    assert final_softcap(config) == cfg.final_softcap


# --------------------------------------------------------------------------- each family's tiny model


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_are_their_family_at_cpu_size(name):
    cfg, model = tiny(name)
    assert type(model).__name__ == CLASSES[cfg.family]
    assert 500_000 <= count_params(cfg, non_embedding=True) <= 1_000_000
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    if cfg.family == "gemma2":
        assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
        assert model.config.head_dim == 64 and model.model.layers[0].self_attn.scaling == 64 ** -0.5
        assert model.config._attn_implementation == "eager"
    if cfg.family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # QKV bias
        assert model.model.layers[0].self_attn.o_proj.bias is None


@pytest.mark.parametrize("name", TINY)
def test_kiln_loss_is_transformers_loss(name):
    cfg, hf = tiny(name, seed=1)
    with torch.no_grad():
        # Logits of tens of nats, so Gemma 2's final soft-cap at 30 changes the loss a lot.
        hf.lm_head.weight.mul_(200.0)
    model = CausalLM(hf)
    parallelize(model, ParallelConfig(), World(), KernelsConfig(backend="reference", ce_chunk_size=16))
    x = tokens((2, 49))
    with torch.no_grad():
        loss = model(x[:, :-1], x[:, 1:])
        theirs = hf(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        hidden = hf.model(input_ids=x[:, :-1]).last_hidden_state
        uncapped = linear_cross_entropy(hidden.flatten(0, 1), hf.lm_head.weight, x[:, 1:].flatten(),
                                        backend="reference")
    torch.testing.assert_close(loss, theirs, rtol=1e-5, atol=1e-5)
    if cfg.final_softcap:
        assert final_softcap(hf) == 30.0 and abs(loss - uncapped) > 1.0
    else:
        torch.testing.assert_close(loss, uncapped, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_an_export_reloads_as_the_same_model(name, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, hf = tiny(name, seed=2)
    save_hf(hf, str(tmp_path / "export"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert type(again).__name__ == CLASSES[cfg.family]
    assert config_of(again.config) == dataclasses.replace(cfg, preset="")
    x = tokens((2, 40), seed=3)
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, hf(input_ids=x).logits)


def test_a_family_feature_on_another_family_is_refused():
    def refused(match: str, **fields):
        with pytest.raises(ConfigError, match=match):
            resolve(ModelConfig(**fields), vocab_size=VOCAB)

    refused(r"\[model\] sliding_window: family 'llama' has no local attention; use family \"mistral\" \(every "
            r"layer local\) or \"gemma2\"", preset="debug", sliding_window=4)
    refused(r"\[model\] sliding_window: family 'qwen2' has no local attention", preset="qwen2-tiny", sliding_window=8)
    refused(r"\[model\] sliding_window: family 'gemma2' alternates local and global layers and needs the local "
            r"window", family="gemma2")
    refused(r"\[model\] final_softcap: only family 'gemma2' has it, not 'llama'", preset="debug", final_softcap=30.0)
    refused(r"\[model\] attn_softcap: only family 'gemma2' has it, not 'mistral'", preset="mistral-tiny",
            attn_softcap=50.0)
    refused(r"\[model\] query_pre_attn_scalar: only family 'gemma2' has it, not 'qwen2'", family="qwen2",
            query_pre_attn_scalar=16)
    refused(r"\[model\] head_dim: family 'qwen2' has head_dim = hidden_size / num_heads \(16\), not 32",
            family="qwen2", head_dim=32)
    refused(r"\[model\] family: unknown 'gpt2' \(known: llama, mistral, qwen2, gemma2\)", family="gpt2")
    refused(r"\[model\] sliding_window: must be >= 0", family="mistral", sliding_window=-1)
    # explicit fields win over the preset's, the family's checks apply to the result
    cfg = resolve(ModelConfig(preset="gemma2-tiny", head_dim=32, query_pre_attn_scalar=24), vocab_size=VOCAB)
    assert (cfg.family, cfg.head_dim, cfg.query_pre_attn_scalar, cfg.sliding_window) == ("gemma2", 32, 24, 32)
    assert build_model(cfg).model.layers[0].self_attn.scaling == 24 ** -0.5


# --------------------------------------------------------------------------- sliding windows under document masks


@pytest.mark.parametrize("name", ["gemma2-tiny", "mistral-tiny"])
def test_one_document_mask_is_transformers_own_sliding_mask(name):
    """With every token in one document, the packed-document masks must be exactly what
    transformers builds itself: local on sliding-window layers (all of Mistral's, every
    other one of Gemma 2's), global elsewhere. 80 tokens > the window of 32."""
    cfg, hf = tiny(name, seed=4)
    x = tokens((2, 80), seed=5)
    one = torch.zeros_like(x)
    positions = torch.arange(80)[None].expand(2, -1)
    mask = packed_attention_mask(hf.config, one)
    if cfg.family == "gemma2":
        assert mask.keys() == {"full_attention", "sliding_attention"} and mask["full_attention"].dtype == torch.float32
    with torch.no_grad():
        ours = hf.model(input_ids=x, attention_mask=mask, position_ids=positions).last_hidden_state
        theirs = hf.model(input_ids=x).last_hidden_state
        # the window matters at this length: a mask without it gives another result
        unwindowed = document_mask(one)
        if hf.config._attn_implementation == "eager":
            unwindowed = torch.zeros(unwindowed.shape).masked_fill_(~unwindowed, torch.finfo(torch.float32).min)
        wrong = hf.model(input_ids=x, attention_mask=unwindowed, position_ids=positions).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert (wrong - theirs).abs().max() > 1e-3
    model = CausalLM(hf)
    with torch.no_grad():  # and CausalLM.forward builds those masks from segment ids
        torch.testing.assert_close(model(x[:, :-1], x[:, 1:], positions[:, :-1], one[:, :-1]),
                                   model(x[:, :-1], x[:, 1:]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gemma2-tiny", "mistral-tiny"])
def test_packed_documents_equal_separate_documents_with_a_window(name):
    _, hf = tiny(name, seed=6)
    docs = [tokens((1, n), seed=n)[0] for n in (45, 12, 50)]  # two longer than the window
    packed = torch.cat(docs)[None]
    segments = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        hidden = hf.model(input_ids=packed, attention_mask=packed_attention_mask(hf.config, segments),
                          position_ids=positions).last_hidden_state[0]
        start = 0
        for d in docs:
            alone = hf.model(input_ids=d[None]).last_hidden_state[0]
            torch.testing.assert_close(hidden[start:start + len(d)], alone, rtol=1e-5, atol=1e-5)
            start += len(d)


# --------------------------------------------------------------------------- kiln train


STAGE = """
[[stage]]
name = "core"
weights = { general = 0.6, code = 0.3, multilingual = 0.1 }
tokens = 2_048
seq_len = 64
batch_size = 8
lr = 3e-3
warmup = 0.25
doc_masking = true
checkpoint_every = 4
eval_every = 4
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("name", ["qwen2-tiny", "gemma2-tiny"])
def test_kiln_train_runs_the_family(name, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "r.toml"
    path.write_text(recipe_text(corpus, tmp_path / "run", STAGE, model=f'preset = "{name}"'))
    summaries = train(recipes.load(str(path)))
    assert [s["tokens"] for s in summaries] == [2048]
    stage = tmp_path / "run" / "01_core"
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)  # 2,048 tokens / (8 x 64) per step
    assert losses[-1] < losses[0] - 0.1  # from about ln 512 = 6.24
    assert "val/general/bpb" in records[-1]
    export = AutoModelForCausalLM.from_pretrained(str(stage / "final"))
    cfg = resolve(ModelConfig(preset=name), vocab_size=VOCAB)
    assert type(export).__name__ == CLASSES[cfg.family]
    assert config_of(export.config) == dataclasses.replace(cfg, preset="")
