"""What a probe measures on each annealed model, all per-token likelihoods ("Signal and
Noise": they decide far more reliably than accuracy at small scale):

- `val:<domain>`: bits per byte on the held-out documents of every domain of the
  shards (the trainer's own validation split and Validator);
- `eval:<name>` for a text set (JSONL or Parquet): bits per byte over its texts. Each
  text is scored as a document: its first token follows EOS, as documents do in
  training, and it is cut into windows of seq_len targets; the summed negative log-
  likelihood in bits is divided by the texts' UTF-8 bytes;
- for a multiple-choice set (JSONL of {"context", "choices", "answer"}), each choice's
  log-likelihood as a continuation of `context + separator`, normalised by the
  continuation's UTF-8 bytes (OLMES's per-character normalisation): `eval:<name>:accuracy`
  (the best-normalised choice is the answer) and `eval:<name>:p_correct` (the softmax
  of the normalised log-likelihoods over the choices, at the answer; mean over items).

Eval sets are read and checked at the probe's start: a bad line fails the probe with
its file and line before any training.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from kiln.config import ConfigError
from kiln.probe.config import EvalConfig
from kiln.training.model import final_softcap

LN2 = math.log(2)


@dataclass
class TextSet:
    name: str
    texts: list[str]
    path: str
    skipped_empty: int  # texts that were empty or whitespace, left out (counted and printed)

    def metrics(self) -> list[str]:
        return [f"eval:{self.name}"]


@dataclass
class ChoiceSet:
    name: str
    items: list[tuple[str, list[str], int]]  # (context, choices, answer index)
    separator: str
    path: str

    def metrics(self) -> list[str]:
        return [f"eval:{self.name}:accuracy", f"eval:{self.name}:p_correct"]


def load(cfg: EvalConfig) -> TextSet | ChoiceSet:
    if cfg.text:
        return _load_texts(cfg)
    return _load_choices(cfg)


def _jsonl(path: str, limit: int):
    """(line number, object) of each non-blank line; a line that is not a JSON object fails."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: eval set not found")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from e
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row
            limit -= 1
            if limit == 0:
                return


def _load_texts(cfg: EvalConfig) -> TextSet:
    path, column = cfg.text, cfg.text_column
    if path.endswith(".parquet") or os.path.isdir(path):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable Parquet eval set ({str(e).splitlines()[0][:200]})") from e
        if column not in table.column_names:
            raise ConfigError(f"{path}: no column {column!r} (columns: {', '.join(table.column_names)})")
        values = table.column(column).to_pylist()
        if cfg.max_items:
            values = values[:cfg.max_items]
        for i, v in enumerate(values):
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"{path}: row {i + 1}: {column!r} is a {type(v).__name__}, not text")
    else:
        values = []
        for n, row in _jsonl(path, cfg.max_items):
            if column not in row:
                raise ConfigError(f"{path}:{n}: no {column!r} field (text eval sets need one per line)")
            if row[column] is not None and not isinstance(row[column], str):
                raise ConfigError(f"{path}:{n}: {column!r} is a {type(row[column]).__name__}, not text")
            values.append(row[column])
    texts = [v for v in values if v and v.strip()]
    if not texts:
        raise ConfigError(f"{path}: eval set {cfg.name!r} has no non-empty {column!r} texts "
                          f"({len(values)} line(s) read): nothing to measure")
    return TextSet(cfg.name, texts, path, len(values) - len(texts))


def _load_choices(cfg: EvalConfig) -> ChoiceSet:
    path, items = cfg.choices, []
    for n, row in _jsonl(path, cfg.max_items):
        for key in ("context", "choices", "answer"):
            if key not in row:
                raise ConfigError(f"{path}:{n}: multiple-choice line without {key!r} "
                                  '(expected {"context": ..., "choices": [...], "answer": index})')
        context, choices, answer = row["context"], row["choices"], row["answer"]
        if not isinstance(context, str):
            raise ConfigError(f"{path}:{n}: context is a {type(context).__name__}, not text")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise ConfigError(f"{path}:{n}: choices must be a list of at least two non-empty texts")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ConfigError(f"{path}:{n}: answer {answer!r} is not an index into its {len(choices)} choices")
        items.append((context, choices, answer))
    if not items:
        raise ConfigError(f"{path}: eval set {cfg.name!r} has no questions")
    return ChoiceSet(cfg.name, items, cfg.separator, path)


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def target_logprobs(hf, input_ids: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(B, T) log p(targets | inputs so far), 0 where a target is negative (padding).
    The logits are made `chunk` positions at a time, so a large vocabulary never needs
    the whole (B x T x V) tensor; a Gemma 2 model's final soft-cap is applied to them, as
    its own forward does."""
    hidden = hf.model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, C)
    flat = hidden.flatten(0, 1)
    goal = targets.flatten()
    weight = hf.lm_head.weight
    cap = final_softcap(hf)
    out = torch.zeros(goal.shape, dtype=torch.float64, device=hidden.device)
    for i in range(0, flat.shape[0], chunk):
        logits = (flat[i:i + chunk] @ weight.T).float()  # (chunk, V)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        picked = logits.gather(1, goal[i:i + chunk].clamp(min=0)[:, None])[:, 0]
        out[i:i + chunk] = (picked - torch.logsumexp(logits, dim=1)).double()
    return (out * (goal >= 0)).view(targets.shape)


def _batches(rows: list[tuple[list[int], list[int]]], batch_size: int, pad: int, device):
    """Rows of (inputs, targets) right-padded into batches; padding targets are -1. A
    causal model's outputs at real positions do not see the padding after them."""
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(inp) for inp, _ in chunk)
        inputs = torch.full((len(chunk), width), pad, dtype=torch.long)
        targets = torch.full((len(chunk), width), -1, dtype=torch.long)
        for j, (inp, tgt) in enumerate(chunk):
            inputs[j, :len(inp)] = torch.tensor(inp)
            targets[j, :len(tgt)] = torch.tensor(tgt)
        yield i, inputs.to(device), targets.to(device)


def text_bpb(hf, tokenizer, eos_id: int, texts: list[str], seq_len: int, batch_size: int, device) -> float:
    rows = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        stream = [eos_id] + ids
        for start in range(0, len(ids), seq_len):
            rows.append((stream[start:start + seq_len], ids[start:start + seq_len]))
    nats = 0.0
    for _, inputs, targets in _batches(rows, batch_size, eos_id, device):
        nats -= float(target_logprobs(hf, inputs, targets).sum())
    return nats / LN2 / sum(len(t.encode("utf-8")) for t in texts)


def choice_scores(hf, tokenizer, eos_id: int, items: list[tuple[str, list[str], int]], separator: str, seq_len: int,
                  batch_size: int, device) -> tuple[float, float]:
    """(accuracy, mean p_correct) over the items (see the module docstring)."""
    rows, owners = [], []
    for k, (context, choices, _answer) in enumerate(items):
        ctx = [eos_id] + tokenizer.encode(context, add_special_tokens=False).ids
        for c, choice in enumerate(choices):
            cont = tokenizer.encode(separator + choice, add_special_tokens=False).ids
            full = (ctx + cont)[-(seq_len + 1):]  # keep the continuation; cut the context's start if needed
            n = min(len(cont), len(full) - 1)
            inputs = full[:-1]
            targets = [-1] * (len(inputs) - n) + full[-n:]
            rows.append((inputs, targets))
            owners.append((k, c, len((separator + choice).encode("utf-8"))))
    loglik = [0.0] * len(rows)
    for i, inputs, targets in _batches(rows, batch_size, eos_id, device):
        sums = target_logprobs(hf, inputs, targets).sum(dim=1).tolist()
        loglik[i:i + len(sums)] = sums
    per_item: dict[int, list[float]] = {}
    for (k, _c, n_bytes), ll in zip(owners, loglik):
        per_item.setdefault(k, []).append(ll / n_bytes)
    correct, p_correct = 0, 0.0
    for k, (_context, _choices, answer) in enumerate(items):
        normed = torch.tensor(per_item[k], dtype=torch.float64)
        correct += int(int(normed.argmax()) == answer)
        p_correct += float(torch.softmax(normed, dim=0)[answer])
    return correct / len(items), p_correct / len(items)


def evaluate(model_dir: str, sets: list, val_source, seq_len: int, eval_batches: int, batch_size: int,
             device=None) -> dict[str, float]:
    """Every metric of one annealed model: val:<domain> for each domain of `val_source`
    (a TokenSource of the probe's shards) and each eval set's."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from kiln.training.distributed import World
    from kiln.training.model import CausalLM
    from kiln.training.parallelize import ParallelConfig
    from kiln.training.recipe import StageConfig
    from kiln.training.validate import Validator

    world = World(device=device or torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).to(world.device)
    hf.eval()
    out: dict[str, float] = {}
    stage = StageConfig(name="probe-eval", seq_len=seq_len, eval_batches=eval_batches or 10**9)
    validator = Validator(val_source, stage, batch_size, world, model_dir)
    for key, value in validator.run(CausalLM(hf), ParallelConfig()).items():
        if key.endswith("/bpb"):
            out[f"val:{key[len('val/'):-len('/bpb')]}"] = value
    hf.eval()
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    eos = val_source.eos_id
    for s in sets:
        if isinstance(s, TextSet):
            out[f"eval:{s.name}"] = text_bpb(hf, tokenizer, eos, s.texts, seq_len, batch_size, world.device)
        else:
            acc, p = choice_scores(hf, tokenizer, eos, s.items, s.separator, seq_len, batch_size, world.device)
            out[f"eval:{s.name}:accuracy"], out[f"eval:{s.name}:p_correct"] = acc, p
    return out
