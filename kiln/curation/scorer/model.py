"""The transformer scorer's model: training (`train_scorer`, a plain torch loop) and
inference (`Scorer`), with no Spark. A scorer directory is a transformers checkpoint
plus `kiln_scorer.json` (task, classes, validation metrics); `kiln.curation.scorer.stage`
runs it over a corpus.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kiln.config import ConfigError
from kiln.formats.hashing import content_sha256

META_FILE = "kiln_scorer.json"
TASKS = ("regression", "classification")
# Class names that mean "the good one" when a binary task does not say which is.
POSITIVE_NAMES = ("1", "true", "yes", "pos", "positive", "good", "hq", "high", "high_quality")
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")
MAX_GRAD_NORM = 1.0  # a from-scratch model's first steps see large gradients; clipping keeps lr usable


@dataclass
class ScorerTrainConfig:
    task: str = "regression"  # "regression": float labels, one output; "classification": string labels, softmax
    model_dir: str = ""  # local transformers checkpoint (with its tokenizer) to fine-tune; empty = a new model
    model_type: str = "roberta"  # architecture of a new model (AutoConfig.for_model): roberta, bert, electra, ...
    hidden_size: int = 64  # width of a new model
    num_layers: int = 2  # transformer blocks of a new model
    num_heads: int = 2  # attention heads of a new model
    intermediate_size: int = 128  # MLP width of a new model (distilbert names it hidden_dim and keeps its 3072)
    tokenizer: str = ""  # tokenizer.json or tokenizer directory (kiln train-tokenizer); required for a new model, overrides model_dir's
    max_length: int = 256  # tokens per document; the rest is cut (training and scoring alike)
    epochs: int = 3  # passes over the training rows
    batch_size: int = 16  # documents per optimizer step
    lr: float = 5e-4  # peak AdamW learning rate, decayed linearly to 0; about 2e-5 suits a pretrained model_dir
    weight_decay: float = 0.01  # AdamW decay on weight matrices and embeddings (not biases or norms)
    val_fraction: float = 0.1  # rows held out for the metrics (per class for classification), chosen by seed
    seed: int = 0  # initialisation, split and shuffling
    positive_label: str = ""  # classification: the class whose probability is the score; empty = see resolve_positive_label
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", "cuda:1", ...


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r}: {e}") from e


def resolve_positive_label(classes: list[str], configured: str = "") -> str:
    """The class whose probability is the score. Configured wins; of exactly two classes,
    one with a conventional positive name ("1", "pos", "hq", ...), else the one that sorts
    last ("0"/"1", "bad"/"good" read naturally). More classes and none named: "" (the score
    is then the top class's probability)."""
    if configured:
        if configured not in classes:
            raise ConfigError(f"positive_label {configured!r} is not one of the classes {classes}")
        return configured
    if len(classes) != 2:
        return ""
    named = [c for c in classes if c.lower() in POSITIVE_NAMES]
    return named[0] if len(named) == 1 else classes[-1]


# ---------------------------------------------------------------------------------------
# Tokenizer and checkpoint loading


def load_scorer_tokenizer(path: str):
    """A fast tokenizer from a tokenizer.json or a directory, with a padding token."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_file():
        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own types
            raise ConfigError(f"{path}: cannot load as a tokenizer.json: {e}") from e
    elif p.is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - a directory without tokenizer_config.json
            if not (p / "tokenizer.json").is_file():
                raise ConfigError(f"{path}: not a tokenizer directory: {e}") from e
            tok = PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))
    else:
        raise ConfigError(f"{path}: tokenizer not found")
    if tok.pad_token is None:
        vocab = tok.get_vocab()
        pad = next((name for name in PAD_NAMES if name in vocab), None)
        if pad:
            tok.pad_token = pad
        else:  # a new id; a new model sizes its embeddings from len(tok), a fine-tuned one is resized
            tok.add_special_tokens({"pad_token": PAD_NAMES[0]})
    return tok


def _checkpoint_config(model_dir: str):
    from transformers import AutoConfig

    p = Path(model_dir)
    if not p.is_dir():
        raise ConfigError(f"{model_dir}: not a transformers checkpoint (no such directory)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{model_dir}: not a transformers checkpoint (no config.json)")
    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError here
        raise ConfigError(f"{model_dir}: not a transformers checkpoint ({e})") from e


def read_meta(model_dir: str) -> dict:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise ConfigError(f"{model_dir}: not a kiln scorer directory (no {META_FILE}; train_scorer writes one)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON: {e}") from e
    if meta.get("task") not in TASKS:
        raise ConfigError(f"{path}: task {meta.get('task')!r} is not one of {TASKS}")
    return meta


# ---------------------------------------------------------------------------------------
# Inference


class Scorer:
    """A trained scorer in memory: `score` for one float per text, `classify` for classes."""

    def __init__(self, model, tokenizer, meta: dict, device, batch_size: int = 32, max_chars: int = 20_000,
                 where: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.meta = meta
        self.task: str = meta["task"]
        self.labels: list[str] = list(meta.get("labels") or [])
        self.positive_label: str = meta.get("positive_label") or ""
        self.max_length: int = int(meta["max_length"])
        self.lead_id: int | None = meta.get("lead_token_id")
        self.device = device
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.where = where

    @classmethod
    def load(cls, model_dir: str, device: str = "auto", batch_size: int = 32, max_chars: int = 20_000) -> "Scorer":
        from transformers import AutoModelForSequenceClassification

        meta = read_meta(model_dir)
        _checkpoint_config(model_dir)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - missing or truncated weights
            raise ConfigError(f"{model_dir}: cannot load the model weights: {e}") from e
        dev = resolve_device(device)
        return cls(model.to(dev), load_scorer_tokenizer(model_dir), meta, dev, batch_size, max_chars, where=model_dir)

    def logits(self, texts: list[str | None]) -> np.ndarray:
        """(N, outputs) float32; NaN rows for texts that are empty or blank."""
        import torch

        n_out = self.model.config.num_labels
        out = np.full((len(texts), n_out), np.nan, dtype=np.float32)
        live = [i for i, t in enumerate(texts) if t and t.strip()]
        if not live:
            return out
        ids = encode(self.tokenizer, [texts[i][: self.max_chars] for i in live], self.max_length, self.lead_id)
        # Longest first and batched by length: padding is wasted compute, and a text's
        # numbers do not depend on its neighbours beyond float rounding (masked padding).
        order = sorted(range(len(live)), key=lambda k: -len(ids[k]))
        order = [k for k in order if ids[k]]  # a tokenizer that yields nothing: left NaN
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                input_ids, mask = _pad([ids[k] for k in chunk], pad)
                logits = self.model(input_ids=input_ids.to(self.device),
                                    attention_mask=mask.to(self.device)).logits  # (B, outputs)
                out[[live[k] for k in chunk]] = logits.float().cpu().numpy()
        return out

    def probabilities(self, texts: list[str | None]) -> np.ndarray:
        if self.task != "classification":
            raise ConfigError(f"{self.where or 'scorer'}: a regression scorer has no classes")
        logits = self.logits(texts)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)  # (N, classes)

    def score(self, texts: list[str | None]) -> np.ndarray:
        """float32 per text: the regression output, P(positive_label), or (several classes,
        none positive) the top class's probability. NaN for empty texts."""
        if self.task == "regression":
            return self.logits(texts)[:, 0]
        probs = self.probabilities(texts)
        if self.positive_label:
            return probs[:, self.labels.index(self.positive_label)]
        return probs.max(axis=1)

    def classify(self, texts: list[str | None]) -> tuple[list[str | None], np.ndarray]:
        """The top class per text (None for empty texts) and the (N, classes) probabilities,
        columns in `self.labels` order."""
        probs = self.probabilities(texts)
        top = [None if np.isnan(row).any() else self.labels[int(row.argmax())] for row in probs]
        return top, probs


def lead_token_id(tokenizer) -> int | None:
    """The token to put first, when the tokenizer puts nothing there itself.

    Sequence-classification heads (RoBERTa's, BERT's pooler) read the first position.
    A BERT-style tokenizer puts [CLS] there; kiln's tokenizers add no special tokens,
    so the first position would be the document's first word, and a small model then
    has to learn to gather the whole text into a word's vector. A fixed start token
    (bos, else eos, as GPT-2 separates documents) gives the head a position of its own.
    """
    probe = "a b"
    if tokenizer(probe)["input_ids"] != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        return None
    for tid in (tokenizer.cls_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return None


def encode(tokenizer, texts: list[str], max_length: int, lead_id: int | None) -> list[list[int]]:
    """Token ids per text, at most max_length of them, `lead_id` first when given."""
    if lead_id is None:
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    ids = tokenizer(texts, truncation=True, max_length=max_length - 1, add_special_tokens=False)["input_ids"]
    return [[lead_id] + row for row in ids]


def _pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return input_ids, mask


# ---------------------------------------------------------------------------------------
# Training


def _check_labels(labels: list, task: str) -> tuple[list, list[str]]:
    """Labels as the model wants them (floats, or class names) and the sorted classes."""
    if task == "regression":
        for i, y in enumerate(labels):
            if isinstance(y, bool) or not isinstance(y, (int, float)) or not math.isfinite(y):
                raise ConfigError(f"regression label {y!r} (row {i}) is not a number "
                                  "(class names want task='classification')")
        return [float(y) for y in labels], []
    names = [str(y) for y in labels]
    classes = sorted(set(names))
    if not classes:
        raise ConfigError("classification needs labelled rows: none were given")
    if len(classes) == 1:
        raise ConfigError(f"classification needs two classes or more: all {len(names)} rows are labelled {classes[0]!r}")
    return names, classes


def split_rows(labels: list, task: str, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, validation) row indices. Classification holds out the same
    fraction of every class (at least one row of each class that has two), so every
    class has a precision and recall."""
    rng = random.Random(seed)
    groups: dict = {}
    for i, y in enumerate(labels):
        groups.setdefault(y if task == "classification" else None, []).append(i)
    train, val = [], []
    for key in sorted(groups, key=str):
        rows = groups[key]
        rng.shuffle(rows)
        n_val = round(len(rows) * val_fraction)
        if task == "classification" and len(rows) >= 2 and val_fraction > 0:
            n_val = max(1, n_val)
        val += rows[:n_val]
        train += rows[n_val:]
    if len(val) < 2 or len(train) < 2:
        raise ConfigError(f"{len(labels)} rows are too few for a validation split at val_fraction={val_fraction} "
                          f"({len(train)} train, {len(val)} validation; both need 2 or more): add rows or raise val_fraction")
    return sorted(train), sorted(val)


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict:
    err = pred.astype(np.float64) - target.astype(np.float64)
    # Pearson r is undefined when either side is constant: reported as None, not NaN.
    r = float(np.corrcoef(pred, target)[0, 1]) if pred.std() > 0 and target.std() > 0 else None
    return {"mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err))), "pearson_r": r}


def classification_metrics(pred: list[str], target: list[str], classes: list[str]) -> dict:
    per_class = {}
    for c in classes:
        tp = sum(p == c and t == c for p, t in zip(pred, target))
        n_pred, n_true = sum(p == c for p in pred), sum(t == c for t in target)
        per_class[c] = {"precision": tp / n_pred if n_pred else None,
                        "recall": tp / n_true if n_true else None, "support": n_true}
    accuracy = sum(p == t for p, t in zip(pred, target)) / len(target)
    return {"accuracy": accuracy, "per_class": per_class}


def _check_train_config(cfg: ScorerTrainConfig) -> None:
    if cfg.task not in TASKS:
        raise ConfigError(f"task {cfg.task!r}: expected one of {TASKS}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError(f"epochs ({cfg.epochs}) and batch_size ({cfg.batch_size}) must be 1 or more")
    if cfg.max_length < 2:  # one position goes to the start token
        raise ConfigError(f"max_length = {cfg.max_length}: must be 2 or more")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"val_fraction = {cfg.val_fraction}: expected a fraction between 0 and 1")


def _build_model(cfg: ScorerTrainConfig, classes: list[str]):
    """(model, tokenizer): the checkpoint in model_dir with a fresh head, or a new model."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    head = {"num_labels": len(classes) or 1,
            "problem_type": "single_label_classification" if classes else "regression"}
    if classes:
        head["id2label"] = dict(enumerate(classes))
        head["label2id"] = {c: i for i, c in enumerate(classes)}
    if cfg.model_dir:
        _checkpoint_config(cfg.model_dir)
        tok = load_scorer_tokenizer(cfg.tokenizer or cfg.model_dir)
        if cfg.max_length > tok.model_max_length:  # past the checkpoint's position table
            raise ConfigError(f"{cfg.model_dir}: max_length {cfg.max_length} exceeds the model's "
                              f"{tok.model_max_length} tokens")
        try:
            # The checkpoint's own head (another task, other classes) is replaced.
            model = AutoModelForSequenceClassification.from_pretrained(
                cfg.model_dir, local_files_only=True, ignore_mismatched_sizes=True, **head)
        except Exception as e:  # noqa: BLE001 - no weights, or an architecture without a classification head
            raise ConfigError(f"{cfg.model_dir}: not a transformers checkpoint ({e})") from e
        if len(tok) > model.get_input_embeddings().num_embeddings:  # a padding token was added
            model.resize_token_embeddings(len(tok))
        model.config.pad_token_id = tok.pad_token_id
        return model, tok
    if not cfg.tokenizer:
        raise ConfigError("a new scorer model needs a tokenizer: set tokenizer to a tokenizer.json or a "
                          "tokenizer directory (kiln train-tokenizer writes one), or fine-tune a model_dir")
    tok = load_scorer_tokenizer(cfg.tokenizer)
    try:
        config = AutoConfig.for_model(
            cfg.model_type, vocab_size=len(tok), hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            # RoBERTa numbers positions from pad_token_id + 1, so its table needs that many more rows.
            max_position_embeddings=cfg.max_length + tok.pad_token_id + 1,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **head)
        model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as e:
        raise ConfigError(f"model_type {cfg.model_type!r}: {e}") from e
    return model, tok


def train_scorer(texts: list[str], labels: list, cfg: ScorerTrainConfig, out_dir: str, log=_log) -> dict:
    """Train on (texts, labels), evaluate on the held-out rows, save to `out_dir`;
    the validation metrics (also in out_dir/kiln_scorer.json)."""
    import torch

    _check_train_config(cfg)
    if len(texts) != len(labels):
        raise ConfigError(f"{len(texts)} texts but {len(labels)} labels")
    targets, classes = _check_labels(labels, cfg.task)
    blank = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if blank:  # nothing to learn from, and an all-padding row has no attention to normalise
        log(f"[scorer] {len(blank)} rows without text skipped (first: row {blank[0]})")
        keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        texts, targets = [texts[i] for i in keep], [targets[i] for i in keep]
        targets, classes = _check_labels(targets, cfg.task)  # still two classes?
    positive = resolve_positive_label(classes, cfg.positive_label) if classes else ""
    train_rows, val_rows = split_rows(targets, cfg.task, cfg.val_fraction, cfg.seed)
    device = resolve_device(cfg.device)

    torch.manual_seed(cfg.seed)
    model, tok = _build_model(cfg, classes)
    model.to(device)
    meta = {"task": cfg.task, "labels": classes, "positive_label": positive, "max_length": cfg.max_length,
            "lead_token_id": lead_token_id(tok)}
    scorer = Scorer(model, tok, meta, device, batch_size=max(cfg.batch_size, 32))
    class_id = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([class_id[t] for t in targets] if classes else targets,
                     dtype=torch.long if classes else torch.float32)
    ids = encode(tok, texts, cfg.max_length, meta["lead_token_id"])

    # Norms and biases are not decayed: shrinking them toward 0 is not regularisation.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / total)
    shuffle = torch.Generator().manual_seed(cfg.seed)

    def evaluate() -> dict:
        scorer.model.eval()
        val_texts = [texts[i] for i in val_rows]
        if classes:
            pred, _ = scorer.classify(val_texts)
            return classification_metrics(pred, [targets[i] for i in val_rows], classes)
        return regression_metrics(scorer.score(val_texts), np.array([targets[i] for i in val_rows]))

    log(f"[scorer] {cfg.task}: {len(train_rows)} train / {len(val_rows)} validation rows, "
        f"{sum(p.numel() for p in params):,} parameters on {device}")
    metrics, train_loss = {}, float("nan")
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0, losses = time.time(), []
        order = [train_rows[k] for k in torch.randperm(len(train_rows), generator=shuffle).tolist()]
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start:start + cfg.batch_size]
            input_ids, mask = _pad([ids[i] for i in rows], tok.pad_token_id)
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=y[rows].to(device))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            sched.step()
            losses.append(out.loss.item())
        train_loss = float(np.mean(losses))
        docs_per_s = len(order) / max(time.time() - t0, 1e-9)
        metrics = evaluate()
        shown = f"accuracy {metrics['accuracy']:.4f}" if classes else f"mse {metrics['mse']:.4f}"
        log(f"[scorer] epoch {epoch}/{cfg.epochs}: train loss {train_loss:.4f}, val {shown}, {docs_per_s:.0f} docs/s")
    metrics["train_loss"] = train_loss

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    meta.update(metrics=metrics, train_rows=len(train_rows), val_rows=len(val_rows), config=asdict(cfg))
    (Path(out_dir) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log(f"[scorer] saved to {out_dir}: {json.dumps(metrics, sort_keys=True)}")
    return metrics


def train_scorer_from_files(inputs: list[str], text_column: str, label_column: str, cfg: ScorerTrainConfig,
                            out_dir: str, log=_log) -> dict:
    """train_scorer over labelled JSONL/Parquet files or kiln stage directories."""
    from kiln.curation.labelled import read_labelled

    data = read_labelled(inputs, text_column=text_column, label_column=label_column)
    return train_scorer(data.texts, data.labels, cfg, out_dir, log=log)


def scorer_info(model_dir: str) -> dict:
    """kiln_scorer.json of a scorer directory (task, labels, positive_label, metrics, ...)
    plus `fingerprint`, a digest of all its files, for a stage's settings."""
    return {**read_meta(model_dir), "fingerprint": content_sha256(model_dir)[:16]}
