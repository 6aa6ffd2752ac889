"""Extraction: raw HTML to main-content text with trafilatura.

Charset: the HTTP header's charset, then a `<meta charset>` in the page, then
cChardet's guess, each tried strictly; a page none of them decodes is dropped as
`undecodable`. trafilatura runs in datatrove's `ExtractorSandbox`, a child process
per Spark task that is killed and restarted when a page takes longer than the
timeout: regex backtracking inside lxml or `re` cannot be interrupted in-process.
The child dies with its Python worker: an orphan would keep the worker's socket to
the JVM open, and Spark would wait for that task forever.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import multiprocessing
import os
import re
import signal
import sys
from dataclasses import asdict, dataclass

import pyarrow as pa
from datatrove.pipeline.extractors.base import ExtractorSandbox

from kiln.config import ConfigError
from kiln.formats import schema
from kiln.curation.stage import Stage, columns, output_schema, set_columns

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
MIN_DETECT_CONFIDENCE = 0.5


@dataclass
class ExtractConfig:
    timeout_s: float = 5.0  # per-page extraction time limit; slower pages are dropped as extract_timeout
    favor_precision: bool = False  # trafilatura: prefer less text with less boilerplate
    favor_recall: bool = False  # trafilatura: prefer more text
    include_comments: bool = False  # trafilatura: keep user comment sections
    include_tables: bool = True  # trafilatura: keep table text
    deduplicate: bool = False  # trafilatura: drop repeated segments within a page

    def __post_init__(self):
        # 0 or less would drop every page as extract_timeout.
        if self.timeout_s <= 0:
            raise ConfigError(f"extract.timeout_s must be greater than 0, got {self.timeout_s}")

    def trafilatura_kwargs(self) -> dict:
        d = asdict(self)
        d.pop("timeout_s")
        return d


def _codec(name: str | bytes | None) -> str | None:
    if not name:
        return None
    if isinstance(name, bytes):
        name = name.decode("ascii", "ignore")
    try:
        return codecs.lookup(name.strip()).name
    except LookupError:
        return None


def decode_html(data: bytes, declared: str | None = None) -> tuple[str, str] | None:
    """(text, codec) for page bytes, or None when no candidate charset decodes them."""
    tried = []
    meta = META_CHARSET.search(data[:4096])
    for candidate in (declared, meta.group(1) if meta else None, "utf-8"):
        name = _codec(candidate)
        if name and name not in tried:
            tried.append(name)
            try:
                return data.decode(name), name
            except (UnicodeDecodeError, LookupError):
                pass
    import cchardet

    guess = cchardet.detect(data)
    name = _codec(guess.get("encoding"))
    if name and name not in tried and (guess.get("confidence") or 0) >= MIN_DETECT_CONFIDENCE:
        try:
            return data.decode(name), name
        except (UnicodeDecodeError, LookupError):
            pass
    return None


def extract_main_content(html: str, url: str | None = None, **options) -> tuple[str, str | None] | None:
    """trafilatura's main content and the page title; None when it finds no content."""
    import trafilatura

    if not html:
        return None
    doc = trafilatura.bare_extraction(html, url=url, with_metadata=True, **options)
    if doc is None or not doc.text:
        return None
    return doc.text, doc.title


class Sandbox(ExtractorSandbox):
    """datatrove's ExtractorSandbox whose child is killed when the process that forked
    it dies, even by SIGKILL (an executor lost, the kernel's OOM killer). The death signal
    follows the forking thread, not the process: use a sandbox from one thread."""

    def _ensure_process(self, extract_fn):
        # Under fork the child's parent is this process; under forkserver it is the server.
        self._fork_parent = os.getpid() if multiprocessing.get_start_method() == "fork" else None
        super()._ensure_process(extract_fn)

    def _worker(self, conn, extract_fn):
        _die_with_parent(self._fork_parent)
        super()._worker(conn, extract_fn)


def _die_with_parent(parent: int | None) -> None:
    """In a child: SIGKILL when the parent dies (Linux); exit now if it died already."""
    if not sys.platform.startswith("linux"):
        return  # no prctl outside Linux
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    # A parent killed between fork and prctl sent no signal; the orphan was re-parented.
    if parent is not None and os.getppid() != parent:
        os._exit(1)


class ExtractStage(Stage):
    """HTML (WARC / JSONL / Parquet) to main-content text with trafilatura.

    Reads WARC (.warc, .warc.gz), JSONL (.jsonl[.gz|.zst]) or Parquet pages (the [read]
    settings) and extracts the main content. Output columns: id, url, text, title,
    crawl_date, source, charset."""

    name = "extract"
    reads_raw = True  # the first stage of a pipeline over raw pages (the [read] settings)

    def __init__(self, cfg: ExtractConfig | None = None):
        self.cfg = cfg or ExtractConfig()

    def settings(self) -> dict:
        return asdict(self.cfg)

    def removed_fields(self) -> list[str]:
        return [schema.HTML]

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(schema.TEXT, pa.string()), pa.field(schema.TITLE, pa.string()),
                pa.field(schema.CHARSET, pa.string())]

    def process_partition(self, batches):
        import trafilatura  # noqa: F401 - imported before the sandbox forks, so the child starts warm
        from loguru import logger

        logger.disable("datatrove")  # the sandbox logs at INFO on every exit
        # One sandbox child for the whole partition: a fresh fork per batch starts cold.
        with Sandbox(timeout=self.cfg.timeout_s) as sandbox:
            for batch in batches:
                yield self.extract_batch(batch, sandbox)

    def extract_batch(self, batch: pa.RecordBatch, sandbox) -> pa.RecordBatch:
        data = columns(batch, [schema.HTML, schema.CHARSET, schema.TEXT, schema.URL, schema.DROP_REASON])
        texts, titles, charsets = list(data[schema.TEXT]), [None] * batch.num_rows, list(data[schema.CHARSET])
        reasons = list(data[schema.DROP_REASON])
        fn = functools.partial(_extract_or_error, **self.cfg.trafilatura_kwargs())
        for i, html in enumerate(data[schema.HTML]):
            if reasons[i] is not None or html is None:
                continue  # dropped by the reader, or a text-only input
            decoded = decode_html(html, charsets[i])
            if decoded is None:
                reasons[i] = "undecodable"
                continue
            page, charsets[i] = decoded
            try:
                result = sandbox.process_document((page, data[schema.URL][i]), fn)
            except TimeoutError:
                reasons[i] = "extract_timeout"
                continue
            except EOFError:  # the child died, e.g. out of memory on a pathological page
                reasons[i] = "extract_crashed"
                continue
            except Exception:  # noqa: BLE001 - trafilatura's own failure, re-raised from the child
                reasons[i] = "extract_error"
                continue
            if result is None:
                reasons[i] = "extract_empty"
            else:
                texts[i], titles[i] = result
        return set_columns(batch, output_schema(self, batch.schema), {
            schema.TEXT: texts, schema.TITLE: titles, schema.CHARSET: charsets, schema.DROP_REASON: reasons})


def _extract_or_error(html: str, url: str | None = None, **options):
    """Runs in the sandbox child. An exception is returned, not raised: the sandbox
    re-raises a returned exception in the parent at once, while a raised one kills
    the child and costs the full timeout before the parent notices."""
    try:
        return extract_main_content(html, url, **options)
    except Exception as e:  # noqa: BLE001
        return e
