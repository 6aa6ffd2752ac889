"""The trainer's data layer: token shards in, a deterministic, resumable stream of
training sequences out.

`TokenSource` opens a contract-3 shards directory (`<domain>/part-NNNNN.bin` + `.json`
index, kiln.formats.shards), checks that every shard comes from one
tokenizer, and splits each domain's documents into training and held-out validation
documents by a hash of the document id.

`MixtureSampler` turns it into sequences. The design, in the order a reader needs it:

- Packing. A domain's training documents, each already ending in EOS, are laid end to
  end in a seeded permuted order: that is one epoch of the domain's stream. Epoch e+1
  follows epoch e with a new permutation, so the stream is infinite and no token is
  dropped at an epoch's end (a window may straddle two epochs). The stream is cut
  into consecutive, non-overlapping windows of seq_len + 1 tokens; a window's first
  seq_len tokens are `input_ids`, its last seq_len are `labels` (torchtitan packs the
  same way; the price is that a window's first token is never a target).
- The global stream. Sequence g of the run comes from the domain drawn for it by one
  numpy PCG64 generator seeded with `seed` (one uniform per sequence against the
  mixture's cumulative weights, domains in sorted order), and is that domain's next
  window. So the whole stream is a pure function of (seed, mixture, shards), whatever
  the batch size or number of ranks.
- Ranks and batches. A batch of k sequences per rank on `world_size` ranks consumes
  the next k * world_size sequences of the global stream; rank r takes sequences
  start + r, start + r + w, start + r + 2w, ... of that block, so the ranks' batches
  interleave into exactly the single-process stream. Every rank draws the whole block
  (the domain draws and per-domain cursors are cheap; only its own windows are read),
  so the sampler state is identical on every rank, a checkpoint needs one copy, and a
  run may resume on a different number of ranks. A batch size change (a batch ramp)
  only changes where batches are cut, never the stream: `next_batch(k)`.
- State. `state_dict()` is plain JSON-able data: the generator's state, the sequence
  counter and per domain its permutation seed, epoch and cursor. A sampler that loads
  it continues the same stream exactly. It also implements torch.distributed.checkpoint's
  Stateful protocol (state_dict / load_state_dict), so it can sit in a DCP state dict.
- Stages. A new stage (new mixture, new seq_len) builds a new sampler, which starts from
  its own seed at epoch 0 of every domain; the previous stage's cursor is not resumed
  unless asked with `continue_domains(previous_state)`, which carries the per-domain
  positions over so the new stage reads each domain's unseen data first.
- Document masking. With `doc_masking`, batches also carry `position_ids` that restart
  at 0 at every document start inside a window (the token after each EOS) and
  `segment_ids` numbering the documents within the window, from which the model builds
  a block-diagonal causal mask (Llama 3 masks attention between packed documents).
  Boundaries come from the index's document offsets, not from scanning for the EOS id,
  so an EOS-looking token inside a document does not split it.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from kiln.config import ConfigError
from kiln.formats.hashing import content_sha256
from kiln.formats.mixture import Mixture, load_mixture
from kiln.formats.shards import domain_dirname, load_shard, shard_indexes

SAMPLER_FORMAT = "kiln-sampler-v1"
TOKENIZER_FILE = "tokenizer.json"  # the file whose sha256 the shards record (kiln.curation.tokenizer writes it)
# A domain's held-out share is capped at half its documents: a minimum that would take
# more is a configuration mistake on a tiny domain, and training must keep documents.
MAX_VAL_SHARE = 0.5


@dataclass
class DataConfig:
    shards_dir: str = ""  # contract-3 token shards directory (what `kiln curate tokenize` wrote)
    mixture: str = ""  # contract-4 mixture file (TOML, domain = weight)
    seq_len: int = 2048  # tokens per training sequence; windows of seq_len + 1 tokens give the labels
    batch_size: int = 8  # sequences per rank per step (next_batch(k) takes another k: a batch ramp)
    seed: int = 0  # the sequence stream is a pure function of (seed, mixture, shards)
    val_fraction: float = 0.01  # share of each domain's documents held out for validation, by doc-id hash; 0 = none
    val_min_docs: int = 1  # held-out documents per domain at least (capped at half the domain's documents)
    val_min_tokens: int = 0  # held-out tokens per domain at least (same cap)
    doc_masking: bool = False  # also return position_ids / segment_ids so attention stays within each document

    def __post_init__(self):
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be at least 1, got {self.seq_len}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {self.batch_size}")
        if self.seed < 0:
            raise ConfigError(f"data.seed must be non-negative (it seeds numpy's SeedSequence), got {self.seed}")
        _check_split(self.val_fraction, self.val_min_docs, self.val_min_tokens, "data")


def _check_split(val_fraction: float, val_min_docs: int, val_min_tokens: int, where: str) -> None:
    if not 0 <= val_fraction <= MAX_VAL_SHARE:
        raise ConfigError(f"{where}.val_fraction must be in [0, {MAX_VAL_SHARE}], got {val_fraction}")
    if val_min_docs < 0 or val_min_tokens < 0:
        raise ConfigError(f"{where}.val_min_docs and val_min_tokens must be non-negative, "
                          f"got {val_min_docs} and {val_min_tokens}")


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64: input_ids shifted left by one (the window's tokens 1..T)
    domain_index: torch.Tensor  # (B,) int64: index into the producer's `domains` list
    sequence_index: torch.Tensor  # (B,) int64: position in the global stream (validation: window number)
    position_ids: torch.Tensor | None = None  # (B, T) int64, restarting at 0 at each document start; doc_masking only
    segment_ids: torch.Tensor | None = None  # (B, T) int64, document number within the window; doc_masking only

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = {}
        for name in self.__dataclass_fields__:
            tensor = getattr(self, name)
            moved[name] = None if tensor is None else tensor.to(device, non_blocking=non_blocking)
        return Batch(**moved)

    @property
    def num_tokens(self) -> int:
        return self.labels.numel()


# ---------------------------------------------------------------------------
# Documents and token windows


@dataclass
class _Docs:
    """Documents in a fixed order as parallel arrays; their stream is the documents'
    tokens (EOS included) end to end."""
    shard: np.ndarray  # (N,) int32: which memmap of the domain
    start: np.ndarray  # (N,) int64: first token in that shard
    length: np.ndarray  # (N,) int64: tokens including the closing EOS (always >= 1)

    def __post_init__(self):
        self.ends = np.cumsum(self.length)  # (N,) stream offset just past each document

    @property
    def tokens(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def take(self, order: np.ndarray) -> "_Docs":
        return _Docs(self.shard[order], self.start[order], self.length[order])

    def read(self, shards: list[np.memmap], offset: int, n: int, out: np.ndarray, doc_starts: list[int],
             filled: int = 0) -> int:
        """Copy up to n tokens of the stream from `offset` into out[filled:]; record in
        `doc_starts` each position of `out` where a document begins. Returns the new fill."""
        i = int(np.searchsorted(self.ends, offset, side="right"))
        stop = filled + n
        while filled < stop and i < len(self.ends):
            in_doc = offset - int(self.ends[i] - self.length[i])
            if in_doc == 0:
                doc_starts.append(filled)
            m = min(int(self.length[i]) - in_doc, stop - filled)
            begin = int(self.start[i]) + in_doc
            out[filled:filled + m] = shards[self.shard[i]][begin:begin + m]
            filled += m
            offset += m
            i += 1
        return filled


class _Domain:
    """One domain's shards, split into training and validation documents."""

    def __init__(self, name: str, shards: list[np.memmap], train: _Docs, val: _Docs, val_ids: list[str],
                 index_files: list[str]):
        self.name = name
        self.shards = shards
        self.train = train
        self.val = val
        self.val_ids = val_ids
        self.index_files = index_files
        # Mixed into each epoch's permutation seed so domains with equal document
        # counts are not shuffled identically; a stable hash, unlike Python's hash().
        self.key = int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")
        self._epochs: dict[tuple[int, int], _Docs] = {}

    def epoch_docs(self, seed: int, epoch: int) -> _Docs:
        """The training documents in epoch `epoch`'s order: a permutation that depends
        only on (seed, domain, epoch), so a state needs no permutation, only its seed."""
        key = (seed, epoch)
        if key not in self._epochs:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, self.key, epoch])))
            if len(self._epochs) >= 2:  # the current epoch and the next, while a window straddles them
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[key] = self.train.take(rng.permutation(len(self.train.length)))
        return self._epochs[key]

    def train_window(self, seed: int, position: int, n: int) -> tuple[np.ndarray, list[int]]:
        """n tokens from `position` of the infinite training stream (epochs end to end)."""
        out = np.empty(n, dtype=np.int64)
        doc_starts: list[int] = []
        filled = 0
        per_epoch = self.train.tokens
        while filled < n:
            epoch, offset = divmod(position + filled, per_epoch)
            filled = self.epoch_docs(seed, epoch).read(self.shards, offset, n - filled, out, doc_starts, filled)
        return out, doc_starts


def _unit_hash(doc_id: str) -> float:
    # The document id alone, not the domain: a document a later classifier moves to
    # another domain stays on the same side of the split.
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _split(ids: list[str], lengths: np.ndarray, val_fraction: float, min_docs: int, min_tokens: int) -> np.ndarray:
    """Boolean mask of held-out documents. A document is held out when the hash of its
    id falls below val_fraction; where that leaves fewer than min_docs documents or
    min_tokens tokens, the next-lowest hashes are added until both hold, never past
    half the domain's documents. Hash order, not file order, so the split does not
    depend on how shards were partitioned."""
    held = np.zeros(len(ids), dtype=bool)
    if val_fraction == 0 or not ids:
        return held
    hashes = np.array([_unit_hash(i) for i in ids])
    order = np.argsort(hashes, kind="stable")
    k = int((hashes < val_fraction).sum())
    k = max(k, min_docs)
    if min_tokens > 0:
        k = max(k, int(np.searchsorted(np.cumsum(lengths[order]), min_tokens, side="left")) + 1)
    held[order[:min(k, int(len(ids) * MAX_VAL_SHARE))]] = True
    return held


def _segments(doc_starts: list[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """position_ids and segment_ids of a window's input positions from the positions
    where documents begin (position 0 always starts a segment: the window may begin
    inside a document, whose earlier tokens are in another window)."""
    marks = np.zeros(seq_len, dtype=np.int64)
    inside = [s for s in doc_starts if 0 < s < seq_len]
    marks[inside] = 1
    segment_ids = np.cumsum(marks)  # (T,)
    steps = np.arange(seq_len, dtype=np.int64)
    segment_start = np.maximum.accumulate(np.where(marks == 1, steps, 0))  # (T,)
    return steps - segment_start, segment_ids


def _batch(windows: list[np.ndarray], starts: list[list[int]], domain_index: list[int],
           sequence_index: list[int], doc_masking: bool) -> Batch:
    tokens = torch.from_numpy(np.stack(windows))  # (B, T + 1)
    batch = Batch(input_ids=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                  domain_index=torch.tensor(domain_index, dtype=torch.int64),
                  sequence_index=torch.tensor(sequence_index, dtype=torch.int64))
    if doc_masking:
        seq_len = tokens.shape[1] - 1
        pairs = [_segments(s, seq_len) for s in starts]
        batch.position_ids = torch.from_numpy(np.stack([p for p, _ in pairs]))  # (B, T)
        batch.segment_ids = torch.from_numpy(np.stack([s for _, s in pairs]))  # (B, T)
    return batch


# ---------------------------------------------------------------------------
# The shards


class TokenSource:
    """A contract-3 shards directory, opened for training: every shard memory-mapped,
    checked against its index, and from one tokenizer; each domain's documents split
    into training and held-out validation documents (see `_split`)."""

    def __init__(self, shards_dir: str, val_fraction: float = 0.01, val_min_docs: int = 1, val_min_tokens: int = 0,
                 extra: dict[str, str] | None = None):
        """`extra`: more shards directories, each read as one domain named by its key
        (all its documents, whatever domains its indexes name): a candidate dataset
        beside the corpus, as an annealing probe mixes one in."""
        _check_split(val_fraction, val_min_docs, val_min_tokens, "TokenSource")
        self.shards_dir = str(shards_dir)
        self.val_fraction, self.val_min_docs, self.val_min_tokens = val_fraction, val_min_docs, val_min_tokens
        grouped: dict[str, list[tuple[str, np.memmap, dict]]] = {}
        first: tuple[str, dict] | None = None
        for directory, as_domain in [(self.shards_dir, None), *((str(d), name) for name, d in (extra or {}).items())]:
            if as_domain is not None and as_domain in grouped:
                raise ConfigError(f"{directory}: extra shards named {as_domain!r}, a domain {self.shards_dir} "
                                  "already has; give it another name")
            for path, tokens, index in _open_shards(directory):
                if first is None:
                    first = (path, index)
                self._check_same_tokenizer(path, index, *first)
                grouped.setdefault(as_domain or index["domain"], []).append((path, tokens, index))
        assert first is not None
        self.tokenizer_hash: str = first[1]["tokenizer_hash"]
        self.dtype: str = first[1]["dtype"]
        self.eos_id: int = first[1]["eos_id"]
        self.vocab_size: int = first[1]["vocab_size"]
        self._domains = {name: self._open_domain(name, shards) for name, shards in sorted(grouped.items())}

    @staticmethod
    def _check_same_tokenizer(path: str, index: dict, first_path: str, first: dict) -> None:
        for key in ("tokenizer_hash", "dtype", "eos_id", "vocab_size"):
            if index.get(key) != first.get(key):
                raise ConfigError(f"{path}: {key} {index.get(key)!r} differs from {first.get(key)!r} in {first_path}; "
                                  "a training run reads shards of one tokenizer only")

    def _open_domain(self, name: str, shards: list[tuple[str, np.memmap, dict]]) -> _Domain:
        shard_of, starts, lengths, ids = [], [], [], []
        for s, (_, _, index) in enumerate(shards):
            offsets = np.asarray(index["doc_offsets"], dtype=np.int64)
            shard_of.append(np.full(len(offsets) - 1, s, dtype=np.int32))
            starts.append(offsets[:-1])
            lengths.append(np.diff(offsets))
            ids.extend(index["doc_ids"])
        docs = _Docs(np.concatenate(shard_of), np.concatenate(starts), np.concatenate(lengths))
        # Documents in id order: the order rows reach the shards follows Spark's shuffles
        # and partitioning, which differ between two runs of the same pipeline; the
        # training stream must not.
        order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
        docs, ids = docs.take(order), [ids[i] for i in order]
        held = _split(ids, docs.length, self.val_fraction, self.val_min_docs, self.val_min_tokens)
        return _Domain(name, [tokens for _, tokens, _ in shards], docs.take(np.flatnonzero(~held)),
                       docs.take(np.flatnonzero(held)), [i for i, h in zip(ids, held) if h],
                       [path for path, _, _ in shards])

    @property
    def domains(self) -> list[str]:
        """Domain names, sorted (validation batches' domain_index points into this)."""
        return list(self._domains)

    def domain(self, name: str) -> _Domain:
        if name not in self._domains:
            raise ConfigError(f"{self.shards_dir}: no domain {name!r} (domains: {', '.join(self._domains)})")
        return self._domains[name]

    def stats(self) -> dict[str, dict[str, int]]:
        """Documents and tokens per domain, training and held out."""
        return {name: {"documents": len(d.train.length), "tokens": d.train.tokens,
                       "val_documents": len(d.val.length), "val_tokens": d.val.tokens}
                for name, d in self._domains.items()}

    def val_doc_ids(self, domain: str) -> list[str]:
        return list(self.domain(domain).val_ids)

    def check_vocab(self, model_vocab_size: int) -> None:
        """Token ids must index the model's embedding: a shard from a larger tokenizer
        would index past it (on GPU a device-side assert, long after start)."""
        if self.vocab_size > model_vocab_size:
            path = next(iter(self._domains.values())).index_files[0]
            raise ConfigError(f"{path}: shard from a tokenizer with {self.vocab_size} tokens; "
                              f"the model has {model_vocab_size}")

    def check_tokenizer(self, tokenizer_file: str, where: str) -> None:
        """`tokenizer_file` must be the tokenizer.json the shards were written with (its
        sha256 is in every index): with another, bits per byte decode the shards' ids
        into other text, and the exported model ships a tokenizer it was not trained on."""
        digest = content_sha256(tokenizer_file)
        if digest != self.tokenizer_hash:
            index = next(iter(self._domains.values())).index_files[0]
            raise ConfigError(f"{where}: [run] tokenizer {tokenizer_file} has sha256 {digest}, but the shards were "
                              f"tokenized with {self.tokenizer_hash} ({index} tokenizer_hash): bits per byte and the "
                              "exported model need the shards' tokenizer")

    def check_mixture(self, mixture: Mixture) -> None:
        for name in mixture.active():
            if name not in self._domains:
                raise ConfigError(f"{mixture.describe()}: domain {name!r} is in the mixture but not in "
                                  f"{self.shards_dir} (domains: {', '.join(self._domains)})")
            if self._domains[name].train.tokens == 0:
                raise ConfigError(f"{mixture.describe()}: domain {name!r} has no training documents in "
                                  f"{self.shards_dir}")

    def val_batches(self, domain: str, seq_len: int, batch_size: int, max_batches: int = 0, rank: int = 0,
                    world_size: int = 1, doc_masking: bool = False) -> Iterator[Batch]:
        """Fixed validation batches of one domain, identical on every call: the held-out
        documents in shard order, cut into windows of seq_len + 1 (a partial last window
        is dropped). Windows are dealt round-robin to ranks, and every rank gets the same
        number, so FSDP's collectives stay in step; at most `max_batches` batches per rank
        (0 = all). The last batch may hold fewer than batch_size sequences."""
        d = self.domain(domain)
        windows = d.val.tokens // (seq_len + 1)
        per_rank = windows // world_size
        if max_batches:
            per_rank = min(per_rank, max_batches * batch_size)
        if per_rank == 0:
            raise ConfigError(f"{self.shards_dir}: domain {domain!r} holds {d.val.tokens} validation tokens, "
                              f"too few for one window of {seq_len + 1} per rank on {world_size} rank(s); "
                              "raise val_fraction or val_min_tokens")
        index = self.domains.index(domain)
        for first in range(0, per_rank, batch_size):
            numbers = [rank + i * world_size for i in range(first, min(first + batch_size, per_rank))]
            rows, starts = [], []
            for w in numbers:
                out = np.empty(seq_len + 1, dtype=np.int64)
                doc_starts: list[int] = []
                d.val.read(d.shards, w * (seq_len + 1), seq_len + 1, out, doc_starts)
                rows.append(out)
                starts.append(doc_starts)
            yield _batch(rows, starts, [index] * len(rows), numbers, doc_masking)


def _open_shards(shards_dir: str) -> Iterator[tuple[str, np.memmap, dict]]:
    """Every shard of a contract-3 directory: its index path, memory-mapped tokens and
    index, each checked to sit in its domain's directory and to describe its documents."""
    if not Path(shards_dir).is_dir():
        raise ConfigError(f"{shards_dir}: token shards directory not found")
    index_files = shard_indexes(shards_dir)
    if not index_files:
        raise ConfigError(f"{shards_dir}: no token shards (<domain>/part-NNNNN.json, written by kiln curate tokenize)")
    for path in index_files:
        tokens, index = load_shard(path)
        if domain_dirname(index["domain"]) != os.path.basename(os.path.dirname(path)):
            raise ConfigError(f"{path}: index says domain {index['domain']!r}, but it sits in directory "
                              f"{os.path.basename(os.path.dirname(path))!r}")
        _check_offsets(path, index)
        yield path, tokens, index


def _check_offsets(path: str, index: dict) -> None:
    offsets = np.asarray(index["doc_offsets"], dtype=np.int64)
    if (len(offsets) != index["num_docs"] + 1 or len(index["doc_ids"]) != index["num_docs"]
            or offsets[0] != 0 or offsets[-1] != index["num_tokens"] or (np.diff(offsets) < 1).any()):
        raise ConfigError(f"{path}: document offsets do not describe {index['num_docs']} non-empty documents "
                          f"of {index['num_tokens']} tokens")


# ---------------------------------------------------------------------------
# The sampler


class _Group:
    """The domains one mixture draws from: weights, the cumulative weights a uniform
    picks a domain with, the generator of those uniforms, and per domain the position in
    its infinite stream and the seed of its epoch permutations."""

    def __init__(self, source: TokenSource, mixture: Mixture, rng_seed, perm_seed: int):
        self.weights = mixture.active()
        self.shards_dir = source.shards_dir
        self.names = list(self.weights)
        self.domains = [source.domain(name) for name in self.names]
        cdf = np.cumsum([w / math.fsum(self.weights.values()) for w in self.weights.values()])
        # Exactly 1 at the end, so a uniform in [0, 1) always lands on a domain despite rounding.
        cdf[-1] = 1.0
        self.cdf = cdf
        self.rng = np.random.Generator(np.random.PCG64(rng_seed))
        self.positions = [0] * len(self.names)  # tokens consumed of each domain's infinite stream
        self.perm_seeds = [perm_seed] * len(self.names)  # seeds of each domain's epoch permutations

    def draw(self, n: int) -> list[int]:
        """The domains (indices into names) of the next n sequences."""
        return np.searchsorted(self.cdf, self.rng.random(n), side="right").tolist()

    def epochs(self) -> dict[str, float]:
        return {name: position / d.train.tokens for name, position, d in zip(self.names, self.positions, self.domains)}

    def state(self) -> dict:
        domains = {}
        for i, (name, d) in enumerate(zip(self.names, self.domains)):
            epoch, cursor = divmod(self.positions[i], d.train.tokens)
            domains[name] = {"seed": self.perm_seeds[i], "epoch": epoch, "cursor": cursor,
                             "tokens_per_epoch": d.train.tokens}
        return {"rng": _rng_state(self.rng), "domains": domains}

    def check_domains(self, saved: dict, where: str, exact: bool = True) -> None:
        if exact and sorted(saved) != self.names:
            raise ConfigError(f"{where}: domains {sorted(saved)} differ from this sampler's {self.names}")
        for name, entry in saved.items():
            tokens = self.domains[self.names.index(name)].train.tokens
            if entry["tokens_per_epoch"] != tokens:
                raise ConfigError(f"{where}: domain {name!r} had {entry['tokens_per_epoch']} training tokens, "
                                  f"{self.shards_dir} now has {tokens}; the shards or the validation split changed")

    def adopt_domains(self, saved: dict) -> None:
        for name, entry in saved.items():
            i = self.names.index(name)
            self.perm_seeds[i] = entry["seed"]
            self.positions[i] = entry["epoch"] * entry["tokens_per_epoch"] + entry["cursor"]


def _rng_state(rng: np.random.Generator) -> dict:
    """A PCG64 generator's state as JSON data; its 128-bit integers as strings (JSON
    readers outside Python, and checkpoint tools, round 64-bit-plus integers)."""
    state = rng.bit_generator.state
    return {"state": str(state["state"]["state"]), "inc": str(state["state"]["inc"]),
            "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}


def _set_rng_state(rng: np.random.Generator, saved: dict) -> None:
    rng.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": int(saved["state"]), "inc": int(saved["inc"])},
                               "has_uint32": saved["has_uint32"], "uinteger": saved["uinteger"]}


# Keys mixed into the seed of a blend's generators and permutations, so they are
# independent of the main mixture's (which keep their pre-blend values).
BLEND_KEY, BLEND_CHOICE_KEY = 0xB1E4D, 0xC401CE
BLEND_PERM_OFFSET = 2**40


class MixtureSampler:
    """Training sequences drawn from the domains of `mixture` (see the module
    docstring). `cfg` gives seq_len, batch_size, seed and doc_masking; the source and
    mixture are passed in already opened (open_data opens them from cfg).

    With a `blend` mixture, each sequence comes from the blend with probability
    `blend_ratio`, decided by a generator of its own; the blend's domains have their own
    draws and stream positions (also for a domain `mixture` has too). So the sequences
    from `mixture` are, in order, exactly the stream `mixture` alone gives with the same
    seed: an annealing probe's candidate arm sees a prefix of its control arm's data.
    `domain_index` points into `domains + blend_domains`."""

    def __init__(self, source: TokenSource, mixture: Mixture, cfg: DataConfig, rank: int = 0, world_size: int = 1,
                 blend: Mixture | None = None, blend_ratio: float = 0.0):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        source.check_mixture(mixture)
        self.source, self.cfg, self.rank, self.world_size = source, cfg, rank, world_size
        self._main = _Group(source, mixture, cfg.seed, cfg.seed)
        self.weights, self.domains = self._main.weights, self._main.names
        self._blend: _Group | None = None
        self.blend_ratio = 0.0
        if blend is not None:
            if not 0 < blend_ratio < 1:
                raise ConfigError(f"blend_ratio must be in (0, 1), got {blend_ratio}")
            source.check_mixture(blend)
            self._blend = _Group(source, blend, np.random.SeedSequence([cfg.seed, BLEND_KEY]),
                                 BLEND_PERM_OFFSET + cfg.seed)
            self._choice = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, BLEND_CHOICE_KEY])))
            self.blend_ratio = blend_ratio
        self.blend_domains = self._blend.names if self._blend else []
        self._sequences = 0  # global sequences drawn so far, by all ranks together

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def next_batch(self, batch_size: int | None = None) -> Batch:
        """This rank's next `batch_size` sequences (cfg.batch_size if not given)."""
        k = batch_size or self.cfg.batch_size
        window = self.cfg.seq_len + 1
        block = k * self.world_size
        if self._blend is None:
            picks = [(self._main, d) for d in self._main.draw(block)]
        else:
            from_blend = (self._choice.random(block) < self.blend_ratio).tolist()
            main, blended = iter(self._main.draw(block - sum(from_blend))), iter(self._blend.draw(sum(from_blend)))
            picks = [(self._blend, next(blended)) if b else (self._main, next(main)) for b in from_blend]
        rows, starts, domain_index, sequence_index = [], [], [], []
        for j, (group, d) in enumerate(picks):
            position = group.positions[d]
            group.positions[d] += window
            if j % self.world_size == self.rank:
                tokens, doc_starts = group.domains[d].train_window(group.perm_seeds[d], position, window)
                rows.append(tokens)
                starts.append(doc_starts)
                domain_index.append(d if group is self._main else len(self.domains) + d)
                sequence_index.append(self._sequences + j)
        self._sequences += block
        return _batch(rows, starts, domain_index, sequence_index, self.cfg.doc_masking)

    def epochs(self) -> dict[str, float]:
        """Epochs of each domain's training tokens consumed so far (1.5 = seen 1.5 times):
        how much the mixture repeats a domain. A blend's domains are `blend/<name>`."""
        out = self._main.epochs()
        if self._blend:
            out.update({f"blend/{name}": value for name, value in self._blend.epochs().items()})
        return out

    def metrics(self) -> dict[str, float]:
        return {"data/sequences": self._sequences,
                **{f"data/epochs/{name}": value for name, value in self.epochs().items()}}

    # -- state ---------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain JSON-able data; identical on every rank (see the module docstring)."""
        main = self._main.state()
        state = {"format": SAMPLER_FORMAT, "seed": self.cfg.seed, "seq_len": self.cfg.seq_len,
                 "weights": dict(self.weights), "sequences": self._sequences, "rng": main["rng"],
                 "domains": main["domains"]}
        if self._blend:
            state["blend"] = {"ratio": self.blend_ratio, "weights": dict(self._blend.weights),
                              "choice_rng": _rng_state(self._choice), **self._blend.state()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream `state` was taken from. The seed, seq_len, mixture, blend
        and shards must be the ones it was saved with (a new stage is a new sampler; see
        continue_domains); the number of ranks may differ."""
        where = "sampler state"
        if not isinstance(state, dict) or state.get("format") != SAMPLER_FORMAT:
            raise ConfigError(f"{where}: not a {SAMPLER_FORMAT} state")
        blend = state.get("blend")
        mine_blend = {"ratio": self.blend_ratio, "weights": dict(self._blend.weights)} if self._blend else None
        saved_blend = {"ratio": blend["ratio"], "weights": blend["weights"]} if blend else None
        for key, saved, mine in (("seed", state.get("seed"), self.cfg.seed), ("seq_len", state.get("seq_len"),
                                 self.cfg.seq_len), ("weights", state.get("weights"), self.weights),
                                 ("blend", saved_blend, mine_blend)):
            if saved != mine:
                raise ConfigError(f"{where}: saved with {key} {saved!r}, this sampler has {mine!r}; a changed "
                                  "seq_len or mixture is a new stage: build a new sampler (continue_domains carries "
                                  "the data positions over)")
        self._main.check_domains(state["domains"], where)
        if blend:
            self._blend.check_domains(blend["domains"], f"{where} (blend)")
        _set_rng_state(self._main.rng, state["rng"])
        self._sequences = state["sequences"]
        self._main.adopt_domains(state["domains"])
        if blend:
            _set_rng_state(self._blend.rng, blend["rng"])
            _set_rng_state(self._choice, blend["choice_rng"])
            self._blend.adopt_domains(blend["domains"])

    def continue_domains(self, previous_state: dict) -> None:
        """Start each domain where an earlier stage's sampler left it (same permutation
        seeds, epochs and cursors) instead of at epoch 0, for the domains both stages
        draw from. The domain draws and the sequence counter stay this sampler's own.
        Call it before the first batch."""
        where = "previous stage's sampler state"
        if not isinstance(previous_state, dict) or previous_state.get("format") != SAMPLER_FORMAT:
            raise ConfigError(f"{where}: not a {SAMPLER_FORMAT} state")
        shared = {k: v for k, v in previous_state["domains"].items() if k in self.weights}
        self._main.check_domains(shared, where, exact=False)
        self._main.adopt_domains(shared)


def open_data(cfg: DataConfig, rank: int = 0, world_size: int = 1,
              model_vocab_size: int | None = None) -> MixtureSampler:
    """Open cfg.shards_dir and cfg.mixture, check them against each other and the model's
    vocabulary, and return this rank's sampler (its `source` gives validation batches)."""
    if not cfg.shards_dir or not cfg.mixture:
        raise ConfigError("data: shards_dir and mixture are required")
    source = TokenSource(cfg.shards_dir, cfg.val_fraction, cfg.val_min_docs, cfg.val_min_tokens)
    if model_vocab_size is not None:
        source.check_vocab(model_vocab_size)
    return MixtureSampler(source, load_mixture(cfg.mixture), cfg, rank, world_size)
