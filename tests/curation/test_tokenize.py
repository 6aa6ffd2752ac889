"""Tokenizer training and token shards: exact ids back from every shard, drops, dtypes, reruns."""

from __future__ import annotations

import hashlib
import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.config import ConfigError
from kiln.curation.stage import run_stage
from kiln.curation.token_shards import TokenizeConfig, TokenizeStage
from kiln.curation.tokenizer import SPECIAL_TOKENS, iter_texts, load_tokenizer, train_tokenizer
from kiln.formats.shards import ShardError, iter_documents, load_shard, read_index, shard_indexes
from tests.conftest import docstrings

UNSEEN = "naïve café, 東京タワー 🙂 — tab\there \x00 \x7f end"  # bytes the training sample never showed


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    texts = docstrings("difflib") + docstrings("tarfile") + docstrings("heapq")
    info = train_tokenizer(texts, str(out), vocab_size=512, log=lambda msg: None)
    return out, info


def listing(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


def test_trained_tokenizer_loads_in_tokenizers_and_transformers(trained):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out, info = trained
    assert info["vocab_size"] == 512
    assert info["hash"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert tok.decode(tok.encode(UNSEEN, add_special_tokens=False).ids) == UNSEEN

    hf = AutoTokenizer.from_pretrained(str(out))
    assert (hf.eos_token, hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == ("<|endoftext|>", 0, 1, 2)
    assert hf.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]) == [3, 4, 5]
    assert set(hf.all_special_tokens) == set(SPECIAL_TOKENS)
    text = docstrings("argparse")[0]
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False).ids
    turn = hf.encode("<|start_header_id|>user<|end_header_id|>hi<|eot_id|>", add_special_tokens=False)
    assert turn[0] == 3 and turn[-1] == 5 and turn.count(4) == 1

    loaded = load_tokenizer(str(out))
    assert (loaded.hash, loaded.vocab_size, loaded.eos_id, loaded.dtype) == (info["hash"], 512, 0, "uint16")


def corpus() -> list[tuple[str, str | None, str | None]]:
    """(id, text, domain): three named domains, one with '/', one null domain, four drops."""
    rows = [(f"code-{i}", t, "code") for i, t in enumerate(docstrings("argparse")[:6])]
    rows += [(f"web-{i}", t, "web") for i, t in enumerate(docstrings("subprocess")[:5])]
    rows += [("web-unseen", UNSEEN, "web")]
    rows += [(f"news-{i}", t, "news/en") for i, t in enumerate(docstrings("textwrap")[:4])]
    rows += [("nodomain", docstrings("textwrap")[4], None)]
    rows += [("empty", "", "web"), ("blank", "  \n\t ", "code"), ("null", None, "code"),
             ("long", "lorem ipsum " * 500, "web")]  # 6000 chars > max_doc_chars
    return rows


def frame(spark, rows, partitions: int, with_domain: bool = True):
    data = {"id": [r[0] for r in rows], "text": [r[1] for r in rows]}
    ddl = "id string, text string"
    if with_domain:
        data["domain"], ddl = [r[2] for r in rows], ddl + ", domain string"
    return spark.createDataFrame(pd.DataFrame(data), ddl).repartition(partitions, "id")


def test_stage_writes_shards_that_decode_to_each_documents_ids(spark, trained, tmp_path):
    from tokenizers import Tokenizer

    out, info = trained
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    rows = corpus()
    shards = tmp_path / "shards"
    stage = TokenizeStage(TokenizeConfig(tokenizer=str(out), shards_dir=str(shards), max_doc_chars=5000))
    result = run_stage(spark, stage, frame(spark, rows, 3), str(tmp_path / "stage"))

    assert result.stats.dropped == {"empty_document": 3, "doc_too_long": 1}
    assert result.stats.docs_in == len(rows) == result.stats.kept + 4
    expected = {id_: tok.encode(text, add_special_tokens=False).ids + [0]
                for id_, text, _ in rows if id_ not in ("empty", "blank", "null", "long")}
    domain_of = {id_: domain or "general" for id_, _, domain in rows if id_ in expected}
    kept = pq.read_table(tmp_path / "stage" / "docs").to_pylist()
    assert {r["id"]: r["n_tokens"] for r in kept} == {k: len(v) for k, v in expected.items()}

    shard_of = {r["id"]: r["shard"] for r in kept}
    for domain, dirname in (("code", "code"), ("web", "web"), ("news/en", "news%2Fen"), ("general", "general")):
        indexes = shard_indexes(str(shards), domain)
        assert indexes and all(os.path.dirname(p) == str(shards / dirname) for p in indexes)
        seen = []
        for index_path in indexes:
            tokens, index = load_shard(index_path)
            assert (index["domain"], index["dtype"], tokens.dtype.str) == (domain, "uint16", "<u2")
            assert index["tokenizer_hash"] == info["hash"] and index["eos_id"] == 0
            assert os.path.getsize(index_path[:-5] + ".bin") == 2 * index["num_tokens"] == 2 * len(tokens)
            offsets = index["doc_offsets"]
            assert len(offsets) == index["num_docs"] + 1 and offsets[-1] == index["num_tokens"]
            for i, doc_id in enumerate(index["doc_ids"]):
                assert tokens[offsets[i]:offsets[i + 1]].tolist() == expected[doc_id], doc_id
                assert shard_of[doc_id] == os.path.relpath(index_path[:-5] + ".bin", shards)
            assert [d.tolist() for d in iter_documents(index_path)] == [expected[d][:-1] for d in index["doc_ids"]]
            seen += index["doc_ids"]
        assert sorted(seen) == sorted(k for k, v in domain_of.items() if v == domain)

    availability = json.loads((shards / "availability.json").read_text())
    per_domain = {d: sum(len(expected[k]) for k in expected if domain_of[k] == d) for d in set(domain_of.values())}
    assert {d: v["tokens"] for d, v in availability["domains"].items()} == per_domain
    assert {d: v["documents"] for d, v in availability["domains"].items()} == {"code": 6, "web": 6, "news/en": 4,
                                                                              "general": 1}
    assert availability["total_tokens"] == sum(map(len, expected.values())) == result.stats.extra["metrics"]["tokens"]
    assert availability["total_documents"] == 17
    assert (availability["tokenizer_hash"], availability["dtype"], availability["vocab_size"]) == \
        (info["hash"], "uint16", 512)
    assert result.stats.extra["availability"]["news/en"] == {"tokens": per_domain["news/en"], "documents": 4,
                                                              "shards": len(shard_indexes(str(shards), "news/en"))}
    # Nothing but the shards and availability.json: no temporary files left behind.
    shard_files = {f for d in availability["domains"].values() for p in d["shards"] for f in (p, p[:-5] + ".bin")}
    assert listing(shards) == shard_files | {"availability.json"}


def test_no_domain_column_and_a_rerun_with_fewer_partitions_leaves_no_stale_shards(spark, trained, tmp_path,
                                                                                    capsys):
    out, _ = trained
    rows = [r for r in corpus() if r[0].startswith(("code", "web")) or r[0] in ("empty", "long")]
    shards = tmp_path / "shards"
    stage = TokenizeStage(TokenizeConfig(tokenizer=str(out), shards_dir=str(shards), max_doc_chars=5000))

    first = run_stage(spark, stage, frame(spark, rows, 3, with_domain=False), None)
    first.unpersist()
    assert "[tokenize] input has no 'domain' column: every document goes to domain 'general'" in capsys.readouterr().err
    assert listing(shards) == {"availability.json"} | {f"general/part-{p:05d}.{ext}" for p in range(3)
                                                       for ext in ("bin", "json")}
    tokens_first = json.loads((shards / "availability.json").read_text())["total_tokens"]

    second = run_stage(spark, stage, frame(spark, rows, 3, with_domain=False).coalesce(1), None)
    second.unpersist()
    assert second.stats.dropped == {"doc_too_long": 1, "empty_document": 1}
    assert listing(shards) == {"availability.json", "general/part-00000.bin", "general/part-00000.json"}
    availability = json.loads((shards / "availability.json").read_text())
    assert availability["domains"]["general"]["shards"] == ["general/part-00000.json"]
    assert availability["total_tokens"] == tokens_first == second.stats.extra["metrics"]["tokens"]
    assert sorted(read_index(str(shards / "general/part-00000.json"))["doc_ids"]) == sorted(
        r[0] for r in rows if r[0] not in ("empty", "long"))


def wordlevel_tokenizer(path, words: int, eos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<unk>": 1} if eos else {"<unk>": 0}
    vocab.update({f"w{i}": len(vocab) + i for i in range(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def test_a_vocabulary_past_uint16_writes_uint32_shards(spark, tmp_path):
    big = wordlevel_tokenizer(tmp_path / "big", 70_000)  # ids up to 70_001
    logged = []
    info = load_tokenizer(str(big), log=logged.append)
    assert (info.vocab_size, info.eos_id, info.dtype) == (70_002, 0, "uint32")
    assert logged == [f"{big}: token ids go up to 70001, past uint16's 65535; "
                      "token shards are written as uint32 (4 bytes a token)"]

    shards = tmp_path / "shards"
    stage = TokenizeStage(TokenizeConfig(tokenizer=str(big), shards_dir=str(shards)))
    rows = pd.DataFrame({"id": ["a", "b"], "text": ["w0 w65533 w65534 w69999", "w1 nope"]})
    result = run_stage(spark, stage, spark.createDataFrame(rows, "id string, text string").coalesce(1), None)
    result.unpersist()
    (index_path,) = shard_indexes(str(shards))
    tokens, index = load_shard(index_path)
    assert (index["dtype"], tokens.dtype.str, index["doc_ids"]) == ("uint32", "<u4", ["a", "b"])
    assert tokens.tolist() == [2, 65535, 65536, 70001, 0, 3, 1, 0]
    assert os.path.getsize(shards / "general" / "part-00000.bin") == 4 * 8

    # A partial shard or a lost one must fail the stage's cross-check, naming the file.
    with open(shards / "general" / "part-00000.bin", "r+b") as f:
        f.truncate(4 * 7)
    with pytest.raises(ShardError, match=r"part-00000.bin: 28 bytes, its index says 8 uint32 tokens \(32 bytes\)"):
        stage.finish(result.stats)
    os.remove(index_path)
    with pytest.raises(ShardError, match="shards hold 0 tokens of 0 documents, "
                                         "the stage counted 8 tokens of 2 kept documents"):
        stage.finish(result.stats)


def test_unusable_tokenizers_and_shard_dirs_fail_with_the_path(spark, tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}/missing.json: tokenizer file not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ConfigError, match=f"{tmp_path}/empty_dir/tokenizer.json: tokenizer file not found"):
        load_tokenizer(str(tmp_path / "empty_dir"))
    (tmp_path / "garbage.json").write_text("this is not a tokenizer")
    with pytest.raises(ConfigError, match=f"{tmp_path}/garbage.json: not a tokenizers tokenizer.json"):
        load_tokenizer(str(tmp_path / "garbage.json"))
    no_eos = wordlevel_tokenizer(tmp_path / "no_eos", 10, eos=False)
    with pytest.raises(ConfigError, match=f"{no_eos}: no end-of-sequence token '<\\|endoftext\\|>' in the vocabulary"):
        load_tokenizer(str(no_eos))
    with pytest.raises(ConfigError, match="shards_dir is required"):
        TokenizeStage(TokenizeConfig(tokenizer=str(tmp_path / "garbage.json")))

    small = wordlevel_tokenizer(tmp_path / "small", 10)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    stage = TokenizeStage(TokenizeConfig(tokenizer=str(small), shards_dir=str(precious)))
    df = spark.createDataFrame(pd.DataFrame({"id": ["a"], "text": ["w1"]}), "id string, text string")
    with pytest.raises(ConfigError, match=f"{precious}: holds 'notes.txt', which is not a kiln token shard"):
        stage.prepare(spark, df)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_iter_texts_reads_jsonl_parquet_and_stage_dirs_up_to_max_chars(tmp_path):
    import zstandard

    rows = [{"text": "alpha"}, {"text": ""}, {"other": 1}, {"text": "beta gamma"}]
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r) + "\n" for r in rows).encode()))
    pq.write_table(pa.table({"text": ["delta", None, "epsilon"]}), tmp_path / "b.parquet")
    (tmp_path / "stage" / "docs").mkdir(parents=True)
    (tmp_path / "stage" / "stats.json").write_text("{}")
    pq.write_table(pa.table({"id": ["z"], "text": ["zeta"]}), tmp_path / "stage" / "docs" / "part-0.parquet")
    inputs = [str(tmp_path / "a.jsonl.zst"), str(tmp_path / "b.parquet"), str(tmp_path / "stage")]

    assert list(iter_texts(inputs)) == ["alpha", "beta gamma", "delta", "epsilon", "zeta"]
    assert list(iter_texts(inputs, max_chars=12)) == ["alpha", "beta ga"]
    with pytest.raises(ConfigError, match=f"{tmp_path}/b.parquet: no column 'body'"):
        list(iter_texts([str(tmp_path / "b.parquet")], text_column="body"))
