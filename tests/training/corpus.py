"""The trainer's test corpus and debug recipe, shared by tests/training and the fault
suite (benchmarks/faults.py): real text in three domains, token shards cut with a
tokenizer trained on it, and the recipe whose losses tests/assets/losses records."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import STDLIB, docstrings, locale_sentences
from tests.training.test_data import write_shards


def build_corpus(root: Path, log=None) -> Path:
    """`root/tok` and `root/shards` (general, code, multilingual)."""
    from kiln.curation.tokenizer import load_tokenizer, train_tokenizer

    kw = {"log": log} if log else {}
    general = docstrings("argparse") + docstrings("textwrap") + docstrings("difflib") + docstrings("tarfile")
    code = ["\n".join((STDLIB / f"{m}.py").read_text().splitlines()[i:i + 30])
            for m in ("shutil", "heapq", "bisect") for i in range(0, 900, 30)]
    multilingual = [" ".join(locale_sentences(lang, limit=40)[i:i + 5]) for lang in ("de", "fr") for i in range(0, 40, 5)]
    train_tokenizer(general + code + multilingual, str(root / "tok"), vocab_size=512, **kw)
    info = load_tokenizer(str(root / "tok"), **kw)
    tok = info.tokenizer
    docs = {domain: {f"{domain}-{i}": tok.encode(t, add_special_tokens=False).ids for i, t in enumerate(texts)}
            for domain, texts in (("general", general), ("code", code), ("multilingual", multilingual))}
    write_shards(root / "shards", docs, parts=2, tokenizer_hash=info.hash, vocab_size=info.vocab_size)
    return root


def recipe_text(corpus: Path, out: Path, stages: str, model: str = 'preset = "debug"', tokenizer: str = "tok") -> str:
    return f"""
[run]
output = "{out}"
shards = "{corpus / 'shards'}"
tokenizer = "{corpus / tokenizer}"
seed = 0
val_fraction = 0.05
log_every = 5

[model]
{model}

{stages}
"""


CORE = """
[[stage]]
name = "core"
weights = { general = 0.6, code = 0.3, multilingual = 0.1 }
tokens = 12_800
seq_len = 64
batch_size = 8
lr = 3e-3
warmup = 0.1
checkpoint_every = 5
eval_every = 10
"""
