"""Input discovery and small driver-side files (stats.json), local or remote (fsspec)."""

from __future__ import annotations

import fsspec

from kiln.config import ConfigError

WARC_SUFFIXES = (".warc", ".warc.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = WARC_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


def detect_format(path: str) -> str:
    name = path.lower()
    for fmt, suffixes in (("warc", WARC_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    raise ConfigError(f"{path}: cannot tell the input format from the name; pass --format")


def expand_inputs(paths: list[str]) -> list[str]:
    """Files under the given paths (files, directories or globs), sorted.

    A path that matches nothing is an error naming it: a typo must not turn into an
    empty corpus that 'succeeds'.
    """
    if not paths:
        raise ConfigError("no input paths given")
    files: list[str] = []
    for path in paths:
        fs, root = fsspec.core.url_to_fs(path)
        protocol = "" if fs.protocol in ("file", ("file", "local")) else f"{_protocol(fs)}://"
        if any(ch in path for ch in "*?["):
            matched = sorted(fs.glob(root))
            if not matched:
                raise ConfigError(f"{path}: no input file matches this pattern")
            files.extend(protocol + m for m in matched if fs.isfile(m))
        elif fs.isdir(root):
            found = sorted(
                f for f in fs.find(root)
                if f.lower().endswith(KNOWN_SUFFIXES) and not _hidden(f[len(root):])
            )
            if not found:
                raise ConfigError(f"{path}: directory holds no WARC, JSONL or Parquet files")
            files.extend(protocol + f for f in found)
        elif fs.isfile(root):
            files.append(path if protocol else fs._strip_protocol(root))
        else:
            raise ConfigError(f"{path}: input path does not exist")
    return files


def document_files(inputs: list[str]) -> list[str]:
    """Like expand_inputs, but a kiln stage directory (stats.json beside docs/) stands
    for its kept documents, docs/."""
    resolved = []
    for p in inputs:
        docs = join(p, "docs")
        resolved.append(docs if exists(join(p, "stats.json")) and exists(docs) else p)
    return expand_inputs(resolved)


def _protocol(fs) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _hidden(rel: str) -> bool:
    # Spark's own convention: names starting with _ or . are metadata (_SUCCESS, _dropped/).
    return any(part.startswith(("_", ".")) for part in rel.split("/") if part)


def open_binary(path: str):
    """A seekable binary file. warcio reads empty payloads through fsspec's local file
    object, so local paths use the built-in open and remote ones a buffered reader."""
    fs, root = fsspec.core.url_to_fs(path)
    if _protocol(fs) in ("file", "local"):
        return open(root, "rb")
    import io

    return io.BufferedReader(fs.open(root, "rb"))


def open_lines(path: str):
    """A binary, line-iterable reader for plain, .gz or .zst files."""
    import io

    raw = open_binary(path)
    name = path.lower()
    if name.endswith(".gz"):
        import gzip

        return gzip.GzipFile(fileobj=raw)
    if name.endswith(".zst"):
        import zstandard

        # fsspec's zstd file cannot iterate lines; a buffered stream reader can.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                                           closefd=True))
    return raw


def write_text(path: str, text: str) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(fs._parent(root), exist_ok=True)
    with fs.open(root, "w") as f:
        f.write(text)


def read_text(path: str) -> str:
    with fsspec.open(path, "r") as f:
        return f.read()


def exists(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)


def list_dir(path: str) -> list[str] | None:
    """Names in a directory; None if `path` does not exist; a ConfigError if it is a file."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        return None
    if not fs.isdir(root):
        raise ConfigError(f"{path}: exists and is not a directory")
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))


def normalized(path: str) -> str:
    """A path for comparing locations: absolute for local paths, without a trailing slash."""
    if "://" in path and not path.startswith("file://"):
        return path.rstrip("/")
    import os

    return os.path.abspath(path.removeprefix("file://"))


def contains(outer: str, inner: str) -> bool:
    """Whether `inner` is `outer` or lies inside it."""
    a, b = normalized(outer), normalized(inner)
    return a == b or b.startswith(a.rstrip("/") + "/")


def remove(path: str) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def move(src: str, dst: str) -> None:
    """A rename on local disks and HDFS; a copy and delete on object stores."""
    fs, src_root = fsspec.core.url_to_fs(src)
    fs.mv(src_root, fsspec.core.url_to_fs(dst)[1], recursive=True)


def parquet_rows_by_dir(root: str) -> dict[str, int]:
    """Rows per immediate subdirectory of `root`, from the Parquet footers alone."""
    import pyarrow.parquet as pq

    fs, base = fsspec.core.url_to_fs(root)
    counts: dict[str, int] = {}
    for path in fs.find(base):
        rel = path[len(base.rstrip("/")) + 1:]
        if "/" not in rel or not path.endswith(".parquet") or _hidden(rel):
            continue
        with fs.open(path, "rb") as f:
            counts[rel.split("/", 1)[0]] = counts.get(rel.split("/", 1)[0], 0) + pq.ParquetFile(f).metadata.num_rows
    return counts


def unescape_partition(value: str) -> str:
    """Spark escapes partition values in directory names as %XX."""
    from urllib.parse import unquote

    return unquote(value)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])
