"""Extraction: raw HTML to main-content text with trafilatura or resiliparse.

Engines (`[extract] engine`): trafilatura (the default; Llama 3's and FineWeb's
extractor) or resiliparse's main-content extraction, the C++ extractor DCLM ran over
its pool: 8 times faster per core inside this stage, and within 0.001 token F1 of
trafilatura on the demo sample (benchmarks/extraction_engines.py).

Charset: the HTTP header's charset, then a `<meta charset>` in the page, then
cChardet's guess, each tried strictly; a page none of them decodes is dropped as
`undecodable`. This is kiln's for both engines: resiliparse's own `bytes_to_str`
falls back to a lossy decode where kiln drops the page.

Either engine runs in datatrove's `ExtractorSandbox`, a child process per Spark task
that is killed and restarted when a page takes longer than the timeout: regex
backtracking inside lxml or `re` cannot be interrupted in-process, nor can
resiliparse's C++ main-content pass, which is quadratic in the nesting depth (20,000
nested `<div>`s, a 200 kB page, take it 7 s). The child dies with its Python worker:
an orphan would keep the worker's socket to the JVM open, and Spark would wait for
that task forever.
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
ENGINES = ("trafilatura", "resiliparse")
# resiliparse as DCLM ran it: main content only, no image alt texts; link targets, form
# fields and <noscript> stay out (resiliparse's defaults), line breaks are kept.
RESILIPARSE_OPTIONS = {"main_content": True, "alt_texts": False}
TRAFILATURA_ONLY = ("favor_precision", "favor_recall", "deduplicate")


@dataclass
class ExtractConfig:
    engine: str = "trafilatura"  # trafilatura | resiliparse (DCLM's C++ main-content extraction, ~8x faster)
    timeout_s: float = 5.0  # per-page extraction time limit; slower pages are dropped as extract_timeout
    favor_precision: bool = False  # trafilatura: prefer less text with less boilerplate
    favor_recall: bool = False  # trafilatura: prefer more text
    include_comments: bool = False  # keep user comment sections (resiliparse: its `comments`, on by default there)
    include_tables: bool = True  # keep table text (resiliparse: tables are skipped when off)
    deduplicate: bool = False  # trafilatura: drop repeated segments within a page

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ConfigError(f"extract.engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        # 0 or less would drop every page as extract_timeout.
        if self.timeout_s <= 0:
            raise ConfigError(f"extract.timeout_s must be greater than 0, got {self.timeout_s}")
        if self.engine != "trafilatura":
            # A setting the engine ignores would silently change nothing.
            for name in TRAFILATURA_ONLY:
                if getattr(self, name):
                    raise ConfigError(
                        f"extract.{name} applies to the trafilatura engine only (engine = {self.engine!r})")

    def trafilatura_kwargs(self) -> dict:
        d = asdict(self)
        d.pop("timeout_s")
        d.pop("engine")
        return d

    def resiliparse_kwargs(self) -> dict:
        return {**RESILIPARSE_OPTIONS, "comments": self.include_comments,
                "skip_elements": None if self.include_tables else ["table"]}

    def engine_kwargs(self) -> dict:
        """The options `extract_main_content` passes to the configured engine."""
        return self.trafilatura_kwargs() if self.engine == "trafilatura" else self.resiliparse_kwargs()


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


def extract_main_content(html: str, url: str | None = None, engine: str = "trafilatura",
                         **options) -> tuple[str, str | None] | None:
    """The engine's main content and the page title; None when it finds no content.
    `options` are the engine's own (ExtractConfig.engine_kwargs)."""
    if not html:
        return None
    if engine == "resiliparse":
        return resiliparse_main_content(html, **options)
    import trafilatura

    doc = trafilatura.bare_extraction(html, url=url, with_metadata=True, **options)
    if doc is None or not doc.text:
        return None
    return doc.text, doc.title


def resiliparse_main_content(html: str, **options) -> tuple[str, str | None] | None:
    """resiliparse's main-content text and the page's <title>; None for no text."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(html)
    text = extract_plain_text(tree, **options).strip()
    if not text:
        return None
    return text, (tree.title or "").strip() or None  # None without a <title>


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
    """HTML (WARC / JSONL / Parquet) to main-content text with trafilatura or resiliparse.

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
        # Imported before the sandbox forks, so the child starts warm.
        if self.cfg.engine == "resiliparse":
            import resiliparse.extract.html2text  # noqa: F401
        else:
            import trafilatura  # noqa: F401
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
        fn = functools.partial(_extract_or_error, engine=self.cfg.engine, **self.cfg.engine_kwargs())
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
            except Exception:  # noqa: BLE001 - the engine's own failure, re-raised from the child
                reasons[i] = "extract_error"
                continue
            if result is None:
                reasons[i] = "extract_empty"
            else:
                texts[i], titles[i] = result
        return set_columns(batch, output_schema(self, batch.schema), {
            schema.TEXT: texts, schema.TITLE: titles, schema.CHARSET: charsets, schema.DROP_REASON: reasons})


def _extract_or_error(html: str, url: str | None = None, engine: str = "trafilatura", **options):
    """Runs in the sandbox child. An exception is returned, not raised: the sandbox
    re-raises a returned exception in the parent at once, while a raised one kills
    the child and costs the full timeout before the parent notices."""
    try:
        return extract_main_content(html, url, engine, **options)
    except Exception as e:  # noqa: BLE001
        return e
