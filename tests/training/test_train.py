"""The staged trainer: golden loss curve, exact kill-and-resume, FSDP2 under torchrun,
three stages to a Hugging Face model, and recipes and checkpoints that must fail."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.config import ConfigError
from kiln.training import recipe as recipes
from kiln.training.cli import main as train_main
from kiln.training.train import RunOptions, stage_paths, train
from tests.conftest import docstrings
from tests.training.test_checkpoint import DAMAGES, MakeDirectory, damage_file
from tests.training.corpus import CORE, build_corpus, recipe_text

GOLDEN = Path(__file__).parent.parent / "assets" / "losses" / "debug_cpu.json"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text in three domains, tokenized with a tokenizer trained here."""
    return build_corpus(tmp_path_factory.mktemp("corpus"))


THREE = CORE + """
[[stage]]
name = "long"
weights = { general = 0.6, code = 0.3, multilingual = 0.1 }
tokens = 4_096
seq_len = 128
batch_size = 4
rope_theta = 100_000.0
doc_masking = true
lr = 1e-3
schedule = "wsd"
checkpoint_every = 4

[[stage]]
name = "anneal"
weights = { general = 0.7, code = 0.3 }
tokens = 4_096
seq_len = 128
batch_size = 4
lr = 1e-3
schedule = "linear"
checkpoint_every = 2
average_last = 3
"""


def write_recipe(tmp_path: Path, corpus: Path, stages: str, name: str = "r.toml", **kw) -> Path:
    path = tmp_path / name
    path.write_text(recipe_text(corpus, tmp_path / "run", stages, **kw))
    return path


def losses(stage_dir: Path) -> dict[int, float]:
    """step -> train loss; a resumed run's later record of a step wins."""
    out = {}
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["train/loss"]
    return out


def test_debug_model_reproduces_its_golden_loss_curve(corpus, tmp_path):
    train(recipes.load(str(write_recipe(tmp_path, corpus, CORE))))
    got = losses(tmp_path / "run" / "01_core")
    assert len(got) == 25  # 12,800 tokens / (8 x 64) per step
    if os.environ.get("KILN_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({str(k): v for k, v in got.items()}, indent=1) + "\n")
    golden = {int(k): v for k, v in json.loads(GOLDEN.read_text()).items()}
    assert got.keys() == golden.keys()
    for step in golden:  # fp32 on CPU, fixed seed: the same numbers, to rounding
        assert got[step] == pytest.approx(golden[step], rel=1e-6, abs=1e-6), step
    assert got[25] < got[1] - 0.5  # and it learns (ln 512 = 6.24 at the start)


def test_kill_and_resume_reproduces_the_uninterrupted_losses(corpus, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    train(recipes.load(str(write_recipe(tmp_path / "a", corpus, CORE))))
    reference = losses(tmp_path / "a" / "run" / "01_core")
    (tmp_path / "b").mkdir()
    cut = write_recipe(tmp_path / "b", corpus, CORE)
    # Killed after step 13: no stage finished, and the last checkpoint is step 10.
    assert train(recipes.load(str(cut)), RunOptions(stop_after_steps=13)) == []
    ckpts = sorted(p.name for p in (tmp_path / "b" / "run" / "01_core" / "checkpoints").iterdir())
    assert ckpts == ["step-00000005", "step-00000010"]
    ckpt_dir = tmp_path / "b" / "run" / "01_core" / "checkpoints"
    (ckpt_dir / ".step-00000015.tmp").mkdir()  # a save cut short
    (ckpt_dir / "step-00000012").mkdir()  # a directory without its marker: not a checkpoint
    capsys.readouterr()
    train(recipes.load(str(cut)))
    err = capsys.readouterr().err
    assert ".step-00000015.tmp: partial checkpoint (interrupted while writing), skipped" in err
    assert "step-00000012: incomplete checkpoint (no kiln_checkpoint.json or DCP .metadata), skipped" in err
    assert "resumed from " in err and "step-00000010 (step 10, 5,120 tokens)" in err
    resumed = losses(tmp_path / "b" / "run" / "01_core")
    assert resumed == reference  # exactly: model, optimizer, data stream and RNG all restored


def test_three_stages_export_a_hugging_face_model(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = recipes.load(str(write_recipe(tmp_path, corpus, THREE)))
    summaries = train(recipe)
    assert [s["stage"] for s in summaries] == ["core", "long", "anneal"]
    paths = [stage_paths(recipe, i) for i in range(3)]  # what kiln mix run reads its proxies through
    assert [p.root for p in paths] == [str(tmp_path / "run" / d) for d in ("01_core", "02_long", "03_anneal")]
    assert [s["final"] for s in summaries] == [p.final for p in paths]
    assert all(os.path.exists(p.done) and os.path.exists(p.metrics) for p in paths)
    assert [s["tokens"] for s in summaries] == [12_800, 4_096, 4_096]
    anneal = tmp_path / "run" / "03_anneal"
    assert sorted(p.name for p in (anneal / "checkpoints").iterdir())[-3:] == [
        "step-00000004", "step-00000006", "step-00000008"]
    model = AutoModelForCausalLM.from_pretrained(str(anneal / "final"))
    assert model.config.rope_parameters["rope_theta"] == 100_000.0  # raised by the long-context stage
    assert (anneal / "final" / "tokenizer.json").exists()
    records = [json.loads(x) for x in (anneal / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train/lr"] == pytest.approx(1e-3 * (1 - 3584 / 4096))  # linear to 0, before the last step
    assert "val/general/bpb" in records[-1] and summaries[2]["averaged"] == 3
    # A relaunch finds every stage finished.
    again = train(recipes.load(str(tmp_path / "r.toml")))
    assert again == summaries


def test_fsdp2_on_two_cpu_processes_matches_one(corpus, tmp_path):
    one = write_recipe(tmp_path, corpus, CORE.replace("tokens = 12_800", "tokens = 5_120"), name="one.toml")
    train(recipes.load(str(one)))
    single = losses(tmp_path / "run" / "01_core")
    two = tmp_path / "two.toml"
    two.write_text(one.read_text().replace(str(tmp_path / "run"), str(tmp_path / "run2")))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "kiln.training", str(two)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr
    sharded = losses(tmp_path / "run2" / "01_core")
    assert sharded.keys() == single.keys()
    for step in single:  # the same global batch, split over ranks: float reassociation only
        assert sharded[step] == pytest.approx(single[step], rel=1e-4), step


def test_bad_recipes_fail_at_start_with_the_reason(corpus, tmp_path, capsys):
    bad = write_recipe(tmp_path, corpus, CORE.replace("seq_len = 64", "seq_len = 64\nsequence = 1"))
    with pytest.raises(ConfigError, match=r"r.toml: \[\[stage\]\] #1: unknown key 'sequence'"):
        recipes.load(str(bad))
    bad = write_recipe(tmp_path, corpus, CORE.replace("multilingual = 0.1", "multilingual = 0.2"))
    with pytest.raises(ConfigError, match=r"r.toml: \[\[stage\]\] core: .*sum"):
        train(recipes.load(str(bad)))
    bad = write_recipe(tmp_path, corpus, CORE.replace("multilingual = 0.1", "multilingual = 0.05, math = 0.05"))
    with pytest.raises(ConfigError, match="domain 'math' is in the mixture but not in"):
        train(recipes.load(str(bad)))
    bad = write_recipe(tmp_path, corpus, CORE, model='preset = "debug"\nvocab_size = 256')
    with pytest.raises(ConfigError, match="512"):  # shards from a larger tokenizer than the model's vocabulary
        train(recipes.load(str(bad)))
    bad = write_recipe(tmp_path, corpus, CORE + '\n[kernels]\nbackend = "triton"\n')
    message = r"r.toml: \[kernels\] backend: unknown backend 'triton' \(known: auto, reference, liger\)"
    with pytest.raises(ConfigError, match=message):
        recipes.load(str(bad))
    capsys.readouterr()
    assert train_main([str(bad)]) == 2  # `python -m kiln.training`, what torchrun starts: the same message
    assert re.search("kiln: error: .*" + message, capsys.readouterr().err)
    bad = write_recipe(tmp_path, corpus, CORE + "\n[kernels]\nchunk = 8\n")
    with pytest.raises(ConfigError, match=r"r.toml: \[kernels\]: unknown key 'chunk'"):
        recipes.load(str(bad))
    if not torch.cuda.is_available():
        bad = write_recipe(tmp_path, corpus, CORE + '\n[kernels]\nbackend = "liger"\n')
        with pytest.raises(ConfigError, match="'liger' needs CUDA, but this runs on cpu"):
            train(recipes.load(str(bad)))


def test_a_checkpoint_of_another_shape_is_refused(corpus, tmp_path):
    good = write_recipe(tmp_path, corpus, CORE)
    train(recipes.load(str(good)), RunOptions(stop_after_steps=6))
    shutil.rmtree(tmp_path / "run" / "01_core" / "final", ignore_errors=True)
    wider = write_recipe(tmp_path, corpus, CORE, model='preset = "debug"\nhidden_size = 128')
    with pytest.raises(ConfigError, match=r"step-00000005: checkpoint of another model shape: hidden_size = 64, "
                                          r"the recipe's model has 128"):
        train(recipes.load(str(wider)))


# --------------------------------------------------------------------------- the shards' tokenizer, damaged checkpoints, a resumed log


def records(stage_dir: Path) -> list[dict]:
    """Every record of metrics.jsonl, in file order."""
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def numbers(record: dict) -> dict:
    """A record without its wall-clock parts: what a reproduced step must repeat exactly."""
    return {k: v for k, v in record.items() if k != "time" and not k.startswith("perf/")}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> list[dict]:
    """metrics.jsonl of the uninterrupted CORE stage."""
    root = tmp_path_factory.mktemp("reference")
    train(recipes.load(str(write_recipe(root, corpus, CORE))))
    return records(root / "run" / "01_core")


@pytest.fixture(scope="module")
def interrupted(corpus, tmp_path_factory) -> Path:
    """A CORE run killed after step 13: checkpoints at steps 5 and 10, metrics to step 13."""
    root = tmp_path_factory.mktemp("interrupted")
    assert train(recipes.load(str(write_recipe(root, corpus, CORE))), RunOptions(stop_after_steps=13)) == []
    return root / "run"


def resume_copy(interrupted: Path, tmp_path: Path, corpus: Path) -> Path:
    shutil.copytree(interrupted, tmp_path / "run")
    return write_recipe(tmp_path, corpus, CORE)


def test_a_tokenizer_other_than_the_shards_is_refused_before_training(corpus, tmp_path):
    from kiln.curation.tokenizer import load_tokenizer, train_tokenizer

    other = tmp_path / "other_tok"
    train_tokenizer(docstrings("argparse") + docstrings("difflib"), str(other), vocab_size=1000)
    mine, shards = load_tokenizer(str(other)).hash, load_tokenizer(str(corpus / "tok")).hash
    assert mine != shards
    text = recipe_text(corpus, tmp_path / "run", CORE)
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(str(corpus / "tok"), str(other)))
    index = corpus / "shards" / "code" / "part-00000.json"
    with pytest.raises(ConfigError, match=re.escape(
            f"{bad}: [run] tokenizer {other / 'tokenizer.json'} has sha256 {mine}, but the shards were tokenized "
            f"with {shards} ({index} tokenizer_hash): bits per byte and the exported model need the shards' "
            "tokenizer") + "$"):
        train(recipes.load(str(bad)))
    assert not (tmp_path / "run").exists()  # refused before any stage started
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    bad.write_text(text.replace(str(corpus / "tok"), str(empty)))
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: [run] tokenizer {empty}: no tokenizer.json there") + "$"):
        train(recipes.load(str(bad)))
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_json_file_stands_for_its_directory(corpus, tmp_path, reference):
    ok = tmp_path / "file.toml"
    ok.write_text(recipe_text(corpus, tmp_path / "run", CORE).replace(
        str(corpus / "tok"), str(corpus / "tok" / "tokenizer.json")))
    train(recipes.load(str(ok)), RunOptions(stop_after_steps=10))
    got = records(tmp_path / "run" / "01_core")
    assert "val/general/bpb" in got[9]  # validation decoded the targets with it
    assert [numbers(r) for r in got] == [numbers(r) for r in reference[:10]]


@pytest.mark.parametrize("damage", [*DAMAGES, "crafted .metadata"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path, capsys, interrupted, reference,
                                                                     damage):
    recipe = resume_copy(interrupted, tmp_path, corpus)
    ckpt = tmp_path / "run" / "01_core" / "checkpoints" / "step-00000010"
    ran = tmp_path / "payload-ran"
    if damage == "crafted .metadata":  # DCP unpickles .metadata: this one would create `ran`
        listed = (ckpt / ".metadata").stat().st_size
        (ckpt / ".metadata").write_bytes(pickle.dumps(MakeDirectory(ran)))
        problem = f".metadata is {(ckpt / '.metadata').stat().st_size} bytes, the manifest says {listed}"
    else:
        problem = damage_file(ckpt, damage)
    capsys.readouterr()
    train(recipes.load(str(recipe)))
    err = capsys.readouterr().err
    assert f"warning: {ckpt}: damaged checkpoint ({problem}), skipped\n" in err
    assert f"resumed from {ckpt.parent / 'step-00000005'} (step 5, 2,560 tokens)\n" in err
    assert not ran.exists()
    got = records(tmp_path / "run" / "01_core")
    assert [r["step"] for r in got] == list(range(1, 26))
    assert [numbers(r) for r in got] == [numbers(r) for r in reference]


def test_a_resumed_run_logs_every_step_once(corpus, tmp_path, capsys, interrupted, reference):
    recipe = resume_copy(interrupted, tmp_path, corpus)
    assert [r["step"] for r in records(tmp_path / "run" / "01_core")] == list(range(1, 14))
    capsys.readouterr()
    train(recipes.load(str(recipe)))
    assert "step-00000010 (step 10, 5,120 tokens)" in capsys.readouterr().err
    got = records(tmp_path / "run" / "01_core")
    assert [r["step"] for r in got] == list(range(1, 26))  # 11..13, logged before the kill, once
    assert [numbers(r) for r in got] == [numbers(r) for r in reference]
    assert not list((tmp_path / "run" / "01_core").glob(".*"))  # no temporary file left beside it


def test_run_init_starts_from_a_safetensors_export_and_nothing_else(corpus, tmp_path):
    """`[run] init`: the first stage starts from a Hugging Face export, read from
    safetensors only. With lr 0 the stage changes nothing, so its export equals the init."""
    from safetensors.torch import load_file

    (tmp_path / "base").mkdir()
    (tmp_path / "init").mkdir()
    train(recipes.load(str(write_recipe(tmp_path / "base", corpus, CORE))))
    init = tmp_path / "base" / "run" / "01_core" / "final"
    frozen = CORE.replace('name = "core"', 'name = "frozen"').replace("lr = 3e-3", "lr = 0.0").replace(
        "tokens = 12_800", "tokens = 1_024")
    recipe = write_recipe(tmp_path / "init", corpus, frozen)
    recipe.write_text(recipe.read_text().replace("seed = 0", f'seed = 0\ninit = "{init}"'))
    train(recipes.load(str(recipe)))
    before = load_file(str(init / "model.safetensors"))
    after = load_file(str(tmp_path / "init" / "run" / "01_frozen" / "final" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    pickled = tmp_path / "pickled"  # the same model as a pickle: refused, never loaded
    shutil.copytree(init, pickled)
    torch.save(before, pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    recipe.write_text(recipe.read_text().replace(str(init), str(pickled)).replace('"frozen"', '"again"'))
    with pytest.raises(ConfigError, match=f"{pickled}: not a Hugging Face model directory with safetensors weights"):
        train(recipes.load(str(recipe)))
