"""Post-training data: TRL's file formats in, token ids and loss masks out, bad rows
counted by reason.

SFT rows (JSONL or Parquet): `{"messages": [{"role", "content"}, ...]}`, or `{"prompt",
"completion"}` (a user turn and an assistant turn). Preference rows: `{"prompt", "chosen",
"rejected"}`, each a string or a message list (prompt: the conversation so far; chosen /
rejected: the assistant reply), with an optional `margin` (Llama 2's reward margin).

Every conversation is rendered in the chat format (kiln.formats.chat) and tokenized as
one text; a token's role comes from the character span it covers, so the ids are
exactly `apply_chat_template`'s and the masks exactly its assistant tokens.

Rows are dropped with a reason (`not_json`, `bad_messages`, `no_assistant_turn`,
`empty`, `chosen_equals_rejected`, `too_long`) or kept after cutting the prompt from
the left (`prompt_truncated`, with `overflow = "truncate"`); the counts are printed and
saved beside the stage. A file none of whose rows survives fails, naming it.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from kiln.config import ConfigError
from kiln.formats.chat import ROLES, render

IGNORE = -100
OVERFLOW = ("truncate", "drop")


@dataclass
class DataReport:
    """What reading a post-training file did with its rows."""

    path: str
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0  # kept after cutting the prompt from the left

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def check(self) -> None:
        assert self.rows == self.kept + sum(self.dropped.values())

    def to_dict(self) -> dict:
        return {"path": self.path, "rows": self.rows, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "prompt_truncated": self.truncated}

    def describe(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (f"{self.path}: {self.rows} rows, {self.kept} kept ({self.truncated} with the prompt cut), "
                f"dropped: {drops}")


def read_rows(path: str, report: DataReport):
    """Each row of a JSONL or Parquet file as a dict; a JSONL line that is not a JSON
    object is counted as `not_json`."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: post-training data not found")
    if path.endswith(".parquet") or os.path.isdir(path):
        import pyarrow.parquet as pq

        for row in pq.read_table(path).to_pylist():
            report.rows += 1
            yield row
        return
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            report.rows += 1
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                report.drop("not_json")
                continue
            if not isinstance(row, dict):
                report.drop("not_json")
                continue
            yield row


def _messages(value, default_role: str) -> list[dict] | None:
    """A message list from a string (one message of `default_role`) or a list of
    {role, content} dicts; None if malformed."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out


# --------------------------------------------------------------------------- tokenizing


class ChatTokenizer:
    """Renders conversations and tokenizes them with a tokenizer.json's `tokenizers`
    object, marking each token by the span it covers."""

    def __init__(self, tokenizer_dir: str):
        from tokenizers import Tokenizer

        path = os.path.join(tokenizer_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{tokenizer_dir}: no tokenizer.json (post-training needs the chat tokenizer)")
        self.dir = tokenizer_dir
        self.tok = Tokenizer.from_file(path)
        from kiln.formats.chat import BOS, EOT, END_HEADER, START_HEADER

        missing = [t for t in (BOS, START_HEADER, END_HEADER, EOT) if self.tok.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"{path}: no {missing[0]} token: the chat format needs {BOS}, {START_HEADER}, "
                              f"{END_HEADER} and {EOT} (kiln curate train-tokenizer reserves them)")
        self.pad_id = self.tok.token_to_id("<|pad|>") or self.tok.token_to_id("<|endoftext|>") or 0
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, messages: list[dict]) -> tuple[list[int], list[bool], list[bool]]:
        """(ids, trained, format): `trained` marks tokens inside assistant content +
        <|eot_id|>; `format` marks header and <|eot_id|> tokens."""
        r = render(messages)
        enc = self.tok.encode(r.text, add_special_tokens=False)
        trained = [_inside(o, r.assistant) for o in enc.offsets]
        fmt = [_inside(o, r.headers) or _inside(o, r.eots) for o in enc.offsets]
        return list(enc.ids), trained, fmt


def _inside(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    s, e = offset
    return any(a <= s and e <= b for a, b in spans) and e > s


# --------------------------------------------------------------------------- SFT


@dataclass
class SFTExample:
    ids: list[int]
    labels: list[int]  # labels[i] = the target for position i (ids[i + 1]) or IGNORE


def read_sft(path: str, tok: ChatTokenizer, seq_len: int, overflow: str = "truncate"
             ) -> tuple[list[SFTExample], DataReport]:
    report = DataReport(path)
    examples = []
    for row in read_rows(path, report):
        if "messages" in row:
            messages = _messages(row["messages"], "user")
        elif "prompt" in row and "completion" in row:
            prompt, completion = _messages(row["prompt"], "user"), _messages(row["completion"], "assistant")
            messages = prompt + completion if prompt and completion else None
        else:
            messages = None
        if messages is None:
            report.drop("bad_messages")
            continue
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            report.drop("no_assistant_turn")
            continue
        ids, trained, _fmt = tok.encode(messages)
        example, reason = _sft_example(ids, trained, seq_len, overflow)
        if example is None:
            report.drop(reason)
            continue
        report.truncated += reason == "prompt_truncated"
        report.kept += 1
        examples.append(example)
    report.check()
    if not examples:
        raise ConfigError(f"{report.describe()}: no usable conversation")
    return examples, report


def _sft_example(ids: list[int], trained: list[bool], seq_len: int, overflow: str):
    """Targets of a conversation cut to seq_len + 1 tokens: `truncate` drops tokens from
    the left while the first trained token survives; otherwise the row is too long."""
    reason = ""
    if len(ids) > seq_len + 1:
        first = trained.index(True)
        cut = len(ids) - (seq_len + 1)
        if overflow == "drop" or cut >= first:
            return None, "too_long"
        ids, trained, reason = ids[cut:], trained[cut:], "prompt_truncated"
    labels = [ids[i + 1] if trained[i + 1] else IGNORE for i in range(len(ids) - 1)]
    if all(label == IGNORE for label in labels):
        return None, "empty"
    return SFTExample(ids[:-1], labels), reason


# --------------------------------------------------------------------------- preferences


@dataclass
class Pair:
    chosen: SFTExample  # ids and labels with IGNORE outside the response (and its format tokens, if masked)
    rejected: SFTExample
    margin: float


def read_pairs(path: str, tok: ChatTokenizer, seq_len: int, mask_format_tokens: bool = False,
               overflow: str = "truncate") -> tuple[list[Pair], DataReport]:
    report = DataReport(path)
    pairs = []
    for row in read_rows(path, report):
        prompt = _messages(row.get("prompt"), "user")
        chosen, rejected = _messages(row.get("chosen"), "assistant"), _messages(row.get("rejected"), "assistant")
        margin = row.get("margin", 0.0)
        if (prompt is None or chosen is None or rejected is None or isinstance(margin, bool)
                or not isinstance(margin, (int, float)) or not math.isfinite(margin)):
            report.drop("bad_messages")
            continue
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            report.drop("no_assistant_turn")
            continue
        if [m["content"].strip() for m in chosen] == [m["content"].strip() for m in rejected]:
            report.drop("chosen_equals_rejected")
            continue
        sides, reason = [], ""
        for reply in (chosen, rejected):
            ids, trained, fmt = tok.encode(prompt + reply)
            start = len(tok.encode(prompt)[0])  # the reply's first token (its header)
            response = [i >= start and not (mask_format_tokens and fmt[i]) for i in range(len(ids))]
            example, why = _sft_example(ids, response, seq_len, overflow)
            if example is None:
                reason = why
                break
            reason = reason or why
            sides.append(example)
        if len(sides) < 2:
            report.drop(reason)
            continue
        report.truncated += reason == "prompt_truncated"
        report.kept += 1
        pairs.append(Pair(sides[0], sides[1], float(margin)))
    report.check()
    if not pairs:
        raise ConfigError(f"{report.describe()}: no usable preference pair")
    return pairs, report


def pair_batch(pairs: list[Pair], indices: list[int], pad_id: int) -> dict:
    """(2B, T) right-padded ids and targets, the B chosen rows first, then the rejected."""
    rows = [pairs[i].chosen for i in indices] + [pairs[i].rejected for i in indices]
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    lengths = torch.tensor([len(r.ids) for r in rows], dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r.ids)] = torch.tensor(r.ids)
        targets[j, :len(r.labels)] = torch.tensor(r.labels)
    return {"input_ids": ids, "targets": targets, "lengths": lengths, "index": torch.tensor(indices),
            "margin": torch.tensor([pairs[i].margin for i in indices], dtype=torch.float32)}


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out indices: a seeded permutation's first share is held out
    (at least one row when val_fraction > 0 and there are two or more)."""
    order = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    return np.sort(order[k:]), np.sort(order[:k])


# --------------------------------------------------------------------------- samplers

SAMPLER_FORMAT = "kiln-post-sampler-v1"


class _EpochSampler:
    """Items (packed sequences of examples, or preference pairs) in a seeded order per
    epoch, epochs end to end; a batch of k per rank takes the next k x world items and
    rank r the items r, r + w, ... of them (the MixtureSampler's dealing), so the stream
    does not depend on the number of ranks. State: epoch and cursor."""

    def __init__(self, n: int, seed: int, rank: int, world_size: int):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.cursor, self.drawn = 0, 0, 0

    def order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s permutation (kept for the current epoch: `take` reads it per item)."""
        if getattr(self, "_order_epoch", None) != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._order, self._order_epoch = rng.permutation(self.n), epoch
        return self._order

    def take(self, k: int) -> list[int]:
        block, mine = k * self.world_size, []
        for j in range(block):
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
            if j % self.world_size == self.rank:
                mine.append(int(self.order(self.epoch)[self.cursor]))
            self.cursor += 1
        self.drawn += block
        return mine

    def state_dict(self) -> dict:
        return {"format": SAMPLER_FORMAT, "seed": self.seed, "items": self.n, "epoch": self.epoch,
                "cursor": self.cursor, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != SAMPLER_FORMAT or state.get("seed") != self.seed or state.get("items") != self.n:
            raise ConfigError(f"sampler state {state.get('format')} of {state.get('items')} items with seed "
                              f"{state.get('seed')}: this stage has {self.n} items with seed {self.seed}; the data "
                              "or the seed changed")
        self.epoch, self.cursor, self.drawn = state["epoch"], state["cursor"], state["drawn"]

    def metrics(self) -> dict:
        return {"data/epochs": self.drawn / self.n}


def pack(examples: list[SFTExample], seq_len: int) -> list[list[int]]:
    """Example indices grouped into sequences of at most seq_len tokens, in order
    (first fit of the next example; an example never spans two sequences)."""
    sequences, current, used = [], [], 0
    for i, e in enumerate(examples):
        if current and used + len(e.ids) > seq_len:
            sequences.append(current)
            current, used = [], 0
        current.append(i)
        used += len(e.ids)
    if current:
        sequences.append(current)
    return sequences


class SFTSampler(_EpochSampler):
    """SFT batches: with `packing`, conversations laid end to end in sequences of
    seq_len (in a fixed packing of the examples; the order of the sequences is shuffled
    each epoch), position ids restarting and no attention across conversations
    (segment ids, as the pretraining loop's document masking); without, one
    conversation per padded row. Padding is its own segment, never a target."""

    def __init__(self, examples: list[SFTExample], seq_len: int, seed: int, pad_id: int, packing: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self.sequences = pack(examples, seq_len) if packing else [[i] for i in range(len(examples))]
        super().__init__(len(self.sequences), seed, rank, world_size)

    def next_batch(self, k: int):
        return self.batch_of(self.take(k))

    def batch_of(self, rows: list[int]):
        """The packed sequences `rows` as one batch."""
        from kiln.training.data import Batch

        T = self.seq_len
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), T), dtype=torch.long)
        segments = torch.zeros((len(rows), T), dtype=torch.long)
        for j, s in enumerate(rows):
            at = 0
            for seg, i in enumerate(self.sequences[s]):
                e = self.examples[i]
                n = len(e.ids)
                ids[j, at:at + n] = torch.tensor(e.ids)
                labels[j, at:at + n] = torch.tensor(e.labels)
                positions[j, at:at + n] = torch.arange(n)
                segments[j, at:at + n] = seg
                at += n
            segments[j, at:] = len(self.sequences[s])
            positions[j, at:] = torch.arange(T - at)
        return Batch(input_ids=ids, labels=labels, domain_index=torch.zeros(len(rows), dtype=torch.long),
                     sequence_index=torch.tensor(rows), position_ids=positions, segment_ids=segments)


class PairSampler(_EpochSampler):
    """Preference batches of k pairs per rank (2k rows: chosen first), with each pair's
    index so its cached reference log-probs can be looked up."""

    def __init__(self, pairs: list[Pair], indices: np.ndarray, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1):
        self.pairs, self.indices, self.pad_id = pairs, indices, pad_id
        super().__init__(len(indices), seed, rank, world_size)

    def next_batch(self, k: int) -> dict:
        return pair_batch(self.pairs, [int(self.indices[i]) for i in self.take(k)], self.pad_id)
