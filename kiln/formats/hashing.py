"""One content hash for files and directories: what shards record of their tokenizer,
what stage fingerprints record of a model, what names a file shipped to Spark workers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO, Callable

BLOCK = 1 << 20


def content_sha256(path: str | Path, opener: Callable[[str], BinaryIO] | None = None) -> str:
    """sha256 of a file's bytes; for a local directory, of every file's relative path and
    bytes (so a model retrained into the same directory gets a new hash). `opener` opens
    a file that is not local (kiln.curation.paths.open_binary for fsspec URLs)."""
    digest = hashlib.sha256()
    root = Path(path)
    if opener is None and root.is_dir():
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(root)).encode() + b"\0")
            _update(digest, open(f, "rb"))
    else:
        _update(digest, (opener or _open_local)(str(path)))
    return digest.hexdigest()


def _open_local(path: str) -> BinaryIO:
    return open(path, "rb")


def _update(digest, stream: BinaryIO) -> None:
    with stream as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
