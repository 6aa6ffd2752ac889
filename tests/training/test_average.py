"""`kiln average`: the weighted mean of exported models, exactly, in a directory that
transformers loads; models that differ, bad weights and unsafe output directories refused."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.cli import main
from kiln.config import ConfigError
from kiln.training.average import average_models
from kiln.training.model import ModelConfig, build_model, hf_config, resolve, save_hf

DEBUG = ModelConfig(preset="debug", vocab_size=128)


def export(path: Path, seed: int, cfg: ModelConfig = DEBUG) -> Path:
    save_hf(build_model(resolve(cfg), seed=seed), str(path))
    return path


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def mean(tensors: list[dict[str, torch.Tensor]], ws: list[float]) -> dict[str, torch.Tensor]:
    """The weighted mean in float64, rounded once to each tensor's dtype."""
    out = {}
    for name, first in tensors[0].items():
        total = torch.zeros(first.shape, dtype=torch.float64)
        for w, t in zip(ws, tensors):
            total += w * t[name].double()
        out[name] = total.to(first.dtype)
    return out


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_identical_models_average_to_themselves(tmp_path):
    a = export(tmp_path / "a", seed=0)
    copies = [a, shutil.copytree(a, tmp_path / "a2"), shutil.copytree(a, tmp_path / "a3")]
    out = tmp_path / "avg"
    average_models([str(d) for d in copies], str(out), log=lambda _: None)
    assert_same(weights(out), weights(a))  # a third of each, in float64, rounds back to the float32 weights
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "kiln_average.json",
                                                     "model.safetensors"]
    assert (out / "config.json").read_bytes() == (a / "config.json").read_bytes()


def test_weighted_average_is_exact_and_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = export(tmp_path / "a", seed=0), export(tmp_path / "b", seed=1)
    (a / "tokenizer.json").write_text('{"model": "a"}')
    (b / "tokenizer.json").write_text('{"model": "b"}')
    out = tmp_path / "avg"
    lines = []
    summary = average_models([str(a), str(b)], str(out), weights=[1, 3], log=lines.append)

    expected = mean([weights(a), weights(b)], [0.25, 0.75])
    assert_same(weights(out), expected)
    assert not torch.equal(expected["lm_head.weight"], weights(a)["lm_head.weight"])
    assert (out / "tokenizer.json").read_text() == '{"model": "a"}'  # the first model's
    digest = hashlib.sha256((b / "model.safetensors").read_bytes()).hexdigest()
    assert summary == json.loads((out / "kiln_average.json").read_text())
    assert summary["models"][1] == {"path": str(b), "weight": 0.75, "weights_sha256": {"model.safetensors": digest}}
    assert (summary["models"][0]["weight"], summary["tensors"]) == (0.25, len(expected))
    assert summary["parameters"] == sum(t.numel() for t in expected.values())
    assert lines == [f"averaging 2 models into {out}:", f"  0.2500 x {a}", f"  0.7500 x {b}",
                     f"wrote {out}: {summary['parameters']:,} parameters in {len(expected)} tensors"]

    loaded = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True)
    reference = build_model(resolve(DEBUG))
    reference.load_state_dict(expected)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, reference(input_ids=x).logits)
    assert not list(tmp_path.glob(".avg.*"))  # no temporary directory left behind


def test_sharded_inputs_average_like_single_files(tmp_path):
    a, b = export(tmp_path / "a", seed=0), export(tmp_path / "b", seed=1)
    sharded = tmp_path / "a_sharded"
    build_model(resolve(DEBUG), seed=0).save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    average_models([str(a), str(b)], str(tmp_path / "avg1"), log=lambda _: None)
    summary = average_models([str(sharded), str(b)], str(tmp_path / "avg2"), log=lambda _: None)
    assert (tmp_path / "avg1/model.safetensors").read_bytes() == (tmp_path / "avg2/model.safetensors").read_bytes()
    assert sorted(summary["models"][0]["weights_sha256"]) == sorted(p.name for p in sharded.glob("model-*"))


def test_reward_models_average_name_by_name_in_their_dtype(tmp_path):
    from transformers import AutoModelForSequenceClassification

    dirs = []
    for seed in (0, 1):
        config = hf_config(resolve(DEBUG))
        config.num_labels = 1
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(tmp_path / f"rm{seed}")
        dirs.append(tmp_path / f"rm{seed}")
    out = tmp_path / "avg"
    average_models([str(d) for d in dirs], str(out), log=lambda _: None)
    averaged = weights(out)
    assert averaged["score.weight"].shape == (1, 64) and averaged["score.weight"].dtype == torch.bfloat16
    assert_same(averaged, mean([weights(d) for d in dirs], [0.5, 0.5]))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out), use_safetensors=True)
    assert torch.equal(loaded.score.weight, averaged["score.weight"])


def test_models_that_differ_are_refused_naming_the_directory(tmp_path):
    a, b = export(tmp_path / "a", seed=0), export(tmp_path / "b", seed=1)
    wide = export(tmp_path / "wide", seed=1, cfg=ModelConfig(preset="debug", vocab_size=192))
    message = f"{wide}: config.json key vocab_size differs from {a}'s: 192 vs 128"
    with pytest.raises(ConfigError, match=exactly(message)):
        average_models([str(a), str(wide)], str(tmp_path / "avg"))

    state = weights(b)
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.bfloat16)
    save_file(state, str(b / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=exactly(f"{b}: tensor model.norm.weight differs from {a}'s: "
                                               "shape [64] BF16 vs shape [64] F32")):
        average_models([str(a), str(b)], str(tmp_path / "avg"))

    del state["lm_head.weight"]
    save_file(state, str(b / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=exactly(f"{b}: has no tensor lm_head.weight (which {a} has)")):
        average_models([str(a), str(b)], str(tmp_path / "avg"))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(a / "config.json", pickled / "config.json")
    torch.save(weights(a), pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=exactly(f"{pickled}: no model.safetensors or model.safetensors.index.json "
                                               "(only pytorch_model.bin, which kiln does not unpickle)")):
        average_models([str(a), str(pickled)], str(tmp_path / "avg"))
    assert not (tmp_path / "avg").exists()


@pytest.mark.parametrize("ws, message", [
    ([1.0, 0.0], "--weights: 0.0 is not a positive finite number"),
    ([1.0, -2.0], "--weights: -2.0 is not a positive finite number"),
    ([1.0, math.nan], "--weights: nan is not a positive finite number"),
    ([math.inf, 1.0], "--weights: inf is not a positive finite number"),
    ([1.0], "--weights: 1 weights for 2 models"),
])
def test_bad_weights_are_refused(tmp_path, ws, message):
    a, b = export(tmp_path / "a", seed=0), export(tmp_path / "b", seed=1)
    with pytest.raises(ConfigError, match=exactly(message)):
        average_models([str(a), str(b)], str(tmp_path / "avg"), weights=ws)


def test_out_dir_must_be_new_empty_or_a_previous_average(tmp_path):
    a, b = export(tmp_path / "a", seed=0), export(tmp_path / "b", seed=1)
    with pytest.raises(ConfigError, match="^" + re.escape(f"--out {a}: is (or holds) the input {a}")):
        average_models([str(a), str(b)], str(a))
    with pytest.raises(ConfigError, match="^" + re.escape(f"--out {tmp_path}: is (or holds) the input {a}")):
        average_models([str(a), str(b)], str(tmp_path))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="^" + re.escape(f"--out {busy}: not empty and not a previous kiln average")):
        average_models([str(a), str(b)], str(busy))
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match=exactly("averaging needs at least two models, got 1")):
        average_models([str(a)], str(tmp_path / "avg"))

    out = tmp_path / "avg"
    out.mkdir()  # empty: allowed
    average_models([str(a), str(b)], str(out), log=lambda _: None)
    average_models([str(a), str(b)], str(out), weights=[3, 1], log=lambda _: None)  # replaces the previous average
    assert_same(weights(out), mean([weights(a), weights(b)], [0.75, 0.25]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "avg", "b", "busy"]


def test_cli(tmp_path, capsys):
    a, b = export(tmp_path / "a", seed=0), export(tmp_path / "b", seed=1)
    out = tmp_path / "avg"
    assert main(["average", str(a), str(b), "--out", str(out), "--weights", "1", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"  0.2500 x {a}\n  0.7500 x {b}\n" in printed and f"wrote {out}: " in printed
    assert_same(weights(out), mean([weights(a), weights(b)], [0.25, 0.75]))
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "x"), "--weights", "1", "0"]) == 2
    assert capsys.readouterr().err == "kiln: error: --weights: 0.0 is not a positive finite number\n"
