"""kiln plan's arithmetic, the [scale.*] overlays and the published systems' recipes
(recipes/<system>/), which must resolve at both scales."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kiln.cli import main
from kiln.config import ConfigError, apply_scale, from_dict, load_toml
from kiln.training import recipe as recipes
from kiln.training.model import ModelConfig, count_params, resolve
from kiln.training.plan import Shape, memory_gib, plan_recipes

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = sorted(p.parent for p in (ROOT / "recipes").glob("*/pretrain.toml"))
TRAINING_FILES = [f for s in SYSTEMS for f in sorted(s.glob("*.toml")) if f.name in ("teacher.toml", "pretrain.toml",
                                                                                     "post.toml")]


def test_the_llama3_405b_plan_is_within_10_percent_of_the_reported_compute():
    plan = plan_recipes([str(ROOT / "recipes/llama3/pretrain.toml")], "paper")
    total = plan.total()
    assert plan.published["published_flops"] == 3.8e25
    assert 0.9 <= total["flops"] / 3.8e25 <= 1.1, total["flops"]
    assert total["tokens"] == 15_600_000_000_000
    assert 400e9 < total["params"] < 410e9


def test_flops_per_token_is_6n_plus_causal_attention():
    cfg = resolve(ModelConfig(preset="debug", vocab_size=256))
    shape = Shape.of(cfg)
    # debug: untied 256 x 64 embedding and lm_head, 2 layers of width 64
    assert shape.embedding == 256 * 64 and shape.matmul == shape.total - 256 * 64
    assert shape.flops_per_token(128) == 6 * shape.matmul + 2 * 12 * 64 * (128 + 1) / 2
    window = Shape.of(resolve(ModelConfig(preset="mistral-tiny", vocab_size=256)))
    w = window.windows[0]
    assert w and all(x == w for x in window.windows)
    # a token attends to min(t, w) positions: the mean over a sequence of 4w
    S = 4 * w
    mean = sum(min(t, w) for t in range(1, S + 1)) / S
    assert window.attended(S, w) == pytest.approx(mean)


def test_gemma2_alternates_local_and_global_layers_in_the_plan():
    shape = Shape.of(resolve(ModelConfig(preset="gemma2-2b")))
    assert shape.windows[0] == 4096 and shape.windows[1] == 0 and len(shape.windows) == 26
    assert shape.d_attn == 8 * 256 and shape.total == 2_614_341_888


def test_memory_shards_weights_gradients_and_adam_states_over_the_ranks():
    recipe = recipes.load(str(ROOT / "recipes/llama3/pretrain.toml"))
    shape = Shape.of(resolve(recipe.model))
    core = recipe.stages[0]
    m8, m16 = memory_gib(recipe, core, shape, 8), memory_gib(recipe, core, shape, 16)
    assert m8["params_grads_optimizer"] == pytest.approx(16 * shape.total / 8 / 2**30)
    assert m16["params_grads_optimizer"] == pytest.approx(m8["params_grads_optimizer"] / 2)
    # 2048 sequences (the ramp's last batch) over 16 ranks: 128 per rank; checkpointing keeps one
    # bf16 hidden state per layer and token plus one layer's activations
    assert m16["micro_batch"] == 128
    tokens = 128 * core.seq_len
    per_layer = shape.activation_bytes_per_token_layer(2) * tokens
    assert m16["activations"] == pytest.approx(per_layer * shape.num_layers / 2**30)
    assert m16["activations_checkpointed"] == pytest.approx(
        (2 * shape.hidden * tokens * shape.num_layers + per_layer) / 2**30)


def test_plan_json_has_stages_and_totals(capsys):
    assert main(["plan", str(ROOT / "recipes/llama3"), "--scale", "paper", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["total"]) >= {"params", "tokens", "flops", "gpu_hours"}
    names = [s["name"] for s in out["stages"]]
    assert names[:2] == ["core", "long_context_1"] and "dpo_r6" in names
    assert out["total"]["gpu_hours"] == pytest.approx(out["total"]["flops"] / (989e12 * 0.4) / 3600)


def test_scale_overlays_stages_by_name_and_refuses_unknown_names(tmp_path):
    data = {"run": {"output": "big"}, "stage": [{"name": "core", "tokens": 10}, {"name": "anneal", "tokens": 5}],
            "scale": {"tiny": {"run": {"output": "small"}, "stage": {"anneal": {"tokens": 1}}}}}
    assert apply_scale(data, "paper", "r.toml") == {k: v for k, v in data.items() if k != "scale"}
    tiny = apply_scale(data, "tiny", "r.toml")
    assert tiny["run"] == {"output": "small"}
    assert tiny["stage"] == [{"name": "core", "tokens": 10}, {"name": "anneal", "tokens": 1}]
    with pytest.raises(ConfigError, match=r"--scale huge: not a scale of this recipe \(known: paper, tiny\)"):
        apply_scale(data, "huge", "r.toml")
    bad = dict(data, scale={"tiny": {"stage": {"cooldown": {"tokens": 1}}}})
    with pytest.raises(ConfigError, match=r"\[scale.tiny.stage.cooldown\]: no \[\[stage\]\] of that name"):
        apply_scale(bad, "tiny", "r.toml")


def test_a_scale_that_leaves_a_stage_without_a_step_is_refused(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text((ROOT / "recipes/llama3/pretrain.toml").read_text()
                    + "\n[scale.broken.stage.anneal]\ntokens = 1000\n")
    with pytest.raises(ConfigError) as e:
        recipes.load(str(path), "broken")
    assert str(e.value) == (f"{path} (scale broken): [[stage]] anneal: tokens 1,000 is less than one step "
                            "(batch_size 128 x seq_len 131072): the stage would take zero steps")


def test_a_teacher_that_is_not_built_is_refused_before_training(tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text(f"""
[run]
output = "{tmp_path / 'out'}"
shards = "{tmp_path / 'shards'}"
tokenizer = "{tmp_path / 'tok'}"
[model]
preset = "debug"
[[stage]]
name = "student"
kind = "distill"
teacher = "{tmp_path / 'teacher'}"
weights = {{ general = 1.0 }}
tokens = 1024
seq_len = 64
batch_size = 4
""")
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kiln: error: {path}: [[stage]] student teacher: {tmp_path / 'teacher'} does not exist; it is neither an "
        "earlier stage of this recipe nor a model directory (build it first, or name the stage that makes it)")


def test_every_system_has_its_parts():
    assert {s.name for s in SYSTEMS} >= {"llama3", "qwen2", "afm", "gemma2", "llama2"}
    for system in SYSTEMS:
        for name in ("curate.toml", "mix.toml", "pretrain.toml", "post.toml", "README.md"):
            assert (system / name).is_file(), system / name


@pytest.mark.parametrize("path", TRAINING_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("scale", ["paper", "tiny"])
def test_each_system_recipe_resolves_at_both_scales(path, scale):
    recipe = recipes.load(str(path), scale)
    model = resolve(recipe.model, vocab_size=8192)
    params = count_params(model)
    if scale == "paper":
        assert model.vocab_size > 30_000 and recipe.model.preset, "paper scale uses a paper preset"
        assert params > 1e9, params
        assert not recipe.run.output.startswith("out/"), "paper scale writes outside the demo's out/"
    else:
        assert recipe.run.output.startswith(f"out/recipes/{path.parent.name}/")
        assert params < 20e6, f"a tiny model trains on 2 CPU cores: {params:,} parameters"


@pytest.mark.parametrize("system", SYSTEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("scale", ["paper", "tiny"])
def test_each_system_curation_resolves_at_both_scales(system, scale):
    from kiln.curation.pipeline import parse_recipe

    path = system / "curate.toml"
    recipe = parse_recipe(apply_scale(load_toml(path), scale, str(path)), where=str(path))
    assert recipe.pipeline.stages[0] == "extract" and recipe.pipeline.stages[-1] == "tokenize"
    if scale == "tiny":
        assert recipe.pipeline.input == ["data/sample.warc.gz"]
        assert recipe.pipeline.output == f"out/recipes/{system.name}/curate"


def test_a_model_key_at_its_default_value_still_overrides_the_preset(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text((ROOT / "recipes/qwen2/pretrain.toml").read_text().replace(
        'preset = "qwen2-72b"', 'preset = "qwen2-72b"\nrope_theta = 10000.0', 1))
    model = resolve(recipes.load(str(path)).model)
    assert model.rope_theta == 10_000.0 and model.hidden_size == 8192  # the preset's own base is 1,000,000
    # a resolved config, as a checkpoint stores it and a probe reads it back, resolves to itself
    assert resolve(from_dict(ModelConfig, dataclasses.asdict(model), "checkpoint")) == model
    assert resolve(ModelConfig(preset="qwen2-72b", rope_theta=10_000.0)).rope_theta == 1_000_000.0
