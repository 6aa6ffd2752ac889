"""The tokenizer: train a byte-level BPE on a bounded sample of text on the driver, and
load a tokenizer.json with what token shards need to know of it (hash, EOS, dtype).

`train_tokenizer` saves it so both `tokenizers` and transformers' `AutoTokenizer` load
it offline; `load_tokenizer` reads that (or any tokenizer.json a user brings).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from kiln.config import ConfigError
from kiln.curation import paths
from kiln.formats.hashing import content_sha256
from kiln.formats.shards import UINT16_MAX_ID

EOS_TOKEN, PAD_TOKEN, BOS_TOKEN = "<|endoftext|>", "<|pad|>", "<|begin_of_text|>"
# EOS first, so that it gets id 0; the header and end-of-turn tokens are reserved now
# for post-training's chat format, because adding tokens later changes the vocabulary.
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, BOS_TOKEN, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class TokenizerTrainConfig:
    vocab_size: int = 8192  # tokens in the vocabulary, the special tokens included
    min_frequency: int = 2  # a pair merges only when it occurs at least this often
    max_chars: int = 200_000_000  # characters read for training: a bounded sample, read on the driver


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = TokenizerTrainConfig.vocab_size,
                    min_frequency: int = TokenizerTrainConfig.min_frequency, special_tokens: list[str] = SPECIAL_TOKENS, log=_log) -> dict:
    """Train a byte-level BPE on `texts` and save it in `out_dir` (tokenizer.json and
    tokenizer_config.json): `tokenizers.Tokenizer.from_file(out_dir/tokenizer.json)`
    and `AutoTokenizer.from_pretrained(out_dir)` both load it offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if EOS_TOKEN not in special_tokens:
        raise ConfigError(f"special tokens {special_tokens}: {EOS_TOKEN!r} is missing (it separates documents)")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ConfigError(f"vocab_size {vocab_size}: below the {len(alphabet)} byte symbols "
                          f"plus {len(special_tokens)} special tokens")
    t0 = time.time()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Every byte starts in the vocabulary, so text the sample never showed (another
    # script, an emoji) still encodes, as bytes, instead of becoming an unknown token.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), initial_alphabet=alphabet,
                                  show_progress=False)
    seen = {"documents": 0, "chars": 0}

    def counted(stream: Iterable[str]) -> Iterator[str]:
        for text in stream:
            seen["documents"] += 1
            seen["chars"] += len(text)
            yield text

    tokenizer.train_from_iterator(counted(texts), trainer)
    if not seen["documents"]:
        raise ConfigError("tokenizer training: no text given")

    present = set(special_tokens)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN if PAD_TOKEN in present else None,
        bos_token=BOS_TOKEN if BOS_TOKEN in present else None,
        extra_special_tokens=[t for t in special_tokens if t not in (EOS_TOKEN, PAD_TOKEN, BOS_TOKEN)],
    )
    os.makedirs(out_dir, exist_ok=True)
    from kiln.formats.chat import CHAT_TEMPLATE, START_HEADER

    if START_HEADER in present:  # the chat format's tokens are there: store its template (post-training)
        hf.chat_template = CHAT_TEMPLATE
    # save_pretrained writes tokenizer.json itself (with a no-op post-processor that
    # transformers adds), so the hash that shards record is taken from its file.
    hf.save_pretrained(out_dir)
    path = os.path.join(out_dir, TOKENIZER_FILE)
    info = {"path": path, "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
            "hash": content_sha256(path), "seconds": round(time.time() - t0, 2), **seen}
    if info["vocab_size"] < vocab_size:
        log(f"tokenizer: the sample supports only {info['vocab_size']} tokens of the {vocab_size} asked for "
            f"(no pair left occurring {min_frequency}+ times)")
    log(f"tokenizer: {info['vocab_size']} tokens from {seen['documents']} texts ({seen['chars']} chars) "
        f"in {info['seconds']:.1f}s -> {path}")
    return info


def iter_texts(inputs: list[str], text_column: str = "text", max_chars: int = 0) -> Iterator[str]:
    """Texts from Parquet files, JSONL(.gz/.zst) files or kiln stage directories (their
    docs/); rows without text are skipped. With `max_chars` > 0 the stream stops after
    that many characters, the last text cut to fit: a tokenizer is trained on the
    driver, in one process, from a bounded sample of the corpus, not all of it."""
    seen = 0
    for path in paths.document_files(inputs):
        for text in _file_texts(path, text_column):
            if not isinstance(text, str) or not text.strip():
                continue
            if max_chars and seen + len(text) >= max_chars:
                yield text[:max_chars - seen]
                return
            seen += len(text)
            yield text


def _file_texts(path: str, text_column: str) -> Iterator:
    fmt = paths.detect_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with paths.open_binary(path) as f:
            parquet = pq.ParquetFile(f)
            if text_column not in parquet.schema_arrow.names:
                raise ConfigError(f"{path}: no column {text_column!r} "
                                  f"(columns: {', '.join(parquet.schema_arrow.names)})")
            # Row group by row group: a sample must not read a whole large file first.
            for batch in parquet.iter_batches(columns=[text_column]):
                yield from batch.column(0).to_pylist()
    elif fmt == "jsonl":
        import orjson

        from kiln.curation.labelled import jsonl_rows

        for _where, row in jsonl_rows(path, orjson):
            yield row.get(text_column)
    else:
        raise ConfigError(f"{path}: WARC holds HTML, not text; extract it first (kiln curate) and train on that")


@dataclass
class TokenizerInfo:
    path: str  # the tokenizer.json
    hash: str  # sha256 of its bytes: shards record it, so a trainer can refuse a mismatched tokenizer
    vocab_size: int  # with added (special) tokens
    eos_id: int  # the token appended after every document
    dtype: str  # "uint16" when every id fits, else "uint32"
    eos_token: str = EOS_TOKEN
    _tokenizer: object = field(default=None, repr=False, compare=False)

    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer`, loaded on first use (it is not pickled with the info)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(self.path)
        return self._tokenizer

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}


def load_tokenizer(path: str, eos_token: str = "", log=_log) -> TokenizerInfo:
    """`path` is a tokenizer.json or a directory holding one. The EOS token is
    `eos_token`, else the eos_token of a tokenizer_config.json beside the file, else
    <|endoftext|>."""
    from tokenizers import Tokenizer

    if not path:
        raise ConfigError("tokenize: no tokenizer given (a tokenizer.json, or the directory train_tokenizer wrote)")
    file = Path(path) / TOKENIZER_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for unparsable files
        raise ConfigError(f"{file}: not a tokenizers tokenizer.json ({str(e).splitlines()[0][:200]})") from e
    eos_token = eos_token or _configured_eos(file.parent / "tokenizer_config.json") or EOS_TOKEN
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise ConfigError(f"{file}: no end-of-sequence token {eos_token!r} in the vocabulary "
                          "(documents in a shard are separated by it)")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    # The largest id decides, not the count: ids need not be contiguous.
    max_id = max(tokenizer.get_vocab(with_added_tokens=True).values())
    dtype = "uint16" if max_id <= UINT16_MAX_ID else "uint32"
    if dtype == "uint32":
        log(f"{file}: token ids go up to {max_id}, past uint16's {UINT16_MAX_ID}; "
            "token shards are written as uint32 (4 bytes a token)")
    return TokenizerInfo(path=str(file.resolve()), hash=content_sha256(str(file)), vocab_size=vocab_size,
                         eos_id=eos_id, dtype=dtype, eos_token=eos_token, _tokenizer=tokenizer)


def _configured_eos(config_path: Path) -> str:
    if not config_path.is_file():
        return ""
    try:
        eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"{config_path}: not a JSON object: {e}") from e
    # Older transformers wrote special tokens as {"content": ..., "lstrip": ...}.
    return eos.get("content", "") if isinstance(eos, dict) else (eos or "")
