"""Mixture files, token shards and the mixture sampler: exact streams, exact errors.

The test shards are written with tokenize.py's own shard writer. Every token of the
corpus is a distinct id (EOS aside), so a token names its domain, its document and its
place in it: a window can be traced back to exactly the documents it came from.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.config import ConfigError
from kiln.formats.shards import SHARD_FORMAT, ShardWriter
from kiln.training.data import Batch, DataConfig, MixtureSampler, TokenSource, open_data
from kiln.formats.mixture import Mixture, load_mixture, save_mixture

EOS = 0
VOCAB = 8192
HASH = "a" * 64
WEIGHTS = {"general": 0.5, "math": 0.25, "code": 0.17, "news/en": 0.08, "unused": 0.0}
DOC_COUNTS = {"general": 40, "math": 30, "code": 30, "news/en": 20, "unused": 10, "tiny": 3}


@dataclass
class Corpus:
    root: Path
    docs: dict[str, dict[str, list[int]]]  # domain -> doc id -> tokens, without the EOS
    owner: dict[int, tuple[str, str]]  # token -> (domain, doc id)


def make_docs(seed: int = 0) -> dict[str, dict[str, list[int]]]:
    rng = np.random.default_rng(seed)
    docs, next_token = {}, 1
    for domain, count in DOC_COUNTS.items():
        docs[domain] = {}
        for i in range(count):
            n = int(rng.integers(2, 31))
            docs[domain][f"{domain}-{i}"] = list(range(next_token, next_token + n))
            next_token += n
    return docs


def write_shards(root: Path, docs: dict[str, dict[str, list[int]]], parts: int = 2, tokenizer_hash: str = HASH,
                 vocab_size: int = VOCAB, dtype: str = "uint16") -> Path:
    """Shards as the tokenize stage writes them: documents dealt round-robin to `parts`
    partitions, each document followed by EOS."""
    header = {"format": SHARD_FORMAT, "tokenizer_hash": tokenizer_hash, "vocab_size": vocab_size, "eos_id": EOS,
              "dtype": dtype}
    for domain, by_id in docs.items():
        items = list(by_id.items())
        for part in range(parts):
            chunk = items[part::parts]
            if not chunk:
                continue
            writer = ShardWriter(str(root), domain, part, 0, header)
            flat = [t for _, tokens in chunk for t in tokens + [EOS]]
            writer.add([i for i, _ in chunk], [len(t) + 1 for _, t in chunk], np.array(flat, dtype=dtype))
            writer.commit()
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    docs = make_docs()
    root = write_shards(tmp_path_factory.mktemp("shards"), docs)
    owner = {t: (domain, doc_id) for domain, by_id in docs.items() for doc_id, tokens in by_id.items()
             for t in tokens}
    return Corpus(root, docs, owner)


@pytest.fixture(scope="module")
def source(corpus) -> TokenSource:
    return TokenSource(str(corpus.root), val_fraction=0.1, val_min_docs=2)


def sampler(source, weights=WEIGHTS, seq_len=15, batch_size=8, seed=0, rank=0, world_size=1, doc_masking=False):
    cfg = DataConfig(seq_len=seq_len, batch_size=batch_size, seed=seed, doc_masking=doc_masking)
    return MixtureSampler(source, Mixture(dict(weights)), cfg, rank, world_size)


def windows(batch: Batch) -> list[list[int]]:
    """The seq_len + 1 tokens of each row: inputs plus the last label."""
    return torch.cat([batch.input_ids, batch.labels[:, -1:]], dim=1).tolist()


def assert_batches_equal(a: Batch, b: Batch) -> None:
    for name in Batch.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name


def train_docs(corpus, source, domain) -> list[tuple[int, ...]]:
    held = set(source.val_doc_ids(domain))
    return sorted(tuple(t) for i, t in corpus.docs[domain].items() if i not in held)


def split_docs(stream: list[int]) -> list[tuple[int, ...]]:
    """Documents of a token stream, each ending at an EOS (dropped)."""
    assert stream[-1] == EOS
    docs, current = [], []
    for t in stream:
        if t == EOS:
            docs.append(tuple(current))
            current = []
        else:
            current.append(t)
    return docs


# ---------------------------------------------------------------------------
# The mixture file


def test_mixture_file_round_trips_weights_and_provenance_exactly(tmp_path):
    mixture = Mixture({"general": 0.5, "math": 0.25, "code": 0.17, "multilingual": 0.08, "news/en": 0.0},
                      {"fit": "fit.json", "predicted_loss": 2.31, "interval": [2.25, 2.37], "tool": "kiln mix",
                       "date": datetime.date(2026, 11, 22), "law": {"name": "cmr", "tokens": 10**9}})
    path = tmp_path / "mix" / "mixture.toml"
    save_mixture(mixture, path)
    loaded = load_mixture(path)
    assert loaded == mixture and loaded.path == str(path)
    assert list(loaded.weights) == list(mixture.weights)  # file order kept
    assert loaded.active() == {"code": 0.17, "general": 0.5, "math": 0.25, "multilingual": 0.08}
    assert path.read_text().splitlines()[:7] == ["[mixture]", "general = 0.5", "math = 0.25", "code = 0.17",
                                                 "multilingual = 0.08", '"news/en" = 0.0', ""]
    assert [p.name for p in path.parent.iterdir()] == ["mixture.toml"]  # no temporary file left
    assert Mixture.from_dict({"mixture": {"a": 1}}) == Mixture({"a": 1.0}, {})


@pytest.mark.parametrize("text, reason", [
    ("[mixture]\na = 1.0\n[weights]\nb = 1\n", "unknown table 'weights' (known tables: mixture, provenance)"),
    ("[mixture]\na = 0.5\nb = \"half\"\n", "weight of domain 'b' is 'half', not a number"),
    ("[mixture]\na = true\n", "weight of domain 'a' is True, not a number"),
    ("[mixture]\na = 1.25\nb = -0.25\n", "weight of domain 'b' is negative (-0.25)"),
    ("[mixture]\na = 0.5\nb = 0.47\n", "mixture weights sum to 0.97, not 1 (tolerance 1e-06)"),
    ("[mixture]\na = 0.5\nb = 0.5000011\n", "mixture weights sum to 1.0000011, not 1 (tolerance 1e-06)"),
    ("[mixture]\na = nan\n", "weight of domain 'a' is nan, not a finite number"),
    ("[mixture]\n", "[mixture] is empty; give at least one domain = weight"),
    ("[provenance]\nfit = \"f.json\"\n", "no [mixture] table (domain = weight)"),
    ("mixture = 3\n", "[mixture] must be a table of domain = weight, got 3"),
    ("[mixture]\na = 1\n[provenance]\n", None),  # an empty provenance table is fine
    ("[mixture]\na = 0.5\nb = 0.4999995\nc = 0\n", None),  # within the tolerance; a zero weight is allowed
])
def test_mixture_file_errors_name_the_file_and_the_reason(tmp_path, text, reason):
    path = tmp_path / "mixture.toml"
    path.write_text(text)
    if reason is None:
        assert math.isclose(sum(load_mixture(path).weights.values()), 1, abs_tol=1e-6)
        return
    with pytest.raises(ConfigError) as e:
        load_mixture(path)
    assert str(e.value) == f"{path}: {reason}"


def test_missing_or_malformed_mixture_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: recipe file does not exist"):
        load_mixture(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[mixture\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: malformed TOML"):
        load_mixture(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match=r"out\.toml: mixture weights sum to 0\.5, not 1"):
        save_mixture(Mixture({"a": 0.5}), tmp_path / "out.toml")
    assert not (tmp_path / "out.toml").exists()


# ---------------------------------------------------------------------------
# Determinism, resume, ranks, batch sizes


def test_same_seed_gives_identical_batches_and_another_seed_does_not(source):
    a, b, c = sampler(source, seed=3), sampler(source, seed=3), sampler(source, seed=4)
    for _ in range(4):
        x, y, z = a.next_batch(), b.next_batch(), c.next_batch()
        assert_batches_equal(x.to("cpu"), y)
        assert x.input_ids.shape == x.labels.shape == (8, 15) and x.input_ids.dtype == torch.int64
        assert not torch.equal(x.input_ids, z.input_ids)
    assert a.state_dict() == b.state_dict() != c.state_dict()


@pytest.mark.parametrize("doc_masking", [False, True])
def test_resume_from_json_state_continues_the_uninterrupted_stream_exactly(source, doc_masking):
    straight = sampler(source, doc_masking=doc_masking)
    expected = [straight.next_batch() for _ in range(12)]

    first = sampler(source, doc_masking=doc_masking)
    for batch in expected[:7]:
        assert_batches_equal(first.next_batch(), batch)
    state = json.loads(json.dumps(first.state_dict()))
    assert state == first.state_dict()
    assert state["sequences"] == 56 and set(state["domains"]) == {"code", "general", "math", "news/en"}

    resumed = sampler(source, doc_masking=doc_masking)
    resumed.load_state_dict(state)
    for batch in expected[7:]:
        assert_batches_equal(resumed.next_batch(), batch)
    assert resumed.state_dict() == straight.state_dict()


def test_state_saved_on_one_rank_resumes_on_two(source):
    """The state is the same on every rank, so a run may come back on another world size."""
    one = sampler(source, batch_size=6)
    one.next_batch()
    state = json.loads(json.dumps(one.state_dict()))
    following = one.next_batch()
    ranks = [sampler(source, batch_size=3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    halves = [r.next_batch() for r in ranks]
    assert halves[0].sequence_index.tolist() == [6, 8, 10] and halves[1].sequence_index.tolist() == [7, 9, 11]
    interleaved = torch.stack([halves[0].input_ids, halves[1].input_ids], dim=1).reshape(6, -1)
    assert torch.equal(interleaved, following.input_ids)
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sampler_state_round_trips_through_torch_distributed_checkpoint(source, tmp_path):
    import torch.distributed.checkpoint as dcp

    straight = sampler(source)
    for _ in range(3):
        straight.next_batch()
    dcp.save({"sampler": straight}, checkpoint_id=str(tmp_path / "ckpt"))
    expected = straight.next_batch()
    resumed = sampler(source)
    dcp.load({"sampler": resumed}, checkpoint_id=str(tmp_path / "ckpt"))
    assert_batches_equal(resumed.next_batch(), expected)


def test_two_ranks_interleave_into_the_single_process_stream(source):
    single = sampler(source, batch_size=10)
    ranks = [sampler(source, batch_size=5, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert parts[0].sequence_index.tolist() == list(range(10 * step, 10 * step + 10, 2))
        for name in ("input_ids", "labels", "domain_index", "sequence_index"):
            merged = torch.stack([getattr(parts[0], name), getattr(parts[1], name)], dim=1).flatten(0, 1)
            assert torch.equal(merged, getattr(whole, name)), name
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_a_batch_size_ramp_does_not_change_the_stream(source):
    steady = sampler(source, batch_size=4)
    stream = torch.cat([steady.next_batch().input_ids for _ in range(6)])  # 24 sequences
    ramped = sampler(source, batch_size=4)
    cut = torch.cat([ramped.next_batch(k).input_ids for k in (1, 3, 8, 12)])
    assert torch.equal(cut, stream)


def test_domain_proportions_match_the_weights_and_a_zero_weight_domain_never_appears(corpus, source):
    s = sampler(source, seq_len=7)
    n = 4000
    batches = [s.next_batch(500) for _ in range(n // 500)]
    counts = np.bincount(torch.cat([b.domain_index for b in batches]).numpy(), minlength=len(s.domains))
    assert s.domains == ["code", "general", "math", "news/en"]
    for name, count in zip(s.domains, counts):
        p = WEIGHTS[name]
        assert abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (name, count)
    # Traced by token, not by the sampler's own label: every window is from the domain it claims.
    for batch in batches:
        for domain, window in zip(batch.domain_index.tolist(), windows(batch)):
            assert {corpus.owner[t][0] for t in window if t != EOS} <= {s.domains[domain]}
    assert counts.sum() == n


# ---------------------------------------------------------------------------
# Packing, epochs, validation split, document masking


def domain_streams(s: MixtureSampler, sequences: int) -> tuple[dict[str, list[int]], list[Batch]]:
    streams: dict[str, list[int]] = {name: [] for name in s.domains}
    batches = []
    for _ in range(sequences // 100):
        batch = s.next_batch(100)
        batches.append(batch)
        assert torch.equal(batch.labels[:, :-1], batch.input_ids[:, 1:])  # labels are inputs shifted by one
        for domain, window in zip(batch.domain_index.tolist(), windows(batch)):
            streams[s.domains[domain]].extend(window)
    return streams, batches


@pytest.mark.parametrize("weights, seq_len, sequences", [
    (WEIGHTS, 31, 3000),
    ({"tiny": 1.0}, 63, 200),  # a domain shorter than one window: windows straddle several epochs
])
def test_windows_tile_each_domains_stream_and_every_document_is_seen_once_per_epoch(corpus, source, weights, seq_len,
                                                                                     sequences):
    s = sampler(source, weights=weights, seq_len=seq_len)
    streams, _ = domain_streams(s, sequences)
    for name, stream in streams.items():
        expected = train_docs(corpus, source, name)
        per_epoch = sum(len(d) + 1 for d in expected)
        assert per_epoch == source.stats()[name]["tokens"]
        epochs = len(stream) // per_epoch
        assert epochs >= 2 and s.epochs()[name] == len(stream) / per_epoch
        orders = []
        for e in range(epochs):
            docs = split_docs(stream[e * per_epoch:(e + 1) * per_epoch])
            assert sorted(docs) == expected, (name, e)  # each training document once, whole
            orders.append(docs)
        assert len(set(map(tuple, orders))) > 1  # a new permutation each epoch (two documents: some repeat)
        # The partial epoch at the end: whole documents, each at most once, then a prefix of one.
        tail = stream[epochs * per_epoch:]
        complete = tail[:len(tail) - tail[::-1].index(EOS)] if EOS in tail else []
        head = split_docs(complete) if complete else []
        assert len(set(head)) == len(head) and set(head) <= set(expected)
    assert s.metrics()["data/sequences"] == sequences


def test_validation_documents_never_reach_training_and_batches_are_fixed(corpus, source):
    s = sampler(source, seq_len=31)
    streams, _ = domain_streams(s, 1000)
    held_tokens = {t for name in DOC_COUNTS for i in source.val_doc_ids(name) for t in corpus.docs[name][i]}
    assert held_tokens and not held_tokens & {t for stream in streams.values() for t in stream}

    # Enough held-out tokens for 25 windows of 8.
    source = TokenSource(str(corpus.root), val_fraction=0.1, val_min_tokens=200)
    val_stream = [t for i in source.val_doc_ids("general") for t in corpus.docs["general"][i] + [EOS]]
    assert len(val_stream) >= 200
    first = list(source.val_batches("general", seq_len=7, batch_size=3))
    again = list(source.val_batches("general", seq_len=7, batch_size=3))
    assert len(first) == len(again) == math.ceil((len(val_stream) // 8) / 3)
    for a, b in zip(first, again):
        assert_batches_equal(a, b)
    assert [t for b in first for w in windows(b) for t in w] == val_stream[:len(val_stream) // 8 * 8]
    assert {x for b in first for x in b.domain_index.tolist()} == {source.domains.index("general")}

    ranks = [list(source.val_batches("general", 7, 2, max_batches=2, rank=r, world_size=2)) for r in range(2)]
    assert [b.sequence_index.tolist() for b in ranks[0]] == [[0, 2], [4, 6]]
    assert [b.sequence_index.tolist() for b in ranks[1]] == [[1, 3], [5, 7]]
    assert windows(ranks[1][1])[0] == val_stream[5 * 8:6 * 8]


def unit_hash(doc_id: str) -> float:
    # The split rule as documented: blake2b-64 of the document id, as a fraction of 2**64.
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") / 2.0**64


def test_the_split_is_a_hash_of_the_document_id_with_a_minimum_and_a_cap(corpus, source, tmp_path):
    ids = list(corpus.docs["general"])
    by_hash = sorted(ids, key=unit_hash)
    below = {i for i in ids if unit_hash(i) < 0.25}
    assert 3 <= len(below) <= 15

    def held(**split) -> set[str]:
        return set(TokenSource(str(corpus.root), **split).val_doc_ids("general"))

    assert held(val_fraction=0.25, val_min_docs=1) == below
    assert held(val_fraction=1e-9, val_min_docs=3) == set(by_hash[:3])
    assert held(val_fraction=0.25, val_min_docs=1000) == set(by_hash[:20])  # capped at half the 40 documents
    lengths = {i: len(corpus.docs["general"][i]) + 1 for i in ids}
    need = 60
    k = next(k for k in range(1, 41) if sum(lengths[i] for i in by_hash[:k]) >= need)
    assert held(val_fraction=1e-9, val_min_docs=0, val_min_tokens=need) == set(by_hash[:k])
    assert held(val_fraction=0.0, val_min_docs=5) == set()
    # The same documents in one shard instead of two: the same split.
    other = write_shards(tmp_path / "one", {"general": corpus.docs["general"]}, parts=1)
    assert set(TokenSource(str(other), val_fraction=0.25).val_doc_ids("general")) == below
    # Three documents and a minimum of two: the cap holds out one, the lowest hash.
    tiny = corpus.docs["tiny"]
    held_id = min(tiny, key=unit_hash)
    kept_tokens = sum(len(t) + 1 for i, t in tiny.items() if i != held_id)
    assert source.stats()["tiny"] == {"documents": 2, "tokens": kept_tokens, "val_documents": 1,
                                      "val_tokens": len(tiny[held_id]) + 1}


def test_doc_masking_positions_restart_right_after_each_eos(source):
    s = sampler(source, seq_len=31, doc_masking=True)
    restarts = 0
    for _ in range(10):
        batch = s.next_batch(20)
        for ids, pos, seg in zip(batch.input_ids.tolist(), batch.position_ids.tolist(), batch.segment_ids.tolist()):
            expected_pos, expected_seg = [0], [0]
            for prev in ids[:-1]:
                after_eos = prev == EOS
                expected_pos.append(0 if after_eos else expected_pos[-1] + 1)
                expected_seg.append(expected_seg[-1] + after_eos)
                restarts += after_eos
            assert (pos, seg) == (expected_pos, expected_seg)
    assert restarts > 200
    plain = sampler(source, seq_len=31).next_batch()
    assert plain.position_ids is None and plain.segment_ids is None


def test_a_new_stage_starts_fresh_unless_asked_to_continue_the_domains(source):
    stage1 = sampler(source, weights={"math": 1.0}, seq_len=15)
    first_window = windows(stage1.next_batch(4))[0]
    for _ in range(2):
        stage1.next_batch(4)
    state = stage1.state_dict()
    next_window = windows(stage1.next_batch(1))[0]

    fresh = sampler(source, weights={"math": 1.0}, seq_len=7)
    assert windows(fresh.next_batch(1))[0] == first_window[:8]
    continued = sampler(source, weights={"math": 0.5, "code": 0.5}, seq_len=7, seed=9)
    continued.continue_domains(state)
    math_rows = [w for b in [continued.next_batch(4) for _ in range(4)]
                 for d, w in zip(b.domain_index.tolist(), windows(b)) if continued.domains[d] == "math"]
    assert math_rows[0] + math_rows[1] == next_window
    with pytest.raises(ConfigError, match="saved with seq_len 15, this sampler has 7"):
        fresh.load_state_dict(state)


# ---------------------------------------------------------------------------
# Bad input


def test_a_domain_missing_from_the_shards_names_the_mixture_file(corpus, tmp_path):
    mixture_file = tmp_path / "mixture.toml"
    save_mixture(Mixture({"general": 0.75, "legal": 0.25}), mixture_file)
    cfg = DataConfig(shards_dir=str(corpus.root), mixture=str(mixture_file), seq_len=15)
    with pytest.raises(ConfigError) as e:
        open_data(cfg)
    assert str(e.value) == (f"{mixture_file}: domain 'legal' is in the mixture but not in {corpus.root} "
                            "(domains: code, general, math, news/en, tiny, unused)")


def test_weights_not_summing_to_one_fail_at_open(corpus, tmp_path):
    mixture_file = tmp_path / "mixture.toml"
    mixture_file.write_text("[mixture]\ngeneral = 0.6\nmath = 0.3\n")
    with pytest.raises(ConfigError) as e:
        open_data(DataConfig(shards_dir=str(corpus.root), mixture=str(mixture_file)))
    assert str(e.value) == f"{mixture_file}: mixture weights sum to 0.8999999999999999, not 1 (tolerance 1e-06)"


def test_shards_of_two_tokenizers_name_the_odd_index(corpus, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(corpus.root, root)
    write_shards(root, {"zzz": {"z-0": [1, 2, 3]}}, parts=1, tokenizer_hash="b" * 64)
    with pytest.raises(ConfigError) as e:
        TokenSource(str(root))
    assert str(e.value) == (f"{root}/zzz/part-00000.json: tokenizer_hash {'b' * 64!r} differs from {HASH!r} in "
                            f"{root}/code/part-00000.json; a training run reads shards of one tokenizer only")


def test_a_vocabulary_larger_than_the_models_is_refused(corpus, tmp_path):
    mixture_file = tmp_path / "mixture.toml"
    save_mixture(Mixture({"general": 1.0}), mixture_file)
    cfg = DataConfig(shards_dir=str(corpus.root), mixture=str(mixture_file), seq_len=15)
    assert open_data(cfg, model_vocab_size=VOCAB).domains == ["general"]
    with pytest.raises(ConfigError) as e:
        open_data(cfg, model_vocab_size=4096)
    assert str(e.value) == (f"{corpus.root}/code/part-00000.json: shard from a tokenizer with {VOCAB} tokens; "
                            "the model has 4096")


def test_changed_shards_or_config_refuse_to_resume(corpus, tmp_path):
    s = sampler(TokenSource(str(corpus.root)))
    s.next_batch()
    state = s.state_dict()
    root = tmp_path / "shards"
    shutil.copytree(corpus.root, root)
    write_shards(root, {"math": {**corpus.docs["math"], "math-new": [7000, 7001]}})
    with pytest.raises(ConfigError, match=r"domain 'math' had \d+ training tokens, .* now has \d+; the shards"):
        sampler(TokenSource(str(root))).load_state_dict(state)
    with pytest.raises(ConfigError, match="saved with seed 0, this sampler has 1"):
        sampler(TokenSource(str(corpus.root)), seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="saved with weights"):
        sampler(TokenSource(str(corpus.root)), weights={"general": 1.0}).load_state_dict(state)


def test_unusable_shard_directories_and_configs(corpus, tmp_path):
    with pytest.raises(ConfigError, match="token shards directory not found"):
        TokenSource(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty: no token shards"):
        TokenSource(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"data.seq_len must be at least 1, got 0"):
        DataConfig(seq_len=0)
    with pytest.raises(ConfigError, match=r"data.val_fraction must be in \[0, 0.5\], got 0.6"):
        DataConfig(val_fraction=0.6)
    tiny = TokenSource(str(corpus.root), val_fraction=0.1, val_min_docs=1)
    with pytest.raises(ConfigError, match="domain 'tiny' holds \\d+ validation tokens, too few for one window of 1001"):
        next(tiny.val_batches("tiny", seq_len=1000, batch_size=1))


def test_stream_does_not_depend_on_shard_layout(tmp_path):
    """Spark decides which partition, and in which order, documents reach the shards;
    two runs of the same pipeline must still give the same training stream."""
    docs = make_docs()
    shuffled = {d: dict(reversed(list(by_id.items()))) for d, by_id in docs.items()}
    a = write_shards(tmp_path / "a", docs, parts=2)
    b = write_shards(tmp_path / "b", shuffled, parts=3)
    mixture = Mixture.from_dict({"mixture": {"general": 0.5, "math": 0.5}})
    cfg = DataConfig(seq_len=16, batch_size=4, seed=1, val_fraction=0.1)
    sa = MixtureSampler(TokenSource(str(a), val_fraction=0.1), mixture, cfg)
    sb = MixtureSampler(TokenSource(str(b), val_fraction=0.1), mixture, cfg)
    for _ in range(20):
        x, y = sa.next_batch(), sb.next_batch()
        assert x.input_ids.tolist() == y.input_ids.tolist()


# ---------------------------------------------------------------------------
# Blends (annealing probes) and extra shard directories


def blended(source, blend, ratio=0.3, seed=0, rank=0, world_size=1, weights=WEIGHTS):
    cfg = DataConfig(seq_len=15, batch_size=8, seed=seed)
    return MixtureSampler(source, Mixture(dict(weights)), cfg, rank, world_size, Mixture(dict(blend)), ratio)


def test_a_blend_leaves_the_default_mix_stream_a_prefix_of_the_unblended_one(corpus, source):
    """The probe's pairing: with the same seed, the candidate arm's default-mix sequences
    are, in order, the control arm's sequences, even when the blend draws from a domain
    the default mix also has (math): it reads that domain from a position of its own."""
    control, arm = sampler(source), blended(source, {"math": 1.0})
    n_main = len(arm.domains)
    main_rows, blend_rows = [], []
    for _ in range(30):
        b = arm.next_batch()
        for row, d in zip(windows(b), b.domain_index.tolist()):
            (main_rows if d < n_main else blend_rows).append((row, d))
    reference = []
    for _ in range(30):
        b = control.next_batch()
        reference.extend(zip(windows(b), b.domain_index.tolist()))
    assert main_rows == reference[:len(main_rows)]
    assert 0.2 < len(blend_rows) / 240 < 0.4  # 72 of 240 expected at ratio 0.3
    assert {arm.blend_domains[d - n_main] for _, d in blend_rows} == {"math"}
    held = set(source.val_doc_ids("math"))
    owners = [corpus.owner[t] for row, _ in blend_rows for t in row if t != EOS]
    assert {domain for domain, _ in owners} == {"math"} and not held & {doc for _, doc in owners}
    # Another permutation of the same documents than the default mix's math windows.
    first_main_math = next(row for row, d in main_rows if arm.domains[d] == "math")
    assert blend_rows[0][0] != first_main_math
    assert arm.metrics()["data/epochs/blend/math"] > 0


def test_a_blended_sampler_resumes_exactly_and_refuses_another_blend(source):
    a = blended(source, {"math": 0.5, "code": 0.5})
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = blended(source, {"math": 0.5, "code": 0.5})
    b.load_state_dict(state)
    for _ in range(5):
        assert_batches_equal(a.next_batch(), b.next_batch())
    with pytest.raises(ConfigError, match=r"saved with blend .* this sampler has"):
        blended(source, {"math": 1.0}).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"saved with blend None"):
        blended(source, {"math": 1.0}).load_state_dict(sampler(source).state_dict())
    with pytest.raises(ConfigError, match=r"blend_ratio must be in \(0, 1\), got 1.0"):
        blended(source, {"math": 1.0}, ratio=1.0)


def test_two_ranks_of_a_blend_interleave_into_the_single_process_stream(source):
    single = blended(source, {"code": 1.0})
    ranks = [blended(source, {"code": 1.0}, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        whole = windows(single.next_batch(8))
        parts = [windows(s.next_batch(4)) for s in ranks]
        assert whole == [row for pair in zip(*parts) for row in pair]


def test_extra_shards_are_one_domain_named_by_their_key(corpus, tmp_path):
    extra = write_shards(tmp_path / "extra", {"x": {"x-0": [8000, 8001, 8002]}, "y": {"y-0": [8003, 8004]}})
    source = TokenSource(str(corpus.root), val_fraction=0.0, extra={"candidate:new": str(extra)})
    assert source.domain("candidate:new").train.tokens == 7  # both documents, EOS included
    with pytest.raises(ConfigError, match=r"extra shards named 'math', a domain .* already has"):
        TokenSource(str(corpus.root), val_fraction=0.0, extra={"math": str(extra)})
    other = write_shards(tmp_path / "other", {"x": {"x-0": [1, 2]}}, tokenizer_hash="b" * 64)
    with pytest.raises(ConfigError, match=r"tokenizer_hash 'b{64}' differs"):
        TokenSource(str(corpus.root), val_fraction=0.0, extra={"new": str(other)})
