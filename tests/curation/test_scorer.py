"""Transformer scorer: tiny models trained from scratch on real text, scored in and out of Spark."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pandas as pd
import pytest

from kiln.config import ConfigError
from kiln.curation.scorer import (
    Scorer, ScorerConfig, ScorerStage, ScorerTrainConfig, regression_metrics, resolve_positive_label,
    scorer_info, split_rows, train_scorer, train_scorer_from_files,
)
from kiln.curation.spark import ship
from kiln.curation.stage import run_stage
from tests.conftest import STDLIB, docstrings, read_dropped

TRAIN_PROSE = ("argparse", "subprocess", "typing", "dataclasses", "pathlib", "inspect", "functools", "threading",
               "tarfile", "zipfile", "logging/__init__", "email/message", "unittest/case", "difflib", "pickle",
               "socket", "ssl", "statistics")
TRAIN_CODE = ("heapq.py", "bisect.py", "shutil.py", "tokenize.py", "ast.py", "copy.py", "glob.py", "fnmatch.py",
              "textwrap.py", "string.py")
# Modules the models never saw, for the Spark comparison.
HELD_OUT_PROSE = ("contextlib", "enum", "random")
HELD_OUT_CODE = ("queue.py", "calendar.py", "base64.py")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Spark's tasks here get one core each (local[2]); the in-process side uses the same,
    and on a shared 2-core machine two spinning OpenMP threads run 20x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prose(modules) -> list[str]:
    return [d for m in modules for d in docstrings(m)]


def code_chunks(files, lines_per_chunk: int = 10, stride: int = 30, start: int = 0) -> list[str]:
    """Ten-line runs of real Python (comments and blank lines left out), from line `start`."""
    out = []
    for f in files:
        lines = [ln for ln in (STDLIB / f).read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
        out += ["\n".join(lines[i:i + lines_per_chunk]) for i in range(start, len(lines) - lines_per_chunk, stride)]
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A 400-token byte-level BPE with kiln's special tokens, as train-tokenizer writes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(prose(TRAIN_PROSE)[:60], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    out = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>").save_pretrained(out)
    return str(out)


def classification_data():
    texts_prose, texts_code = prose(TRAIN_PROSE)[:150], code_chunks(TRAIN_CODE)[:150]
    assert len(texts_prose) == len(texts_code) == 150
    return texts_prose + texts_code, ["prose"] * 150 + ["code"] * 150


CLS_CFG = dict(task="classification", max_length=64, epochs=4, lr=2e-3, val_fraction=0.2)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tokenizer_dir):
    texts, labels = classification_data()
    out = str(tmp_path_factory.mktemp("scorers") / "prose-vs-code")
    metrics = train_scorer(texts, labels, ScorerTrainConfig(tokenizer=tokenizer_dir, **CLS_CFG), out, log=lambda m: None)
    return out, metrics


def mixed_documents(n: int, seed: int = 0) -> tuple[list[str], list[float]]:
    """Four-line documents with k lines of code among prose lines; the label is k / 4."""
    prose_lines = [ln.strip() for d in prose(TRAIN_PROSE) for ln in d.splitlines() if 30 < len(ln.strip()) < 60]
    code_lines = [ln.strip() for f in TRAIN_CODE[:-1] for ln in (STDLIB / f).read_text().splitlines()
                  if 20 < len(ln.strip()) < 60 and not ln.strip().startswith(("#", '"', "'"))]
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        k = rng.randint(0, 4)
        lines = rng.sample(code_lines, k) + rng.sample(prose_lines, 4 - k)
        rng.shuffle(lines)
        texts.append("\n".join(lines))
        labels.append(k / 4)
    return texts, labels


REG_CFG = dict(task="regression", max_length=96, epochs=6, lr=3e-3, val_fraction=0.2)


@pytest.fixture(scope="module")
def regressor(tmp_path_factory, tokenizer_dir):
    texts, labels = mixed_documents(600)
    out = str(tmp_path_factory.mktemp("scorers") / "code-fraction")
    metrics = train_scorer(texts, labels, ScorerTrainConfig(tokenizer=tokenizer_dir, **REG_CFG), out, log=lambda m: None)
    return out, metrics


def test_classifier_separates_prose_from_code(classifier):
    out, metrics = classifier
    # Floor verified over seeds 0-3: 0.967, 1.0, 0.967, 0.983 on 60 held-out rows.
    assert metrics["accuracy"] >= 0.9
    meta = json.loads(open(os.path.join(out, "kiln_scorer.json")).read())
    assert (meta["task"], meta["labels"], meta["positive_label"]) == ("classification", ["code", "prose"], "prose")
    assert (meta["train_rows"], meta["val_rows"], meta["max_length"]) == (240, 60, 64)
    assert meta["lead_token_id"] == 0  # kiln's tokenizer adds no [CLS]: <|endoftext|> leads every document
    assert {"config.json", "model.safetensors", "tokenizer.json", "kiln_scorer.json"} <= set(os.listdir(out))
    assert {c: m["support"] for c, m in metrics["per_class"].items()} == {"code": 30, "prose": 30}

    # The saved model is the one that was evaluated: reloaded, it gets the same numbers.
    texts, labels = classification_data()
    _, val = split_rows(labels, "classification", 0.2, seed=0)
    scorer = Scorer.load(out, device="cpu")
    predicted, probs = scorer.classify([texts[i] for i in val])
    assert sum(p == labels[i] for p, i in zip(predicted, val)) / len(val) == metrics["accuracy"]
    code_hits = sum(p == "code" and labels[i] == "code" for p, i in zip(predicted, val))
    assert metrics["per_class"]["code"]["recall"] == code_hits / 30
    assert probs.shape == (60, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(scorer.score([texts[i] for i in val]), probs[:, 1])


def test_regressor_learns_the_code_fraction(regressor):
    out, metrics = regressor
    # Floor verified over seeds 0-3: r = 0.824, 0.841, 0.839, 0.866 (mse 0.032-0.041) on 120 held-out documents.
    assert metrics["pearson_r"] >= 0.7
    assert metrics["mse"] < 0.07  # predicting the mean (variance of k/4, k uniform on 0..4) scores 0.125

    texts, labels = mixed_documents(600)
    _, val = split_rows(labels, "regression", 0.2, seed=0)
    again = regression_metrics(Scorer.load(out, device="cpu").score([texts[i] for i in val]),
                               np.array([labels[i] for i in val]))
    assert again["pearson_r"] == pytest.approx(metrics["pearson_r"], abs=1e-6)
    assert again["mse"] == pytest.approx(metrics["mse"], abs=1e-7)
    meta = json.loads(open(os.path.join(out, "kiln_scorer.json")).read())
    assert (meta["labels"], meta["positive_label"], meta["train_rows"], meta["val_rows"]) == ([], "", 480, 120)


def test_fine_tuning_starts_from_the_checkpoint_with_a_new_head(classifier, tmp_path):
    """The classifier as a 'pretrained' model_dir, turned into a regressor. With lr = 0 the
    encoder must come out exactly as it went in: proof it was loaded, not re-initialised."""
    from safetensors.numpy import load_file

    cls_dir, _ = classifier
    texts, labels = mixed_documents(40, seed=3)
    out = tmp_path / "fine-tuned"
    train_scorer(texts, labels, ScorerTrainConfig(model_dir=cls_dir, max_length=64, epochs=1, lr=0.0, val_fraction=0.25),
                 str(out), log=lambda m: None)
    before, after = load_file(os.path.join(cls_dir, "model.safetensors")), load_file(str(out / "model.safetensors"))
    encoder = [k for k in before if not k.startswith("classifier.")]
    assert encoder and all(np.array_equal(before[k], after[k]) for k in encoder)
    assert before["classifier.out_proj.weight"].shape == (2, 64) and after["classifier.out_proj.weight"].shape == (1, 64)
    meta = json.loads((out / "kiln_scorer.json").read_text())
    assert (meta["task"], meta["labels"], meta["train_rows"], meta["val_rows"]) == ("regression", [], 30, 10)
    assert Scorer.load(str(out), device="cpu").score(texts[:3]).shape == (3,)


def test_training_from_labelled_files(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, labels = classification_data()
    pick = list(range(0, 300, 10))  # 15 prose, 15 code
    pq.write_table(pa.table({"body": [texts[i] for i in pick], "kind": [labels[i] for i in pick]}),
                   tmp_path / "labelled.parquet")
    cfg = ScorerTrainConfig(tokenizer=tokenizer_dir, **{**CLS_CFG, "epochs": 1})
    metrics = train_scorer_from_files([str(tmp_path / "labelled.parquet")], "body", "kind", cfg, str(tmp_path / "m"),
                                      log=lambda m: None)
    meta = json.loads((tmp_path / "m" / "kiln_scorer.json").read_text())
    assert (meta["labels"], meta["train_rows"], meta["val_rows"]) == (["code", "prose"], 24, 6)
    assert meta["metrics"] == metrics and meta["config"]["epochs"] == 1

    (tmp_path / "graded.jsonl").write_text('{"text": "a fine page", "score": 4.5}\n'
                                           '{"text": "another page", "score": "high"}\n')
    with pytest.raises(ConfigError, match=r"regression label 'high' \(row 1\) is not a number"):
        train_scorer_from_files([str(tmp_path / "graded.jsonl")], "text", "score",
                                ScorerTrainConfig(tokenizer=tokenizer_dir), str(tmp_path / "m2"))


def held_out_rows() -> list[tuple[str, str | None]]:
    rows = [(f"prose-{i}", t) for i, t in enumerate(prose(HELD_OUT_PROSE)[:8])]
    # Past each module's header: a docstring over a few imports is prose as much as code.
    rows += [(f"code-{i}", t) for i, t in enumerate(code_chunks(HELD_OUT_CODE, stride=40, start=40)[:8])]
    return rows + [("empty", ""), ("blank", "  \n\t "), ("null", None)]


def frame(spark, rows):
    return spark.createDataFrame(pd.DataFrame({"id": [r[0] for r in rows], "text": [r[1] for r in rows]}),
                                 "id string, text string").repartition(3)


def test_spark_scores_equal_in_process_and_min_score_drops(spark, classifier, tmp_path):
    model_dir, _ = classifier
    rows = held_out_rows()
    expected = dict(zip([r[0] for r in rows], Scorer.load(model_dir, device="cpu").score([r[1] for r in rows])))
    min_score = 0.5
    # No score sits on the threshold, so float rounding between batchings cannot move a drop.
    assert all(abs(s - min_score) > 1e-3 for s in expected.values() if not np.isnan(s))
    low = {k for k, s in expected.items() if s < min_score}
    assert low == {f"code-{i}" for i in range(8)}  # held-out code scores low, held-out prose high

    stage = ScorerStage(ScorerConfig(model_dir=model_dir, min_score=min_score, batch_size=4))
    result = run_stage(spark, stage, frame(spark, rows), str(tmp_path / "out"), write_dropped=True)
    assert result.stats.docs_in == 19 and result.stats.kept == 11
    assert result.stats.dropped == {"model_score_low": 8}
    assert result.stats.extra["metrics"] == {"unscored_documents": 3}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["extra"]["metrics"] == {"unscored_documents": 3}

    kept = {r["id"]: r["model_score"] for r in result.kept.collect()}
    assert set(kept) == {f"prose-{i}" for i in range(8)} | {"empty", "blank", "null"}
    assert kept["empty"] is None and kept["blank"] is None and kept["null"] is None
    dropped = read_dropped(tmp_path / "out")
    assert set(dropped["drop_reason"]) == {"model_score_low"}
    scores = {**kept, **dict(zip(dropped["id"], dropped["model_score"]))}
    assert set(scores) == set(expected)
    for id_, s in scores.items():
        if id_ not in ("empty", "blank", "null"):
            assert s == pytest.approx(float(expected[id_]), abs=1e-5), id_


def test_regression_scores_through_spark_without_drops(spark, regressor):
    model_dir, _ = regressor
    texts, _ = mixed_documents(30, seed=7)
    rows = [(f"d{i}", t) for i, t in enumerate(texts)]
    expected = Scorer.load(model_dir, device="cpu").score(texts)
    result = run_stage(spark, ScorerStage(ScorerConfig(model_dir=model_dir, column="code_fraction")),
                       frame(spark, rows), None)
    got = {r["id"]: r["code_fraction"] for r in result.result.collect()}
    result.unpersist()
    assert result.stats.kept == 30 and result.stats.dropped == {}
    assert result.stats.extra["metrics"] == {"unscored_documents": 0}
    np.testing.assert_allclose([got[f"d{i}"] for i in range(30)], expected, rtol=0, atol=1e-5)


def test_archive_shipping_unpacks_the_directory(spark, classifier):
    """The cluster path (addArchive of a zip), forced on the local master."""
    model_dir, _ = classifier
    name = ship(spark, model_dir, key="archived", archive=True)

    def listing(_):
        from pyspark import SparkFiles

        yield sorted(os.listdir(SparkFiles.get(name)))

    listings = spark.sparkContext.parallelize(range(2), 2).mapPartitions(listing).collect()
    assert name == f"{os.path.basename(model_dir)}-archived.zip"
    assert listings == [sorted(os.listdir(model_dir))] * 2


def test_settings_follow_the_weights_not_the_path(classifier, regressor, tmp_path):
    cls_dir, reg_dir = classifier[0], regressor[0]
    a, b = tmp_path / "a" / "scorer", tmp_path / "b" / "scorer"
    shutil.copytree(cls_dir, a)
    shutil.copytree(cls_dir, b)
    stage_a, stage_b = ScorerStage(ScorerConfig(model_dir=str(a))), ScorerStage(ScorerConfig(model_dir=str(b)))
    assert stage_a.settings() == stage_b.settings()
    assert stage_a.settings()["model_dir"] == "scorer"
    info = scorer_info(str(a))  # what the domain stage's transformer backend reads
    assert (info["fingerprint"], info["labels"]) == (stage_a.settings()["model_sha256"], ["code", "prose"])
    shutil.copy(os.path.join(reg_dir, "model.safetensors"), b / "model.safetensors")  # "retrained" in place
    changed = ScorerStage(ScorerConfig(model_dir=str(b))).settings()
    assert {k for k in changed if changed[k] != stage_a.settings()[k]} == {"model_sha256"}


def test_positive_label_defaults():
    assert resolve_positive_label(["0", "1"]) == "1"
    assert resolve_positive_label(["hq", "lq"]) == "hq"
    assert resolve_positive_label(["negative", "positive"]) == "positive"
    assert resolve_positive_label(["bad", "good"]) == "good"
    assert resolve_positive_label(["code", "prose"]) == "prose"
    assert resolve_positive_label(["law", "news", "science"]) == ""
    assert resolve_positive_label(["law", "news", "science"], "news") == "news"
    with pytest.raises(ConfigError, match=r"positive_label 'hq' is not one of the classes \['0', '1'\]"):
        resolve_positive_label(["0", "1"], "hq")


def test_bad_training_input_fails_clearly(tmp_path, tokenizer_dir):
    texts = [f"document number {i} about something" for i in range(20)]
    new = ScorerTrainConfig(task="classification", tokenizer=tokenizer_dir)
    with pytest.raises(ConfigError, match="two classes or more: all 20 rows are labelled 'good'"):
        train_scorer(texts, ["good"] * 20, new, str(tmp_path / "m"))
    labels = [0.5, 1.0, "high"] + [0.0] * 17
    with pytest.raises(ConfigError, match=r"regression label 'high' \(row 2\) is not a number"):
        train_scorer(texts, labels, ScorerTrainConfig(tokenizer=tokenizer_dir), str(tmp_path / "m"))
    with pytest.raises(ConfigError, match=r"4 rows are too few for a validation split at val_fraction=0.1"):
        train_scorer(texts[:4], [0.0, 1.0, 0.0, 1.0], ScorerTrainConfig(tokenizer=tokenizer_dir), str(tmp_path / "m"))
    with pytest.raises(ConfigError, match="a new scorer model needs a tokenizer"):
        train_scorer(texts, [i / 20 for i in range(20)], ScorerTrainConfig(), str(tmp_path / "m"))
    not_a_model = tmp_path / "empty-dir"
    not_a_model.mkdir()
    with pytest.raises(ConfigError, match=f"{not_a_model}: not a transformers checkpoint \\(no config.json\\)"):
        train_scorer(texts, [i / 20 for i in range(20)], ScorerTrainConfig(model_dir=str(not_a_model)),
                     str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()  # nothing half-written


def test_a_directory_that_is_not_a_scorer_fails_with_path(tmp_path, tokenizer_dir):
    with pytest.raises(ConfigError, match=f"{tokenizer_dir}: not a kiln scorer directory"):
        ScorerStage(ScorerConfig(model_dir=tokenizer_dir))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'missing'}: not a kiln scorer directory"):
        Scorer.load(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="scorer: model_dir is not set"):
        ScorerStage(ScorerConfig())
