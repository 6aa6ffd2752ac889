"""Build the deterministic sample WARC that ``make demo`` curates.

The file imitates one Common Crawl WARC: a ``warcinfo`` record, then for every
capture a ``request``, a ``response`` and a ``metadata`` record.  The HTML
pages wrap *real* text found on the build machine in realistic site chrome
(navigation, sidebar, footer, cookie banner), so that every curation stage has
genuine work to do:

* extraction (trafilatura) must find the article among the boilerplate;
* language ID sees English, 15 other languages and non-UTF-8 encodings;
* quality filters (Gopher / C4 / FineWeb / Llama-3 style) meet spam, keyword
  stuffing, dirty words, log dumps, too-short and link-only pages;
* dedup stages meet URL variants, byte-identical copies, near duplicates and
  boilerplate lines shared by many pages;
* domain classifiers meet prose, code, maths and multilingual text.

Text sources, all read at build time (missing ones just give fewer pages):

* the Python standard library sources -> docstring prose, code listings and
  maths reference text;
* gettext catalogues in ``/usr/share/locale/*/LC_MESSAGES/*.mo`` ->
  multilingual prose (translated program messages);
* HTML manuals under ``/usr/share/doc`` -> article bodies;
* kiln's dirty-word list (``filters/dirty_words_en.txt``) -> adult spam.

Everything is derived from ``random.Random`` instances seeded from ``seed``
and a fixed name, file listings are sorted and WARC dates / record ids are
generated, so two builds with the same seed are byte-identical.

Usage::

    python -m kiln.curation.sample --out data/sample.warc.gz [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import gettext
import html
import io
import json
import math
import re
import struct
import sys
import sysconfig
import textwrap
import time
import unicodedata
import uuid
import zlib
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from email.utils import format_datetime
from fractions import Fraction
from pathlib import Path
from random import Random
from urllib.parse import urlsplit

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

#: How many pages of each kind to plant (fewer if a text source is short).
#: The shares follow the brief: prose ~45 %, code ~12 %, maths ~8 %,
#: multilingual ~15 %, and a long tail of things the pipeline must remove.
TARGETS: dict[str, int] = {
    "good_prose": 400,
    "code": 110,
    "math": 72,
    "multilingual": 135,
    "exact_duplicate": 40,
    "near_duplicate": 40,
    "url_variant": 25,
    "spam": 25,
    "too_short": 25,
    "dirty_words": 10,
    "log_dump": 10,
    "boilerplate_only": 15,
    "non_utf8": 15,
}
#: Of the good prose pages, this many come from /usr/share/doc HTML manuals.
DOC_HTML_PAGES = 60
#: This many prose pages get the SHARED_LINES below inside their article, so
#: that ccNet-style line dedup has lines repeated across many documents.
SHARED_LINE_PAGES = 60
SHARED_LINES = (
    "Subscribe to our newsletter for weekly updates.",
    "All trademarks are the property of their respective owners.",
    "If you found this article helpful, please share it with your colleagues.",
    "The views expressed here are those of the authors and do not necessarily "
    "reflect the views of the publisher.",
    "Found a mistake? Let us know through the contact form.",
    "This article may contain affiliate links.",
)

#: Languages for multilingual pages, in the order pages are dealt out.
LANGS = ("de", "fr", "es", "ru", "ja", "zh_CN", "ko", "pt_BR", "it", "pl",
         "uk", "sv", "tr", "nl", "cs")
#: Scripts without spaces between words: shorter sentences, joined without " ".
CJK_LANGS = ("ja", "zh_CN", "zh_TW", "ko")
LOCALE_DIR = Path("/usr/share/locale")
DOC_DIR = Path("/usr/share/doc")
#: Block elements kept from /usr/share/doc manual pages.
DOC_BLOCK_TAGS = ("h1", "h2", "h3", "h4", "p", "pre", "ul", "ol", "dl", "table", "blockquote")

#: (language, Python codec, label used in headers/meta, where it is declared)
#: "header": HTTP Content-Type only, "meta": <meta> only, "both", "none":
#: nowhere, so the pipeline has to detect the charset itself.
NON_UTF8_SPECS = (
    ("ru", "cp1251", "windows-1251", "header"),
    ("ru", "cp1251", "windows-1251", "meta"),
    ("uk", "cp1251", "windows-1251", "none"),
    ("ru", "koi8_r", "KOI8-R", "both"),
    ("ja", "shift_jis", "Shift_JIS", "header"),
    ("ja", "shift_jis", "Shift_JIS", "meta"),
    ("ja", "euc_jp", "EUC-JP", "none"),
    ("zh_CN", "gbk", "GBK", "meta"),
    ("zh_CN", "gb2312", "GB2312", "header"),
    ("zh_CN", "gbk", "GBK", "none"),
    ("de", "latin_1", "ISO-8859-1", "header"),
    ("fr", "latin_1", "ISO-8859-1", "meta"),
    ("de", "cp1252", "windows-1252", "none"),
    ("ko", "euc_kr", "EUC-KR", "meta"),
    ("pl", "iso8859_2", "ISO-8859-2", "both"),
)

#: Modules whose docs feed the maths pages (and are kept out of plain prose).
MATH_MODULES = ("math", "statistics", "fractions", "decimal", "cmath", "random")
MATH_SOURCE_FILES = {"statistics": "statistics.py", "fractions": "fractions.py",
                     "decimal": "_pydecimal.py", "random": "random.py"}
#: Stdlib directories that are not documentation-like library code.
STDLIB_SKIP_PARTS = ("test", "tests", "idle_test", "site-packages",
                     "__pycache__", "turtledemo", "__phello__")

#: Words of the docstring pages per page, before the next page is started.
PROSE_PAGE_WORDS = (250, 1000)
#: Near duplicates change between these fractions of the article's words,
#: spread evenly, so that MinHash sees a range of Jaccard similarities.
NEAR_DUP_CHANGE = (0.01, 0.30)
#: The oversized page must exceed this many bytes.
OVERSIZED_BYTES = 2 * 1024 * 1024 + 150_000

WARC_FILENAME = "KILN-SAMPLE-2024-00000.warc.gz"  # fixed: not the output name
CRAWL_START = datetime(2024, 1, 2, tzinfo=timezone.utc)
CRAWL_END = datetime(2024, 12, 30, 23, 59, 59, tzinfo=timezone.utc)
USER_AGENT = "KilnSampleBot/1.0 (+https://kiln-sample.test/bot; bot@kiln-sample.test)"

AUTHORS = ("Ada Lindqvist", "Tomasz Wrona", "Priya Raman", "Jonas Becker",
           "Mei Tanaka", "Carlos Ibarra", "Fatima Okafor", "Liam O'Connor",
           "Sofia Marchetti", "Noah Feldman", "Aylin Demir", "Erik Halvorsen")

#: Headlines that fill sidebars and "related" boxes (boilerplate, not content).
FILLER_HEADLINES = (
    "Ten tips for faster builds", "Why we moved our CI to containers",
    "A gentle introduction to type hints", "Profiling memory in long-running services",
    "What's new this quarter", "Designing APIs people enjoy using",
    "How we review pull requests", "Lessons from a week of on-call",
    "Reading large CSV files efficiently", "Testing strategies that scale",
    "Our favourite command-line tools", "Understanding Unicode normalisation",
    "Logging best practices", "When to reach for a database index",
    "Packaging Python projects in 2024", "Caching without tears",
    "A beginner's guide to regular expressions", "Debugging flaky tests",
    "Interview: maintaining an open-source library", "The cost of premature abstraction",
)
TAGS = ("python", "tutorial", "performance", "testing", "security", "data",
        "web", "devops", "linux", "databases", "career", "open-source", "math",
        "networking", "tooling")
CITIES = ("London", "Berlin", "Austin", "Toronto", "Sydney", "Dublin", "Madrid",
          "Chicago", "Denver", "Boston", "Seattle", "Miami")

SPAM_KEYWORDS = ("cheap watches", "replica handbags", "payday loans",
                 "casino bonus", "weight loss pills", "cheap flights",
                 "crypto signals", "discount sneakers", "best vpn deal",
                 "free followers", "car insurance quotes", "diet tea")
SPAM_TEMPLATES = (
    "Buy {kw} online at the best price!",
    "Best {kw} deals, cheap {kw}, discount {kw}, {kw} sale.",
    "Looking for {kw}? We have the best {kw} at the lowest price guaranteed.",
    "{KW} {KW} {KW} - order now and save 90%!",
    "Click here for {kw}. Cheap {kw}. Best price {kw}. Free shipping on {kw}.",
    "Top 10 {kw} 2024 best price buy now cheap {kw} online.",
    "{KW} best price, {kw} best quality, {kw} best service, buy {kw} today.",
    "Limited offer: cheap {kw} and {kw2} at the best price in {city}.",
)
#: Only these (mild) entries of the installed profanity list are used: the
#: pages need a few dirty-word hits, not the worst words of the list.
MILD_DIRTY_WORDS = ("nude", "naked", "porn", "xxx", "horny", "erotic", "booty",
                    "busty", "kinky", "playboy", "boobs", "damn", "crap", "sex")
DIRTY_TEMPLATES = (
    "Hot {w} chat tonight, free videos for everyone.",
    "Click here for free {w} pictures and live cams.",
    "The best {w} site online, totally free, join now!",
    "Wild {w} party pics from {city}, uncensored.",
    "Free access today only, best {w} content on the web.",
)
CHAT_SPAM = (
    "Meet lonely singles near {city} right now, no signup needed.",
    "Bored? Chat with real people now, 100% free, no credit card.",
    "Thousands of members online in {city} tonight.",
    "Join now and get 500 free credits, limited time offer!",
    "Download our app for free and start chatting in seconds.",
)
LOG_TEMPLATES = (
    "ERROR [worker-{w}] connection reset by peer while reading response header from upstream 10.{a}.{b}.{c}:{port}",
    "ERROR [worker-{w}] connection reset by peer while sending request to upstream 10.{a}.{b}.{c}:{port}",
    "WARN  [scheduler] task {task} exceeded soft deadline of {ms} ms, retrying ({r}/5)",
    "INFO  [http-{w}] GET /api/v2/items/{id} 200 {ms}ms",
    "INFO  [http-{w}] POST /api/v2/orders 201 {ms}ms",
    "ERROR [worker-{w}] upstream timed out (110: Connection timed out) while connecting to upstream",
    "DEBUG [pool] acquired connection {cid} from pool (active={act}, idle={idle})",
    "INFO  [gc] pause {ms}ms, heap {heap}MB -> {heap2}MB",
    "ERROR [db] deadlock detected while updating table orders; transaction {tx} rolled back",
    "WARN  [health] readiness probe failed: HTTP probe failed with statuscode: 503",
)


@dataclass(frozen=True)
class Site:
    """A fictional web site: host, look (layout) and URL scheme."""

    host: str
    name: str
    tagline: str
    layout: str  # "semantic" | "divs" | "table"
    server: str
    sections: tuple[str, ...]
    url_style: str = "flat"  # flat | dated | query | lang
    scheme: str = "https"
    ct_case: str = "utf-8"  # spelling of the charset in the HTTP header


# Reserved .example / .test hosts, so nothing here points at a real site.
SITES: dict[str, Site] = {
    "docs": Site("docs.pyref.example", "PyRef Docs",
                 "Community notes on the Python standard library", "semantic",
                 "nginx/1.24.0", ("library", "howto", "reference", "tutorial")),
    "blog": Site("blog.kiln-sample.test", "Kiln Sample Blog",
                 "Notes from a small engineering team", "divs",
                 "Apache/2.4.58 (Debian)", ("posts", "engineering", "notes"),
                 url_style="dated", ct_case="UTF-8"),
    "wiki": Site("wiki.opencorpus.example", "OpenCorpus Wiki",
                 "The free reference anyone can edit", "semantic",
                 "nginx/1.22.1", ("wiki",)),
    "news": Site("news.daily-ledger.example", "The Daily Ledger",
                 "Technology news and analysis", "divs", "cloudflare",
                 ("tech", "science", "business", "culture"), url_style="dated"),
    "forum": Site("forum.devtalk.test", "DevTalk Forum",
                  "Questions and answers for developers", "table",
                  "Apache/2.2.34", ("showthread",), url_style="query",
                  scheme="http", ct_case="UTF-8"),
    "math": Site("learn.mathhaven.test", "MathHaven",
                 "Step-by-step mathematics lessons", "semantic", "nginx/1.25.3",
                 ("lessons", "algebra", "statistics", "calculus", "number-theory")),
    "code": Site("code.snippetvault.example", "SnippetVault",
                 "Readable source code, explained", "divs", "gunicorn",
                 ("snippets", "python", "stdlib")),
    "intl": Site("world.polyglot-press.example", "Polyglot Press",
                 "International edition", "semantic", "nginx/1.24.0",
                 ("news", "tech", "guide"), url_style="lang"),
    "retro": Site("www.retro-portal.test", "Retro Portal", "Online since 1999",
                  "table", "Microsoft-IIS/6.0", ("pages", "archiv"),
                  scheme="http"),
    "shop": Site("deals.bargain-outlet.test", "Bargain Outlet Deals",
                 "Best prices every day", "divs", "openresty",
                 ("deals", "offers", "top"), scheme="http"),
    "adult": Site("www.hot-chat-zone.test", "HotChatZone", "Free chat 24/7",
                  "divs", "nginx", ("free", "chat"), scheme="http"),
    "ops": Site("status.logpile.test", "LogPile Status", "Public service logs",
                "semantic", "Caddy", ("logs", "incidents")),
    "portal": Site("www.linkportal.example", "LinkPortal",
                   "Your gateway to the web", "table", "nginx",
                   ("directory", "tags", "category")),
    "data": Site("data.opensensors.example", "OpenSensors Data",
                 "Raw measurements, published daily", "semantic", "nginx",
                 ("archive",)),
}
#: Hosts of byte-identical copies (their template is the copied one).
MIRROR_HOSTS = ("mirror.archive-copy.example", "cache.webmirror.test")
#: Sites that host ordinary prose pages, with weights.
PROSE_SITES = (("docs", 4), ("wiki", 2), ("blog", 2), ("news", 1), ("forum", 1))

# Small valid PNG is built in _png_bytes(); this is a stand-in PDF body.
FAKE_PDF = (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\n"
            b"endobj\n2 0 obj\n<< /Type /Pages /Kids [] /Count 0 >>\nendobj\n"
            b"trailer\n<< /Root 1 0 R >>\n%%EOF\n")


# --------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------

@dataclass
class Page:
    """One capture.  ``blocks`` is the article as (tag, payload) pairs."""

    kind: str
    title: str
    blocks: list
    site: Site
    url: str = ""
    lang: str = "en"
    author: str = ""
    date: datetime | None = None
    status: int = 200
    codec: str = "utf-8"         # Python codec used to encode the HTML
    charset: str = "utf-8"       # label written in header / meta
    charset_in_header: bool = True
    charset_in_meta: bool = True
    canonical: str = ""
    body: bytes | None = None    # rendered bytes (or non-HTML payload)
    content_type: str = ""       # for non-HTML payloads
    family: int = -1             # id shared by a page and its copies
    section: str = ""
    slug: str = ""


def _rng(seed: int, name: str) -> Random:
    """An independent RNG per purpose, so adding a page kind does not shift
    the random stream of the others (str seeds are hashed with SHA-512)."""
    return Random(f"kiln-sample:{seed}:{name}")


def _words(text: str) -> int:
    return len(text.split())


def _esc(text: str) -> str:
    return html.escape(text, quote=False)


def _attr(text: str) -> str:
    return html.escape(text, quote=True)


def _slugify(text: str, fallback: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = "-".join(slug.split("-")[:8])
    return slug if len(slug) >= 4 else fallback


def _block_text(blocks: list) -> str:
    """Plain text of an article's prose blocks (for descriptions / counts)."""
    out = []
    for tag, payload in blocks:
        if tag in ("p", "h2", "h3"):
            out.append(payload)
        elif tag == "ul":
            out.extend(payload)
    return " ".join(out)


# --------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------

_RST_ROLE = re.compile(r":[a-zA-Z:]+:`~?!?([^`<]+?)(?:\s*<[^>]*>)?`")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_UNDERLINE = re.compile(r"[-=~^*#]{3,}")
_RST_TABLE = re.compile(r"=+( +=+)+")


def _clean_rst(text: str) -> str:
    text = _RST_ROLE.sub(r"\1", text)
    text = _RST_LITERAL.sub(r"\1", text)
    return text.replace("`", "")


def _doc_blocks(doc: str) -> list:
    """Turn a docstring into article blocks: paragraphs, lists, code."""
    blocks: list = []
    for para in re.split(r"\n\s*\n", _clean_rst(doc)):
        lines = [ln.rstrip() for ln in para.splitlines() if ln.strip()]
        if not lines:
            continue
        # Split "Example:\n>>> code" into prose + code.
        cut = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith(">>>")), None)
        if cut is None and len(lines) > 1 and all(ln.startswith((" ", "\t")) for ln in lines):
            cut = 0
        if cut is not None:
            if cut:
                blocks.append(("p", " ".join(ln.strip() for ln in lines[:cut])))
            blocks.append(("pre", textwrap.dedent("\n".join(lines[cut:]))))
            continue
        if len(lines) >= 2 and _RST_UNDERLINE.fullmatch(lines[1].strip()):
            blocks.append(("h3", lines[0].strip()))
            lines = lines[2:]
            if not lines:
                continue
        if any(_RST_TABLE.fullmatch(ln.strip()) for ln in lines):  # reST table
            blocks.append(("pre", textwrap.dedent("\n".join(lines))))
            continue
        if re.match(r"\s*[-*] ", lines[0]):
            items = re.split(r"\n\s*[-*] ", "\n" + "\n".join(lines))
            items = [" ".join(i.split()) for i in items if i.strip()]
            blocks.append(("ul", items))
            continue
        blocks.append(("p", " ".join(ln.strip() for ln in lines)))
    return blocks


@dataclass
class ModuleInfo:
    relpath: str
    name: str
    doc: str
    sections: list  # [(heading, docstring)]
    source: str
    functions: list  # [(qualname, first_line, last_line, docstring)]


def _stdlib_modules() -> list[ModuleInfo]:
    """Parse every documentation-like .py file of the standard library."""
    try:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py")
                       if not any(part in STDLIB_SKIP_PARTS for part in p.relative_to(root).parts))
    except (OSError, KeyError):
        return []
    mods = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        name = rel[:-3].replace("/", ".")
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        sections, functions = [], []

        def visit(body, prefix: str) -> None:
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qual = f"{prefix}{node.name}"
                    doc = ast.get_docstring(node) or ""
                    private = node.name.startswith("_") and node.name != "__init__"
                    if isinstance(node, ast.ClassDef):
                        if doc and _words(doc) >= 25 and not private:
                            sections.append((f"class {qual}", doc))
                        visit(node.body, qual + ".")
                    else:
                        if doc and _words(doc) >= 25 and not private:
                            sections.append((f"{qual}()", doc))
                        functions.append((qual, node.lineno, node.end_lineno or node.lineno, doc))

        visit(tree.body, "")
        mods.append(ModuleInfo(rel, name, ast.get_docstring(tree) or "", sections, source, functions))
    return mods


def _catalog_sentences(lang: str) -> list[tuple[str, str]]:
    """Long translated sentences of one locale as (domain, sentence) pairs.

    Program messages are short; keep only full sentences without format
    placeholders or option syntax so the pages read as prose.
    """
    cjk = lang in CJK_LANGS
    min_len = 22 if cjk else 60
    seen: dict[str, str] = {}
    for path in sorted((LOCALE_DIR / lang / "LC_MESSAGES").glob("*.mo")):
        try:
            with open(path, "rb") as fh:
                catalog = gettext.GNUTranslations(fh)._catalog
        except (OSError, ValueError, UnicodeDecodeError, struct.error):
            continue
        for key, value in catalog.items():
            msgid = key[0] if isinstance(key, tuple) else key
            if not isinstance(value, str) or not msgid or value == msgid:
                continue
            text = value.strip().replace("\n", "" if cjk else " ")
            if (len(text) < min_len or any(c in text for c in "%{}<>\\\t_=|$@")
                    or "--" in text or "  " in text or text[-1] not in ".!?。！？"):
                continue
            if sum(ch.isalpha() for ch in text) / len(text) < 0.7:
                continue
            seen.setdefault(text, path.stem)
    return [(domain, text) for text, domain in seen.items()]


def _doc_html_articles() -> list[tuple[str, str, str]]:
    """(title, inner HTML, path) of prose-rich manual pages in /usr/share/doc."""
    try:
        import lxml.html  # a trafilatura dependency
    except ImportError:
        return []
    try:
        paths = sorted(DOC_DIR.rglob("*.html"))
    except OSError:
        return []
    drop = ("script", "style", "nav", "header", "footer", "form", "iframe",
            "noscript", "link", "meta", "button", "input", "img")
    out = []
    for path in paths:
        if path.name in ("all.html", "index.html", "Index.html") or "APIchunk" in path.name:
            continue
        try:
            if path.stat().st_size > 600_000:
                continue
            doc = lxml.html.document_fromstring(path.read_bytes())
        except (OSError, ValueError, lxml.etree.ParserError):
            continue
        title = " ".join((doc.findtext(".//title") or "").split())
        main = None
        for ident in ("apicontent", "content", "main"):
            found = doc.xpath(f'//*[@id="{ident}"]')
            if found:
                main = found[0]
                break
        if main is None:
            main = doc.body if doc.find("body") is not None else doc
        for el in list(main.iter(*drop)):
            if el.getparent() is not None:
                el.drop_tree()
        for el in main.xpath('.//*[@id="toc" or @id="column2" or contains(@class,"navheader") '
                             'or contains(@class,"navfooter") or contains(@class,"toc") '
                             'or contains(@class,"nav-panel")]'):
            if el.getparent() is not None:
                el.drop_tree()
        paras = [" ".join(p.text_content().split()) for p in main.iter("p")]
        prose = sum(len(p) for p in paras if len(p) > 80)
        pre = sum(len(p.text_content()) for p in main.iter("pre"))
        # Want prose: not <pre> dumps, nor whole text files in one <p> (valgrind's dist.*).
        if (prose < 1500 or pre > prose or max(map(len, paras)) > 5000 or not title
                or main.xpath('.//*[contains(@class, "literallayout")]')):
            continue
        # Flatten to top-level blocks (manuals nest everything in <div>s) and
        # stop at ~50 kB so that pages keep a realistic size.
        parts, size = [], 0
        for el in main.iter(*DOC_BLOCK_TAGS):
            outer = el.getparent()
            while outer is not None and outer is not main and outer.tag not in DOC_BLOCK_TAGS:
                outer = outer.getparent()
            if (outer is not None and outer is not main) or "nav" in (el.get("class") or ""):
                continue
            frag = lxml.html.tostring(el, encoding="unicode", with_tail=False)
            parts.append(frag)
            size += len(frag)
            if size > 50_000:
                break
        out.append((title, "\n".join(parts), str(path)))
    return out


def _dirty_words() -> list[str]:
    from kiln.curation.filters.llama3 import load_word_list

    listed = load_word_list()
    return [w for w in MILD_DIRTY_WORDS if w in listed]


def _math_docs(mods_by_name: dict[str, ModuleInfo]) -> dict[str, list[tuple[str, str]]]:
    """(name, docstring) reference entries for each maths module."""
    out: dict[str, list[tuple[str, str]]] = {}
    for mod in ("math", "cmath"):  # C modules: no source, use runtime docs
        module = __import__(mod)
        entries = []
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            doc = getattr(obj, "__doc__", None)
            if name.startswith("_") or not callable(obj) or not doc:
                continue
            entries.append((f"{mod}.{name}()", " ".join(doc.split("\n\n", 1)[-1].split())
                            if doc.startswith(name + "(") else " ".join(doc.split())))
        out[mod] = entries
    for mod, fname in MATH_SOURCE_FILES.items():
        info = next((m for m in mods_by_name.values() if m.relpath == fname), None)
        if info is None:
            out[mod] = []
            continue
        entries = [(f"{mod}.{h.replace('class ', '')}", d) for h, d in info.sections]
        if info.doc:
            entries.insert(0, (mod, info.doc))
        out[mod] = entries
    return out


# --------------------------------------------------------------------------
# HTML templates
# --------------------------------------------------------------------------

COOKIE_TEXTS = (
    "This website uses cookies to ensure you get the best experience on our website.",
    "This website uses cookies to improve your experience. By continuing to browse the "
    "site you agree to our use of cookies.",
    "This website uses cookies for analytics and personalised content. You can change "
    "your preferences at any time.",
)
NAV_GROUPS = (
    ("Home", ()),
    ("Articles", ("Latest", "Popular", "Editor's picks", "Archive")),
    ("Topics", ("Python", "Data", "Web", "DevOps", "Security")),
    ("Guides", ("Getting started", "Cheat sheets", "Reference", "Videos")),
    ("Community", ("Forum", "Events", "Meetups", "Code of conduct")),
    ("Resources", ("Downloads", "Books", "Podcasts", "Newsletter")),
    ("About", ("Team", "Careers", "Press", "Contact")),
)
FOOTER_COLUMNS = (
    ("Company", ("About us", "Careers", "Press", "Advertise", "Contact")),
    ("Resources", ("Blog", "Documentation", "Tutorials", "Newsletter", "RSS feed")),
    ("Legal", ("Privacy Policy", "Terms of Service", "Cookie Settings", "Imprint", "Accessibility")),
    ("Follow us", ("Twitter", "Mastodon", "GitHub", "YouTube", "LinkedIn")),
)


def _href(label: str) -> str:
    return "/" + _slugify(label, "page") + "/"


def _nav_html(site: Site, cls: str) -> str:
    items = []
    for label, subs in NAV_GROUPS:
        sub = "".join(f'<li><a href="{_href(label)}{_slugify(s, "x")}/">{_esc(s)}</a></li>' for s in subs)
        items.append(f'<li class="menu-item"><a href="{_href(label) if label != "Home" else "/"}">'
                     f'{_esc(label)}</a>' + (f'<ul class="sub-menu">{sub}</ul>' if sub else "") + "</li>")
    for section in site.sections:
        items.append(f'<li class="menu-item"><a href="/{section}/">{_esc(section.replace("-", " ").title())}</a></li>')
    return f'<nav class="{cls}" aria-label="Main menu"><ul>{"".join(items)}</ul></nav>'


def _footer_html(site: Site, year: int) -> str:
    cols = []
    for head, links in FOOTER_COLUMNS:
        lis = "".join(f'<li><a href="{_href(x)}">{_esc(x)}</a></li>' for x in links)
        cols.append(f'<div class="footer-col"><h4>{_esc(head)}</h4><ul>{lis}</ul></div>')
    return (f'<div class="footer-columns">{"".join(cols)}</div>'
            f'<p class="copyright">&copy; {year} {_esc(site.name)}. All rights reserved. '
            f'<a href="/privacy/">Privacy Policy</a> | <a href="/terms/">Terms of Use</a> | '
            f'<a href="/sitemap.xml">Sitemap</a></p>')


def _sidebar_html(rng: Random) -> str:
    heads = rng.sample(FILLER_HEADLINES, 6)
    popular = "".join(f'<li><a href="/posts/{_slugify(h, "post")}/">{_esc(h)}</a></li>' for h in heads)
    tags = " ".join(f'<a class="tag" href="/tags/{t}/">{t}</a>' for t in rng.sample(TAGS, 8))
    return (f'<div class="widget"><h3>Popular posts</h3><ul>{popular}</ul></div>'
            f'<div class="widget"><h3>Tags</h3><p class="tag-cloud">{tags}</p></div>'
            '<div class="widget newsletter"><h3>Newsletter</h3><p>Get the best articles in '
            'your inbox.</p><form action="/subscribe"><input type="email" name="email" '
            'placeholder="you@example.com"><button>Sign up</button></form></div>')


def _blocks_html(blocks: list) -> str:
    out = []
    for tag, payload in blocks:
        if tag == "p":
            out.append(f"<p>{_esc(payload)}</p>")
        elif tag in ("h2", "h3"):
            out.append(f"<{tag}>{_esc(payload)}</{tag}>")
        elif tag == "pre":
            out.append(f"<pre>{_esc(payload)}</pre>")
        elif tag == "code":
            out.append(f'<pre><code class="language-python">{_esc(payload)}</code></pre>')
        elif tag == "ul":
            out.append("<ul>" + "".join(f"<li>{_esc(i)}</li>" for i in payload) + "</ul>")
        elif tag == "links":
            out.append('<ul class="link-list">' + "".join(
                f'<li><a href="{_attr(h)}">{_esc(t)}</a></li>' for h, t in payload) + "</ul>")
        elif tag == "table":
            rows = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>"
                           for row in payload[1:])
            head = "".join(f"<th>{_esc(c)}</th>" for c in payload[0])
            out.append(f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')
        elif tag == "raw":
            out.append(payload)
    return "\n".join(out)


def render(page: Page, rng: Random) -> str:
    """Wrap the article in one of three site layouts with lots of chrome."""
    site = page.site
    date = page.date or CRAWL_START
    published = date - timedelta(days=rng.randint(1, 400), hours=rng.randint(0, 23))
    text = _block_text(page.blocks)
    desc = " ".join(text.split()[:30])
    minutes = max(1, _words(text) // 220)
    head_meta = []
    if page.charset_in_meta:
        head_meta.append(f'<meta http-equiv="Content-Type" content="text/html; charset={page.charset}">'
                         if site.layout == "table" else f'<meta charset="{page.charset}">')
    head_meta += [
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(page.title)} | {_esc(site.name)}</title>",
        f'<meta name="description" content="{_attr(desc)}">',
        f'<meta name="author" content="{_attr(page.author)}">' if page.author else "",
        f'<meta property="og:title" content="{_attr(page.title)}">',
        f'<meta property="og:site_name" content="{_attr(site.name)}">',
        f'<meta property="article:published_time" content="{published:%Y-%m-%dT%H:%M:%SZ}">',
        f'<link rel="canonical" href="{_attr(page.canonical or page.url)}">',
        f'<link rel="stylesheet" href="/static/css/main.{rng.getrandbits(32):08x}.css">',
    ]
    head = "\n".join(m for m in head_meta if m)
    cookie = (f'<div id="cookie-consent" class="cookie-banner"><p>{_esc(rng.choice(COOKIE_TEXTS))} '
              '<a href="/cookie-policy/">Learn more</a></p><button class="accept">Accept all</button> '
              '<button class="settings">Cookie settings</button></div>')
    byline = (f'By <a rel="author" href="/authors/{_slugify(page.author, "staff")}/">{_esc(page.author)}</a> '
              f'&middot; <time datetime="{published:%Y-%m-%d}">{published:%B %d, %Y}</time> '
              f'&middot; {minutes} min read') if page.author else f'<time datetime="{published:%Y-%m-%d}">{published:%Y-%m-%d}</time>'
    section = page.section or site.sections[0]
    crumbs = (f'<a href="/">Home</a> &rsaquo; <a href="/{section}/">{_esc(section.title())}</a> '
              f'&rsaquo; <span>{_esc(page.title)}</span>')
    body = _blocks_html(page.blocks)
    sidebar = _sidebar_html(rng)
    related = "".join(f'<li><a href="/posts/{_slugify(h, "post")}/">{_esc(h)}</a></li>'
                      for h in rng.sample(FILLER_HEADLINES, 4))
    share = ('<div class="share">Share this: <a href="#">Twitter</a> <a href="#">Facebook</a> '
             '<a href="#">LinkedIn</a> <a href="#">Email</a></div>')
    footer = _footer_html(site, date.year)
    lang = page.lang.split("_")[0]

    if site.layout == "semantic":
        page_html = f"""<!DOCTYPE html>
<html lang="{lang}">
<head>
{head}
</head>
<body class="page-article">
{cookie}
<header class="site-header"><a class="logo" href="/">{_esc(site.name)}</a><p class="tagline">{_esc(site.tagline)}</p>
{_nav_html(site, "main-nav")}
<form class="search" action="/search" role="search"><input type="search" name="q" placeholder="Search"><button>Search</button></form>
</header>
<div class="breadcrumbs">{crumbs}</div>
<div class="layout">
<main id="main-content">
<article class="post">
<h1 class="entry-title">{_esc(page.title)}</h1>
<p class="byline">{byline}</p>
<div class="entry-content">
{body}
</div>
{share}
</article>
<section class="related"><h3>Related articles</h3><ul>{related}</ul></section>
</main>
<aside class="sidebar">{sidebar}</aside>
</div>
<footer class="site-footer">{footer}</footer>
<script src="/static/js/app.js" defer></script>
</body>
</html>
"""
    elif site.layout == "divs":
        page_html = f"""<!DOCTYPE html>
<html lang="{lang}">
<head>
{head}
</head>
<body>
<div id="wrapper">
<div id="header"><div class="logo"><a href="/">{_esc(site.name)}</a></div><div class="slogan">{_esc(site.tagline)}</div></div>
<div id="menu">{_nav_html(site, "menu")}</div>
<div id="container">
<div id="content">
<div class="post">
<h1 class="post-title">{_esc(page.title)}</h1>
<div class="post-meta">{byline} | <a href="/{section}/">{_esc(section)}</a></div>
<div class="post-content">
{body}
</div>
{share}
</div>
<div id="comments"><h3>Leave a comment</h3><form action="/comment"><textarea name="c"></textarea><button>Post comment</button></form></div>
<div class="related-posts"><h3>You might also like</h3><ul>{related}</ul></div>
</div>
<div id="sidebar">{sidebar}</div>
</div>
<div id="footer">{footer}</div>
</div>
{cookie}
</body>
</html>
"""
    else:  # "table": an old-school layout (also used by the non-UTF-8 pages)
        page_html = f"""<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01 Transitional//EN">
<html lang="{lang}">
<head>
{head}
</head>
<body bgcolor="#ffffff">
<table width="100%" cellpadding="4" class="top"><tr><td class="logo"><a href="/">{_esc(site.name)}</a></td><td class="slogan">{_esc(site.tagline)}</td></tr></table>
{cookie}
<table width="100%" class="main"><tr>
<td valign="top" width="200" class="navcol">{_nav_html(site, "leftnav")}{sidebar}</td>
<td valign="top" class="content">
<div class="crumbs">{crumbs}</div>
<h1>{_esc(page.title)}</h1>
<div class="postinfo">{byline}</div>
<div class="postbody">
{body}
</div>
<div class="related"><b>Related:</b><ul>{related}</ul></div>
</td></tr></table>
<div class="footer">{footer}</div>
</body>
</html>
"""
    return page_html


# --------------------------------------------------------------------------
# Page kinds
# --------------------------------------------------------------------------

def _pick_site(rng: Random, choices=PROSE_SITES) -> Site:
    names = [n for n, w in choices for _ in range(w)]
    return SITES[rng.choice(names)]


def prose_pages(mods: list[ModuleInfo], doc_articles: list, rng: Random) -> list[Page]:
    """Kind 1: English prose from docstrings, plus manual pages' HTML."""
    forms = ("{mod} — {summary}", "Understanding the {mod} module", "{summary} ({mod})",
             "Notes on {mod}: {summary}", "A tour of the {mod} module", "{mod} explained")
    candidates: list[Page] = []
    for mod in mods:
        top = mod.name.split(".")[0]
        if mod.name.startswith("_") or top in ("idlelib", "lib2to3", "distutils") or top in MATH_MODULES:
            continue
        sections = ([("", mod.doc)] if _words(mod.doc) >= 20 else []) + mod.sections
        pages_secs: list[list] = [[]]
        count = 0
        for sec in sections:
            pages_secs[-1].append(sec)
            count += _words(sec[1])
            if count >= PROSE_PAGE_WORDS[0] and count >= rng.randint(*PROSE_PAGE_WORDS):
                pages_secs.append([])
                count = 0
        if count < 130 and len(pages_secs) > 1:  # fold a short tail into the previous page
            tail = pages_secs.pop()
            pages_secs[-1].extend(tail)
        summary = (mod.doc.strip().split("\n")[0].strip().rstrip(".") if mod.doc
                   else f"{mod.name} library reference")[:90]
        for part, secs in enumerate(pages_secs, 1):
            if sum(_words(d) for _, d in secs) < 130:
                continue
            blocks: list = []
            for heading, doc in secs:
                if heading:
                    blocks.append(("h2", heading))
                blocks.extend(_doc_blocks(doc))
            title = rng.choice(forms).format(mod=mod.name, summary=summary)
            if part > 1:
                title += f" (part {part})"
            candidates.append(Page("good_prose", title, blocks, _pick_site(rng), section="library"))
    n_doc = min(DOC_HTML_PAGES, len(doc_articles))
    n_docstring = min(TARGETS["good_prose"] - n_doc, len(candidates))
    pages = rng.sample(candidates, n_docstring)
    for title, inner, _path in rng.sample(doc_articles, n_doc):
        pages.append(Page("good_prose", title, [("raw", inner)], _pick_site(rng, (("docs", 3), ("wiki", 1))),
                          section="manuals"))
    return pages


def code_pages(mods: list[ModuleInfo], rng: Random) -> list[Page]:
    """Kind 2: source listings (whole small modules or a few functions)."""
    pool = [m for m in mods if len(m.functions) >= 3 and not m.name.startswith("_")
            and "idlelib" not in m.name]
    pages = []
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for mod in rng.sample(pool, min(TARGETS["code"], len(pool))):
        intro = _doc_blocks(mod.doc)[:2] if mod.doc else []
        intro = [b for b in intro if b[0] == "p"]
        blocks: list = list(intro)
        lines = mod.source.splitlines()
        if len(mod.source) < 7000:
            title = f"Full source of {mod.relpath} (Python {version})"
            blocks.append(("p", f"Below is the complete source of {mod.relpath} as shipped with "
                                f"Python {version}. It is {len(lines)} lines long."))
            blocks.append(("code", mod.source.strip("\n")))
        else:
            funcs = [f for f in mod.functions if 5 <= f[2] - f[1] <= 60]
            if len(funcs) < 2:
                funcs = mod.functions[:3]
            chosen = sorted(rng.sample(funcs, min(len(funcs), rng.randint(3, 5))), key=lambda f: f[1])
            names = ", ".join(f[0] for f in chosen)
            title = f"{mod.name}: how {chosen[0][0]} and friends are implemented"
            blocks.append(("p", f"This listing walks through {len(chosen)} functions from "
                                f"{mod.relpath} in the Python {version} standard library: {names}."))
            for qual, first, last, doc in chosen:
                blocks.append(("h2", f"{qual}()"))
                if doc:
                    blocks.append(("p", " ".join(_clean_rst(doc).split("\n\n")[0].split())))
                blocks.append(("code", textwrap.dedent("\n".join(lines[first - 1:last]))))
        site = _pick_site(rng, (("code", 3), ("docs", 1), ("blog", 1), ("forum", 1)))
        pages.append(Page("code", title, blocks, site, section="python"))
    return pages


# ---- maths -----------------------------------------------------------------

def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}".rstrip("0").rstrip(".")


def _ex_variance(r: Random) -> tuple[str, list[str]]:
    xs = [r.randint(1, 30) for _ in range(r.randint(5, 8))]
    n, total = len(xs), sum(xs)
    mu = Fraction(total, n)
    sq = [(x - mu) ** 2 for x in xs]
    ss = sum(sq)
    var = ss / n
    return "Variance and standard deviation", [
        f"Consider the data set x = ({', '.join(map(str, xs))}). Its mean is "
        f"μ = ({' + '.join(map(str, xs))})/{n} = {total}/{n} ≈ {_fmt(float(mu))}.",
        f"The squared deviations (x − μ)² are {', '.join(_fmt(float(s), 3) for s in sq)}, so their "
        f"sum is Σ(x − μ)² ≈ {_fmt(float(ss), 3)}. The population variance is therefore "
        f"σ² = Σ(x − μ)²/n ≈ {_fmt(float(ss), 3)}/{n} ≈ {_fmt(float(var))}, and the standard "
        f"deviation is σ = √σ² ≈ {_fmt(math.sqrt(var))}.",
        f"In LaTeX notation the formula reads \\sigma^2 = \\frac{{1}}{{n}}\\sum_{{i=1}}^{{n}}(x_i - \\mu)^2. "
        f"Dividing by n − 1 = {n - 1} instead gives the sample variance s² ≈ {_fmt(float(ss / (n - 1)))}, "
        f"which is what statistics.variance() returns.",
    ]


def _ex_regression(r: Random) -> tuple[str, list[str]]:
    slope, icept = r.randint(1, 5), r.randint(-5, 10)
    xs = list(range(1, r.randint(5, 7) + 1))
    ys = [slope * x + icept + r.choice((-2, -1, 0, 1, 2)) for x in xs]
    n = len(xs)
    mx, my = Fraction(sum(xs), n), Fraction(sum(ys), n)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sxy / sxx
    a = my - b * mx
    pts = ", ".join(f"({x}, {y})" for x, y in zip(xs, ys))
    return "Fitting a straight line by least squares", [
        f"Given the points {pts}, we look for the line y = a + bx that minimises the sum of "
        f"squared residuals. The means are x̄ = {_fmt(float(mx))} and ȳ = {_fmt(float(my))}.",
        f"The slope is b = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)² = {_fmt(float(sxy))} / {_fmt(float(sxx))} "
        f"≈ {_fmt(float(b))}, and the intercept is a = ȳ − b·x̄ ≈ {_fmt(float(a))}.",
        f"So the fitted line is y ≈ {_fmt(float(a))} + {_fmt(float(b))}x; at x = {n + 1} it predicts "
        f"y ≈ {_fmt(float(a + b * (n + 1)))}. This is what statistics.linear_regression() computes.",
    ]


def _ex_quadratic(r: Random) -> tuple[str, list[str]]:
    r1, r2, a = r.randint(-9, 9), r.randint(-9, 9), r.randint(1, 3)
    b, c = -a * (r1 + r2), a * r1 * r2
    disc = b * b - 4 * a * c
    lo, hi = sorted((r1, r2))
    return "Solving a quadratic equation", [
        f"Solve {a}x² {'+' if b >= 0 else '−'} {abs(b)}x {'+' if c >= 0 else '−'} {abs(c)} = 0. "
        f"The quadratic formula is x = \\frac{{-b \\pm \\sqrt{{b^2 - 4ac}}}}{{2a}} with a = {a}, b = {b}, c = {c}.",
        f"First compute the discriminant Δ = b² − 4ac = {b * b} {'−' if c >= 0 else '+'} {abs(4 * a * c)} = {disc}. "
        f"Since Δ {'> 0 there are two distinct real roots' if disc > 0 else '= 0 there is one double root'}, "
        f"and √Δ = {math.isqrt(disc)}.",
        f"Hence x = ({-b} ± {math.isqrt(disc)}) / {2 * a}, which gives x₁ = {lo} and x₂ = {hi}. "
        f"Check: {a}·({lo})² + ({b})·({lo}) + ({c}) = {a * lo * lo + b * lo + c}.",
    ]


def _ex_fraction(r: Random) -> tuple[str, list[str]]:
    a, b, c, d = r.randint(1, 9), r.randint(2, 12), r.randint(1, 9), r.randint(2, 12)
    num, den = a * d + b * c, b * d
    res = Fraction(a, b) + Fraction(c, d)
    g = math.gcd(num, den)
    return "Adding fractions", [
        f"To add \\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}}, bring both terms to the common "
        f"denominator {b}·{d} = {den}: the sum is ({a}·{d} + {c}·{b}) / {den} = {num}/{den}.",
        f"The greatest common divisor of {num} and {den} is {g}, so the result simplifies to "
        f"{res.numerator}/{res.denominator}" + (f" ≈ {_fmt(float(res))}." if res.denominator != 1 else "."),
        f"In Python, Fraction({a}, {b}) + Fraction({c}, {d}) returns Fraction({res.numerator}, "
        f"{res.denominator}) exactly, without any rounding error.",
    ]


def _ex_gcd(r: Random) -> tuple[str, list[str]]:
    g = r.randint(2, 30)
    x, y = g * r.randint(10, 60), g * r.randint(3, 40)
    a, b = max(x, y), min(x, y)
    steps = []
    while b:
        q, rem = divmod(a, b)
        steps.append(f"{a} = {q}·{b} + {rem}")
        a, b = b, rem
    return "The Euclidean algorithm", [
        f"We compute gcd({max(x, y)}, {min(x, y)}) by repeated division with remainder: "
        + "; ".join(steps) + ".",
        f"The last non-zero remainder is {a}, so gcd({x}, {y}) = {a} and the least common "
        f"multiple is lcm = {x}·{y}/{a} = {x * y // a}.",
    ]


def _ex_interest(r: Random) -> tuple[str, list[str]]:
    principal = Decimal(r.randrange(1000, 20001, 500))
    rate = Decimal(r.randrange(15, 80, 5)) / 10
    years = r.randint(2, 15)
    n = 12
    factor = (1 + rate / 100 / n) ** (n * years)
    amount = (principal * factor).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return "Compound interest with exact decimals", [
        f"An amount P = {principal} is invested at an annual rate of r = {rate}% compounded "
        f"monthly (n = {n}) for t = {years} years. The formula is A = P(1 + r/n)^{{nt}}.",
        f"Here nt = {n * years} and 1 + r/n = 1 + {rate / 100}/{n} ≈ {_fmt(float(1 + rate / 100 / n), 6)}, "
        f"so A ≈ {principal} × {_fmt(float(factor), 6)} = {amount}.",
        f"The interest earned is A − P = {amount - principal}. Using decimal.Decimal and "
        f"quantize(Decimal('0.01'), rounding=ROUND_HALF_UP) keeps the cents exact.",
    ]


def _ex_series(r: Random) -> tuple[str, list[str]]:
    a1, d, n = r.randint(1, 20), r.randint(2, 9), r.randint(10, 60)
    an = a1 + (n - 1) * d
    return "Sum of an arithmetic series", [
        f"The sequence {a1}, {a1 + d}, {a1 + 2 * d}, … has first term a₁ = {a1} and common "
        f"difference d = {d}. Its {n}th term is aₙ = a₁ + (n − 1)d = {a1} + {n - 1}·{d} = {an}.",
        f"The sum of the first {n} terms is S_n = \\frac{{n(a_1 + a_n)}}{{2}} = {n}·({a1} + {an})/2 "
        f"= {n * (a1 + an) // 2 if n * (a1 + an) % 2 == 0 else _fmt(n * (a1 + an) / 2)}.",
    ]


def _ex_pythagoras(r: Random) -> tuple[str, list[str]]:
    a, b = r.randint(2, 40), r.randint(2, 40)
    c2 = a * a + b * b
    return "The Pythagorean theorem", [
        f"A right triangle has legs a = {a} and b = {b}. By Pythagoras, c² = a² + b² = "
        f"{a * a} + {b * b} = {c2}.",
        f"Therefore the hypotenuse is c = √{c2} ≈ {_fmt(math.sqrt(c2))}; math.hypot({a}, {b}) "
        f"gives the same value. The angle opposite a is atan({a}/{b}) ≈ "
        f"{_fmt(math.degrees(math.atan2(a, b)), 2)}°.",
    ]


def _ex_binomial(r: Random) -> tuple[str, list[str]]:
    n = r.randint(5, 16)
    k = r.randint(1, n - 1)
    comb = math.comb(n, k)
    return "Counting with binomial coefficients", [
        f"The number of ways to choose k = {k} items from n = {n} is C(n, k) = "
        f"\\frac{{n!}}{{k!(n-k)!}} = {n}!/({k}!·{n - k}!) = {comb}.",
        f"If a fair coin is tossed {n} times, the probability of exactly {k} heads is "
        f"C({n}, {k})/2^{n} = {comb}/{2 ** n} ≈ {_fmt(comb / 2 ** n, 5)}.",
    ]


def _ex_derivative(r: Random) -> tuple[str, list[str]]:
    coeffs = [r.randint(-6, 6) or 1 for _ in range(r.randint(3, 5))]  # highest power first

    def poly(cs: list[int]) -> str:
        deg = len(cs) - 1
        terms = []
        for i, cf in enumerate(cs):
            p = deg - i
            if cf == 0:
                continue
            var = "" if p == 0 else ("x" if p == 1 else f"x^{p}")
            terms.append(f"{cf}{var}")
        return " + ".join(terms).replace("+ -", "− ")

    deriv = [cf * (len(coeffs) - 1 - i) for i, cf in enumerate(coeffs[:-1])]
    x0 = r.randint(-3, 3)
    slope = sum(cf * x0 ** (len(deriv) - 1 - i) for i, cf in enumerate(deriv))
    return "Differentiating a polynomial", [
        f"Let f(x) = {poly(coeffs)}. By the power rule \\frac{{d}}{{dx}} x^n = n x^{{n-1}}, "
        f"the derivative is f'(x) = {poly(deriv)}.",
        f"At x = {x0} the slope of the tangent line is f'({x0}) = {slope}.",
    ]


def _ex_modpow(r: Random) -> tuple[str, list[str]]:
    base, exp, mod = r.randint(2, 12), r.randint(10, 40), r.choice((7, 11, 13, 17, 19, 23, 29))
    steps, sq, e, bits = [], base % mod, exp, []
    k = 0
    while e:
        if e & 1:
            bits.append(f"{base}^{2 ** k} ≡ {sq}")
        steps.append(f"{base}^{2 ** k} ≡ {sq} (mod {mod})")
        sq = sq * sq % mod
        e >>= 1
        k += 1
    return "Modular exponentiation by repeated squaring", [
        f"To compute {base}^{exp} mod {mod}, write {exp} in binary as {exp:b} and square repeatedly: "
        + "; ".join(steps) + ".",
        f"Multiplying the powers that correspond to 1-bits ({', '.join(bits)}) gives "
        f"{base}^{exp} ≡ {pow(base, exp, mod)} (mod {mod}), matching pow({base}, {exp}, {mod}).",
    ]


def _ex_complex(r: Random) -> tuple[str, list[str]]:
    a, b = r.randint(-9, 9) or 1, r.randint(-9, 9) or 2
    z = complex(a, b)
    mod_z, arg = abs(z), math.atan2(b, a)
    return "Complex numbers in polar form", [
        f"Take z = {a} {'+' if b >= 0 else '−'} {abs(b)}i. Its modulus is |z| = √(a² + b²) = "
        f"√({a * a} + {b * b}) = √{a * a + b * b} ≈ {_fmt(mod_z)}.",
        f"Its argument is φ = atan2({b}, {a}) ≈ {_fmt(arg)} rad, so z = r·e^{{iφ}} ≈ "
        f"{_fmt(mod_z)}·(cos {_fmt(arg, 3)} + i sin {_fmt(arg, 3)}); cmath.polar(z) returns "
        f"({_fmt(mod_z)}, {_fmt(arg)}).",
        f"Its square is z² = {int((z * z).real)} {'+' if (z * z).imag >= 0 else '−'} "
        f"{abs(int((z * z).imag))}i and its conjugate is z̄ = {a} {'−' if b >= 0 else '+'} {abs(b)}i.",
    ]


def _ex_dice(r: Random) -> tuple[str, list[str]]:
    s = r.randint(3, 11)
    ways = [(i, s - i) for i in range(1, 7) if 1 <= s - i <= 6]
    p = Fraction(len(ways), 36)
    return "Probability with two dice", [
        f"When two fair dice are rolled there are 6 × 6 = 36 equally likely outcomes. The sum "
        f"{s} occurs for {', '.join(f'({x}, {y})' for x, y in ways)}, i.e. {len(ways)} outcomes.",
        f"Hence P(sum = {s}) = {len(ways)}/36 = {p.numerator}/{p.denominator} ≈ {_fmt(float(p))}. "
        f"Simulating 10,000 rolls with random.randint(1, 6) gives a relative frequency close to this value.",
    ]


def _ex_log(r: Random) -> tuple[str, list[str]]:
    base = r.choice((2, 3, 5, 10))
    x = base ** r.randint(3, 9)
    y = r.randint(20, 5000)
    return "Logarithms and change of base", [
        f"Since {base}^{round(math.log(x, base))} = {x}, we have log_{base}({x}) = "
        f"{round(math.log(x, base))}. In general \\log_b(x) = \\frac{{\\ln x}}{{\\ln b}}.",
        f"For a value that is not an exact power, log_{base}({y}) = ln({y})/ln({base}) ≈ "
        f"{_fmt(math.log(y))}/{_fmt(math.log(base))} ≈ {_fmt(math.log(y, base))}.",
    ]


MATH_EXAMPLES = {
    "statistics": (_ex_variance, _ex_regression, _ex_dice),
    "fractions": (_ex_fraction, _ex_gcd, _ex_series),
    "decimal": (_ex_interest, _ex_fraction, _ex_series),
    "math": (_ex_quadratic, _ex_pythagoras, _ex_binomial, _ex_derivative, _ex_log, _ex_modpow),
    "cmath": (_ex_complex, _ex_quadratic, _ex_log),
    "random": (_ex_dice, _ex_binomial, _ex_variance),
}
MATH_TITLES = ("{topic}: worked examples", "Step by step: {topic}", "Lesson {n}: {topic}",
               "{topic} with Python's {mod} module", "Practice problems on {topic}")


def math_pages(docs: dict[str, list[tuple[str, str]]], rng: Random) -> list[Page]:
    """Kind 3: maths reference prose + generated worked examples."""
    mods = [m for m in MATH_MODULES if docs.get(m)]
    pages = []
    for i in range(TARGETS["math"] if mods else 0):
        mod = mods[i % len(mods)]
        gens = MATH_EXAMPLES[mod]
        chosen = [rng.choice(gens) for _ in range(rng.randint(3, 4))]
        examples = [g(rng) for g in chosen]
        topic = examples[0][0]
        title = rng.choice(MATH_TITLES).format(topic=topic, n=i + 1, mod=mod)
        entries = rng.sample(docs[mod], min(len(docs[mod]), rng.randint(3, 6)))
        blocks: list = [("p", f"This lesson uses the {mod} module to check every result. "
                              f"We start with the reference documentation of the functions involved.")]
        if mod in ("math", "cmath"):  # short one-line docs: render as a list
            blocks.append(("ul", [f"{name}: {doc}" for name, doc in entries]))
        else:
            for name, doc in entries[:3]:
                blocks.append(("h3", name))
                blocks.extend(_doc_blocks(doc)[:4])
        for k, (heading, paras) in enumerate(examples, 1):
            blocks.append(("h2", f"Example {k}: {heading}"))
            blocks.extend(("p", p) for p in paras)
        site = _pick_site(rng, (("math", 4), ("blog", 1), ("wiki", 1)))
        pages.append(Page("math", title, blocks, site, section=rng.choice(site.sections)))
    return pages


# ---- multilingual ----------------------------------------------------------

def _deal_sentences(sents: list[tuple[str, str]], rng: Random) -> list[str]:
    """Group sentences by catalogue (so a page reads topically), shuffle the
    order of catalogues and of sentences inside each."""
    by_domain: dict[str, list[str]] = {}
    for domain, text in sents:
        by_domain.setdefault(domain, []).append(text)
    domains = sorted(by_domain)
    rng.shuffle(domains)
    out = []
    for d in domains:
        group = by_domain[d]
        rng.shuffle(group)
        out.extend(group)
    return out


def multilingual_pages(pools: dict[str, list[str]], rng: Random) -> list[Page]:
    """Kind 4: several paragraphs of translated messages per page."""
    langs = [lang for lang in LANGS if len(pools.get(lang, ())) >= 40]
    pages = []
    for i in range(TARGETS["multilingual"] if langs else 0):
        lang = langs[i % len(langs)]
        pool = pools[lang]
        cjk = lang in CJK_LANGS
        n_par = rng.randint(4, 7)
        per = (4, 7) if cjk else (3, 5)
        need = n_par * per[1] + 1
        if len(pool) < need:
            continue
        title_src = pool.pop()
        title = title_src if len(title_src) <= (40 if cjk else 90) else title_src[: (30 if cjk else 80)].rstrip() + "…"
        blocks = []
        for _ in range(n_par):
            k = rng.randint(*per)
            sents = [pool.pop() for _ in range(min(k, len(pool)))]
            blocks.append(("p", ("" if cjk else " ").join(sents)))
        site = SITES["intl"] if rng.random() < 0.8 else SITES["wiki"]
        pages.append(Page("multilingual", title, blocks, site, lang=lang,
                          section=rng.choice(site.sections)))
    return pages


def non_utf8_pages(pools: dict[str, list[str]], rng: Random) -> list[Page]:
    """Kind 14: legacy encodings, charset declared in header, meta, both or none."""
    pages = []
    for lang, codec, label, where in NON_UTF8_SPECS[: TARGETS["non_utf8"]]:
        pool = pools.get(lang, [])
        cjk = lang in CJK_LANGS

        def encodable(s: str) -> bool:
            try:
                s.encode(codec)
                return True
            except UnicodeEncodeError:
                return False

        usable = [s for s in pool if encodable(s)]
        if len(usable) < 20:
            continue
        picked = usable[-(5 * 5 + 1):]
        for s in picked:
            pool.remove(s)
        title = picked[0][:40 if cjk else 80]
        body = picked[1:]
        blocks = [("p", ("" if cjk else " ").join(body[j:j + 5])) for j in range(0, len(body), 5)]
        site = SITES["retro"] if rng.random() < 0.6 else SITES["intl"]
        pages.append(Page("non_utf8", title, blocks, site, lang=lang, codec=codec, charset=label,
                          charset_in_header=where in ("header", "both"),
                          charset_in_meta=where in ("meta", "both"),
                          section=rng.choice(site.sections)))
    return pages


# ---- junk ------------------------------------------------------------------

def spam_pages(rng: Random) -> list[Page]:
    """Kind 8: keyword stuffing and SEO link farms."""
    pages = []
    for i in range(TARGETS["spam"]):
        kws = rng.sample(SPAM_KEYWORDS, 3)
        kw = kws[0]
        title = f"{kw.title()} | Best Price {kw.title()} | Buy Cheap {kw.title()} Online"
        blocks: list = []
        for _ in range(rng.randint(4, 8)):
            sents = [rng.choice(SPAM_TEMPLATES).format(kw=rng.choice(kws), KW=kw.title(),
                                                       kw2=rng.choice(kws), city=rng.choice(CITIES))
                     for _ in range(rng.randint(3, 6))]
            blocks.append(("p", " ".join(sents)))
        if i % 2 == 0:  # link farm
            links = []
            for _ in range(rng.randint(30, 60)):
                k = rng.choice(SPAM_KEYWORDS)
                links.append((f"http://{_slugify(k, 'deal')}-{rng.randint(1, 999)}.bestdeals.test/",
                              f"{rng.choice(('cheap', 'best', 'discount', 'buy'))} {k} {rng.choice(CITIES)}"))
            blocks.append(("h2", "Partner sites"))
            blocks.append(("links", links))
        blocks.append(("p", f"Keywords: {', '.join(k for k in kws for _ in range(3))}"))
        pages.append(Page("spam", title, blocks, SITES["shop"], section=rng.choice(SITES["shop"].sections)))
    return pages


def dirty_pages(words: list[str], rng: Random) -> list[Page]:
    """Kind 10: chat spam with a handful of dirty-word hits (skipped without a list)."""
    if len(words) < 3:
        return []
    pages = []
    for _ in range(TARGETS["dirty_words"]):
        chosen = rng.sample(words, 3)
        sents = [rng.choice(DIRTY_TEMPLATES if rng.random() < 0.5 else CHAT_SPAM).format(
                     w=rng.choice(chosen), city=rng.choice(CITIES))
                 for _ in range(rng.randint(12, 20))]
        blocks = [("p", " ".join(sents[j:j + 4])) for j in range(0, len(sents), 4)]
        title = f"Free {chosen[0]} chat - {chosen[1]} - no signup"
        pages.append(Page("dirty_words", title, blocks, SITES["adult"], section="free"))
    return pages


def too_short_pages(mods: list[ModuleInfo], rng: Random) -> list[Page]:
    """Kind 9: a title and one or two sentences (real docstring summaries)."""
    shorts = [(f"{m.name}.{q}", " ".join(d.split())) for m in mods for q, _a, _b, d in m.functions
              if d and 8 <= _words(d) <= 30 and not q.startswith("_")]
    stubs = ("This page is under construction. Please check back soon.",
             "This content has moved. Please update your bookmarks.",
             "Sorry, this article is only available to subscribers.")
    pages = []
    for i in range(TARGETS["too_short"]):
        if i % 5 == 4 or not shorts:
            title, text = rng.choice(FILLER_HEADLINES), rng.choice(stubs)
        else:
            title, text = rng.choice(shorts)
        pages.append(Page("too_short", title, [("p", text)], _pick_site(rng), section="notes"))
    return pages


def log_pages(rng: Random) -> list[Page]:
    """Kind 11: long runs of machine log lines with repeated phrases."""
    pages = []
    for i in range(TARGETS["log_dump"]):
        t = datetime(2024, rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23), tzinfo=timezone.utc)
        lines = []
        for _ in range(rng.randint(150, 400)):
            t += timedelta(milliseconds=rng.randint(1, 4000))
            msg = rng.choice(LOG_TEMPLATES).format(
                w=rng.randint(1, 8), a=rng.randint(0, 255), b=rng.randint(0, 255), c=rng.randint(1, 254),
                port=rng.choice((5432, 6379, 8080, 9000)), task=f"job-{rng.randint(1000, 9999)}",
                ms=rng.randint(3, 30000), r=rng.randint(1, 5), id=rng.randint(1, 99999),
                cid=f"0x{rng.getrandbits(24):06x}", act=rng.randint(1, 64), idle=rng.randint(0, 16),
                heap=rng.randint(800, 4000), heap2=rng.randint(300, 800), tx=rng.randint(10**5, 10**6))
            lines.append(f"{t:%Y-%m-%d %H:%M:%S}.{t.microsecond // 1000:03d} {msg}")
        title = f"Incident log excerpt #{4000 + i}: worker pool degraded"
        blocks: list = [("p", "Raw log output attached to the incident report:")]
        if i % 2:
            blocks.append(("pre", "\n".join(lines)))
        else:  # some sites paste logs one paragraph per line
            blocks.extend(("p", ln) for ln in lines)
        pages.append(Page("log_dump", title, blocks, SITES["ops"], section="logs"))
    return pages


def boilerplate_pages(rng: Random) -> list[Page]:
    """Kind 12: tag / category index pages: nothing but link lists."""
    pages = []
    for i in range(TARGETS["boilerplate_only"]):
        tag = TAGS[i % len(TAGS)]
        links = [(f"/posts/{_slugify(h, 'post')}/", h) for h in rng.sample(FILLER_HEADLINES, 12)]
        links += [(f"/tags/{t}/", f"#{t}") for t in rng.sample(TAGS, 10)]
        blocks = [("links", links), ("p", f"Page {rng.randint(2, 9)} of {rng.randint(10, 30)}")]
        site = SITES["portal"] if i % 3 else SITES["blog"]
        pages.append(Page("boilerplate_only", f"Tag: {tag}", blocks, site, section="tags"))
    return pages


# ---- copies ---------------------------------------------------------------

def _perturb(blocks: list, frac: float, vocab: list[str], rng: Random) -> list:
    """Replace / delete / insert about ``frac`` of the words in prose blocks."""
    words = {i: text.split(" ") for i, (tag, text) in enumerate(blocks) if tag == "p"}
    positions = [(i, j) for i in sorted(words) for j in range(len(words[i]))]
    if not positions:
        return list(blocks)
    for i, j in rng.sample(positions, max(1, round(frac * len(positions)))):
        op = rng.random()
        if op < 0.7:
            words[i][j] = rng.choice(vocab)
        elif op < 0.85:
            words[i][j] = ""
        else:
            words[i][j] = f"{words[i][j]} {rng.choice(vocab)}"
    return [(tag, " ".join(w for w in words[i] if w)) if i in words else (tag, text)
            for i, (tag, text) in enumerate(blocks)]


def _variant_url(url: str, k: int, rng: Random) -> str:
    """The same resource, spelt the way trackers and crawlers spell it."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    sep = "&" if parts.query else "?"
    port = 443 if parts.scheme == "https" else 80
    forms = (
        f"{url}{sep}utm_source=newsletter&utm_medium=email&utm_campaign=spring_{rng.randint(1, 40)}",
        f"{url}#section-{rng.randint(2, 6)}",
        # Upper-case host + default port.  The scheme stays lower case: warcio
        # only parses HTTP headers of records whose URI starts with "http".
        f"{parts.scheme}://{parts.netloc.upper()}:{port}{path}",
        (url[:-1] if parts.path.endswith("/") and not parts.query else url + ("/" if not parts.query else "")),
        f"{url}{sep}ref=twitter&fbclid=IwAR{rng.getrandbits(64):016x}",
        f"{url}{sep}utm_source=twitter&utm_medium=social#comments",
        f"{url}{sep}gclid=Cj0K{rng.getrandbits(48):012x}",
    )
    return forms[k % len(forms)]


# ---- bad input -------------------------------------------------------------

def _png_bytes(width: int = 16, height: int = 16) -> bytes:
    """A real (tiny gradient) PNG, built by hand so no image library is needed."""
    # One filter byte (0 = none) per scanline, then RGB triples.
    raw = b"".join(b"\x00" + b"".join(bytes((x * 16 % 256, y * 16 % 256, 128)) for x in range(width))
                   for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def oversized_page(rng: Random) -> Page:
    """Kind 15: an HTML page > 2 MB (a huge data table)."""
    rows = [("timestamp", "station", "temperature_c", "humidity_pct", "pressure_hpa", "status")]
    t = datetime(2019, 1, 1, tzinfo=timezone.utc)
    while len(rows) < 24_000:
        t += timedelta(minutes=rng.randint(5, 15))
        rows.append((f"{t:%Y-%m-%d %H:%M}", f"ST-{rng.randint(100, 140)}",
                     f"{rng.uniform(-12, 35):.2f}", f"{rng.uniform(10, 100):.1f}",
                     f"{rng.uniform(980, 1040):.1f}", rng.choice(("ok", "ok", "ok", "calibrating"))))
    blocks = [("p", "Complete export of the station readings since 2019."), ("table", rows)]
    return Page("oversized", "Sensor readings archive 2019-2024 (full export)", blocks, SITES["data"],
                section="archive")


def not_found_page(rng: Random) -> Page:
    return Page("http_404", "Page not found",
                [("p", "Sorry, the page you are looking for does not exist or has been removed."),
                 ("p", "Try the search box above or return to the home page.")],
                SITES["blog"], status=404, section="posts")


# --------------------------------------------------------------------------
# URLs, dates, WARC writing
# --------------------------------------------------------------------------

def _assign_url(page: Page, index: int, used: set[str], rng: Random) -> None:
    site = page.site
    slug = _slugify(page.title, f"{page.kind.replace('_', '-')}-{index}")
    section = page.section or site.sections[0]
    if site.url_style == "dated":
        # Blog-style URLs carry the publication month, which precedes the capture.
        published = (page.date or CRAWL_END) - timedelta(days=rng.randint(0, 900))
        path = f"/{published:%Y/%m}/{slug}/"
    elif site.url_style == "query":
        path = f"/{section}.php?t={10000 + index}&title={slug}"
    elif site.url_style == "lang":
        path = f"/{page.lang.lower().replace('_', '-')}/{section}/{slug}.html"
    else:
        path = f"/{section}/{slug}.html"
    url = f"{site.scheme}://{site.host}{path}"
    n = 2
    while url in used:
        url = f"{site.scheme}://{site.host}{path.rstrip('/').removesuffix('.html')}-{n}" + (
            ".html" if path.endswith(".html") else "/")
        n += 1
    used.add(url)
    page.url, page.slug = url, slug


def _random_date(rng: Random, start: datetime = CRAWL_START, end: datetime = CRAWL_END) -> datetime:
    span = int((end - start).total_seconds())
    return start + timedelta(seconds=rng.randint(0, span))


def _warc_date(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _record_id(rng: Random) -> str:
    return f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}>"


def _content_type(page: Page) -> str:
    if page.content_type:
        return page.content_type
    if page.charset_in_header:
        label = page.site.ct_case if page.codec == "utf-8" else page.charset
        return f"text/html; charset={label}"
    return "text/html"


def _order(pages: list[Page], rng: Random) -> list[Page]:
    """Shuffle captures; copies are never next to their source, and URL
    revisits come after their original (in file order and in WARC-Date)."""
    variants = [p for p in pages if p.kind == "url_variant"]
    rest = [p for p in pages if p.kind != "url_variant"]
    rng.shuffle(rest)
    for _ in range(10):  # break up neighbouring members of one family
        moved = False
        for i in range(len(rest) - 1):
            if rest[i].family >= 0 and rest[i].family == rest[i + 1].family:
                j = (i + len(rest) // 2) % len(rest)
                rest[i + 1], rest[j] = rest[j], rest[i + 1]
                moved = True
        if not moved:
            break
    for v in variants:
        pos = next(i for i, p in enumerate(rest) if p.family == v.family)
        lo = min(pos + 2, len(rest))
        rest.insert(rng.randint(lo, len(rest)), v)
    return rest


def _write_warc(out_path: Path, pages: list[Page], seed: int) -> int:
    ids = _rng(seed, "record-ids")
    timing = _rng(seed, "fetch-times")
    hosts = sorted({urlsplit(p.url).hostname or "" for p in pages})
    ips = {h: f"{('192.0.2', '198.51.100', '203.0.113')[i % 3]}.{10 + i}" for i, h in enumerate(hosts)}
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True, warc_version="1.1")
    info_id = _record_id(ids)
    fields = (f"software: kiln.curation.sample\r\n"
              f"format: WARC File Format 1.1\r\n"
              f"conformsTo: https://iipc.github.io/warc-specifications/specifications/warc-format/warc-1.1/\r\n"
              f"isPartOf: KILN-SAMPLE-2024\r\n"
              f"description: Synthetic Common-Crawl-like sample for the kiln demo (seed={seed})\r\n"
              f"operator: kiln sample builder\r\n"
              f"robots: classic\r\n").encode()
    writer.write_record(writer.create_warc_record(
        "", "warcinfo", payload=io.BytesIO(fields), length=len(fields),
        warc_content_type="application/warc-fields",
        warc_headers_dict={"WARC-Date": _warc_date(CRAWL_START), "WARC-Record-ID": info_id,
                           "WARC-Filename": WARC_FILENAME}))
    records = 1
    for page in pages:
        parts = urlsplit(page.url)
        host = parts.hostname or ""
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        date = _warc_date(page.date)
        req_id, resp_id, meta_id = _record_id(ids), _record_id(ids), _record_id(ids)
        common = {"WARC-Date": date, "WARC-Warcinfo-ID": info_id, "WARC-IP-Address": ips[host]}

        req_headers = StatusAndHeaders(f"GET {target} HTTP/1.1", [
            ("Host", host), ("User-Agent", USER_AGENT),
            ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
            ("Accept-Language", "en-US,en;q=0.5"), ("Accept-Encoding", "br,gzip"),
            ("Connection", "close")], is_http_request=True)
        writer.write_record(writer.create_warc_record(
            page.url, "request", payload=io.BytesIO(b""), length=0, http_headers=req_headers,
            warc_headers_dict={"WARC-Record-ID": req_id, **common}))

        body = page.body or b""
        reason = {200: "OK", 404: "Not Found"}[page.status]
        resp_headers = [("Date", format_datetime(page.date, usegmt=True)), ("Server", page.site.server),
                        ("Content-Type", _content_type(page)), ("Content-Length", str(len(body))),
                        ("Cache-Control", "max-age=600"), ("Connection", "close")]
        resp_headers_dict = {"WARC-Record-ID": resp_id, **common, "WARC-Concurrent-To": req_id}
        if body:
            resp_headers_dict["WARC-Identified-Payload-Type"] = _content_type(page).split(";")[0]
        writer.write_record(writer.create_warc_record(
            page.url, "response", payload=io.BytesIO(body), length=len(body),
            http_headers=StatusAndHeaders(f"{page.status} {reason}", resp_headers, protocol="HTTP/1.1"),
            warc_headers_dict=resp_headers_dict))

        meta = f"fetchTimeMs: {timing.randint(40, 2500)}\r\n".encode()
        writer.write_record(writer.create_warc_record(
            page.url, "metadata", payload=io.BytesIO(meta), length=len(meta),
            warc_content_type="application/warc-fields",
            warc_headers_dict={"WARC-Record-ID": meta_id, **common, "WARC-Concurrent-To": resp_id}))
        records += 3
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out_path)
    return records


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------

def build_sample(out_path: str | Path, seed: int = 0) -> dict:
    """Write the sample WARC to ``out_path`` and return what was planted."""
    out_path = Path(out_path)

    # 1. Read the text sources (each may come back empty on another machine).
    mods = _stdlib_modules()
    mods_by_name = {m.name: m for m in mods}
    doc_articles = _doc_html_articles()
    pools = {lang: _deal_sentences(_catalog_sentences(lang), _rng(seed, f"lang:{lang}"))
             for lang in LANGS}
    lang_sizes = {lang: len(p) for lang, p in pools.items()}
    # Pages that need legacy encodings take sentences from the end of the pools
    # first, so they never repeat a multilingual page's text.
    legacy = non_utf8_pages(pools, _rng(seed, "non_utf8"))

    # 2. Original pages, one generator per kind.
    pages: list[Page] = []
    pages += prose_pages(mods, doc_articles, _rng(seed, "prose"))
    pages += code_pages(mods, _rng(seed, "code"))
    pages += math_pages(_math_docs(mods_by_name), _rng(seed, "math"))
    pages += multilingual_pages(pools, _rng(seed, "multilingual"))
    pages += legacy
    pages += spam_pages(_rng(seed, "spam"))
    pages += dirty_pages(_dirty_words(), _rng(seed, "dirty"))
    pages += too_short_pages(mods, _rng(seed, "short"))
    pages += log_pages(_rng(seed, "logs"))
    pages += boilerplate_pages(_rng(seed, "boilerplate"))
    pages.append(oversized_page(_rng(seed, "oversized")))
    pages.append(not_found_page(_rng(seed, "404")))

    meta_rng = _rng(seed, "meta")
    used: set[str] = set()
    for i, page in enumerate(pages):
        page.family = i
        page.author = page.author or (meta_rng.choice(AUTHORS) if page.kind not in
                                      ("boilerplate_only", "spam", "dirty_words", "log_dump") else "")
        page.date = _random_date(meta_rng)
        _assign_url(page, i, used, meta_rng)

    # 3. Boilerplate sentences repeated inside many articles (line dedup).
    prose = [p for p in pages if p.kind == "good_prose" and p.blocks[0][0] != "raw"]
    shared_rng = _rng(seed, "shared-lines")
    for page in shared_rng.sample(prose, min(SHARED_LINE_PAGES, len(prose))):
        lines = shared_rng.sample(SHARED_LINES, shared_rng.randint(2, 3))
        page.blocks = page.blocks + [("p", line) for line in lines]

    # 4. Render the originals.
    for page in pages:
        html_text = render(page, _rng(seed, f"render:{page.url}"))
        page.body = html_text.encode(page.codec, errors="xmlcharrefreplace")

    # 5. Copies of originals.
    copy_rng = _rng(seed, "copies")
    vocab = sorted({w.lower() for m in mods[:200] for _h, d in m.sections for w in d.split()
                    if w.isalpha() and 4 <= len(w) <= 12}) or ["data"]
    # Each original is copied at most once, so every family has two members.
    # Near duplicates and revisits need editable blocks, not raw manual HTML.
    sources = [p for p in pages if p.kind in ("good_prose", "code", "math", "multilingual")]
    editable = [p for p in sources if p.blocks[0][0] != "raw"]
    n_near, n_var = TARGETS["near_duplicate"], TARGETS["url_variant"]
    edited = copy_rng.sample(editable, min(len(editable), n_near + n_var))
    near_src, variant_src = edited[:n_near], edited[n_near:]
    rest = [p for p in sources if p not in edited]
    exact_src = copy_rng.sample(rest, min(len(rest), TARGETS["exact_duplicate"]))
    copies: list[Page] = []

    for k, src in enumerate(exact_src):  # kind 5: byte-identical body, other URL
        parts = urlsplit(src.url)
        if k % 3 == 2:  # same host, a print/AMP path
            url = f"{parts.scheme}://{parts.netloc}/{('amp', 'print', 'archive')[k % 9 // 3]}{parts.path}"
        else:
            url = f"https://{MIRROR_HOSTS[k % 2]}/{parts.netloc}{parts.path}"
        url += f"?{parts.query}" if parts.query else ""
        site = replace(src.site, host=urlsplit(url).hostname, server="nginx/1.18.0")
        copies.append(replace(src, kind="exact_duplicate", url=url, site=site,
                              date=_random_date(copy_rng)))

    n = max(1, len(near_src) - 1)
    fracs = [NEAR_DUP_CHANGE[0] + (NEAR_DUP_CHANGE[1] - NEAR_DUP_CHANGE[0]) * i / n for i in range(len(near_src))]
    copy_rng.shuffle(fracs)
    for k, (src, frac) in enumerate(zip(near_src, fracs)):  # kind 6: edited copy, other template
        others = [name for name, _w in PROSE_SITES if SITES[name].host != src.site.host]
        site = SITES[copy_rng.choice(others)]
        words = vocab if src.lang == "en" else sorted({w for _t, x in src.blocks if _t == "p"
                                                       for w in x.split()})
        page = Page("near_duplicate", src.title, _perturb(src.blocks, frac, words, copy_rng), site,
                    lang=src.lang, author=copy_rng.choice(AUTHORS), date=_random_date(copy_rng),
                    family=src.family, section=copy_rng.choice(site.sections))
        _assign_url(page, 100_000 + k, used, copy_rng)
        page.body = render(page, _rng(seed, f"render:{page.url}")).encode("utf-8")
        copies.append(page)

    for k, src in enumerate(variant_src):  # kind 7: revisit with tracking params, later date
        if src.date > CRAWL_END - timedelta(days=60):  # leave room for a later revisit
            src.date = _random_date(copy_rng, CRAWL_START, CRAWL_END - timedelta(days=90))
            src.body = render(src, _rng(seed, f"render:{src.url}")).encode(src.codec, errors="xmlcharrefreplace")
        later = src.date + timedelta(days=copy_rng.randint(3, 55), seconds=copy_rng.randint(0, 86_399))
        note = ("p", f"Update {later:%B %d, %Y}: this article was revised to fix typos and clarify "
                     f"the examples.")
        words = vocab if src.lang == "en" else sorted({w for _t, x in src.blocks if _t == "p"
                                                       for w in x.split()})
        blocks = [note] + _perturb(src.blocks, 0.01, words, copy_rng)
        page = replace(src, kind="url_variant", blocks=blocks, date=later, canonical=src.url,
                       url=_variant_url(src.url, k, copy_rng))
        page.body = render(page, _rng(seed, f"render:{page.url}")).encode(page.codec, errors="xmlcharrefreplace")
        copies.append(page)

    # 6. Bad input records.
    bad_rng = _rng(seed, "bad")
    bad = [
        Page("non_html", "logo", [], SITES["docs"], url="https://docs.pyref.example/static/img/logo.png",
             body=_png_bytes(), content_type="image/png"),
        Page("non_html", "report", [], SITES["news"],
             url="https://news.daily-ledger.example/files/annual-report-2023.pdf",
             body=FAKE_PDF, content_type="application/pdf"),
        Page("empty_body", "", [], SITES["blog"], url="https://blog.kiln-sample.test/2024/02/draft-post/",
             body=b""),
        Page("empty_body", "", [], SITES["wiki"], url="https://wiki.opencorpus.example/wiki/Special:Random",
             body=b""),
    ]
    for page in bad:
        page.date = _random_date(bad_rng)
        page.family = -1

    everything = _order(pages + copies + bad, _rng(seed, "order"))
    records = _write_warc(out_path, everything, seed)

    counts: dict[str, int] = {}
    for page in everything:
        counts[page.kind] = counts.get(page.kind, 0) + 1
    kinds = ("good_prose", "code", "math", "multilingual", "exact_duplicate", "near_duplicate",
             "url_variant", "spam", "too_short", "dirty_words", "log_dump", "boilerplate_only",
             "non_utf8", "non_html", "empty_body", "oversized", "http_404")
    summary: dict = {k: counts.get(k, 0) for k in kinds}
    summary["good_prose_from_doc_html"] = sum(1 for p in pages if p.kind == "good_prose"
                                             and p.blocks[0][0] == "raw")
    summary["pages_with_shared_lines"] = min(SHARED_LINE_PAGES, len(prose))
    summary["languages"] = {lang: sum(1 for p in everything if p.lang == lang and p.kind
                                      in ("multilingual", "non_utf8")) for lang in LANGS}
    summary["language_pool_sentences"] = lang_sizes
    summary["responses"] = len(everything)
    summary["records"] = records
    summary["bytes"] = out_path.stat().st_size
    summary["seed"] = seed
    return summary


# --------------------------------------------------------------------------
# Labelled sets for the demo's classifiers and evaluation sets
# --------------------------------------------------------------------------

def _plain_text(page: Page) -> str:
    """The text a reader sees in a page's article, code included (the training side of
    what trafilatura extracts from the rendered page)."""
    out = [page.title]
    for tag, payload in page.blocks:
        if tag in ("p", "h2", "h3", "pre", "code"):
            out.append(payload)
        elif tag == "ul":
            out.extend(payload)
        elif tag == "links":
            out.extend(label for _href, label in payload)
    return "\n\n".join(out)


def _word_salad(text: str, rng: Random) -> str:
    """A fluent-looking but meaningless page: the document's own words, shuffled."""
    words = text.split()
    rng.shuffle(words)
    return "\n\n".join(" ".join(words[i:i + 60]) for i in range(0, len(words), 60))


def _junk_lines(rng: Random, n: int) -> list[str]:
    return [rng.choice(SPAM_TEMPLATES).format(kw=k, KW=k.title(), kw2=rng.choice(SPAM_KEYWORDS),
                                              city=rng.choice(CITIES))
            for k in (rng.choice(SPAM_KEYWORDS) for _ in range(n))]


def build_labels(out_dir: str | Path, seed: int = 1) -> dict:
    """Write the demo's labelled training sets and evaluation sets into `out_dir`.

    Labels are known by construction, from the same generators as the sample WARC but
    another seed (so other modules, examples and orderings):
    - domain.jsonl: {text, label} with label general (docstring prose), math (lessons
      with worked examples), code (source listings);
    - quality_pos.jsonl / quality_neg.jsonl: reference-quality pages vs spam, adult
      chat spam, stubs, log dumps, tag indexes and word salad;
    - quality_scores.jsonl: {text, score}: a good page with a share f of its lines
      replaced by spam scores 1 - f (the graded labels a larger model would give);
    - eval/pydoc_qa.jsonl: passages from docstrings of modules the sample's prose pages
      use (planted contamination); eval/idle_qa.jsonl: passages from idlelib, which the
      sample never uses (expected: no match).
    """
    out = Path(out_dir)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    mods = _stdlib_modules()
    prose = prose_pages(mods, [], _rng(seed, "labels:prose"))
    code = code_pages(mods, _rng(seed, "labels:code"))
    maths = math_pages(_math_docs({m.name: m for m in mods}), _rng(seed, "labels:math"))

    def dump(name: str, rows: list[dict]) -> int:
        with open(out / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return len(rows)

    counts = {}
    domain_rows = ([{"text": _plain_text(p), "label": "general"} for p in prose]
                   + [{"text": _plain_text(p), "label": "code"} for p in code]
                   + [{"text": _plain_text(p), "label": "math"} for p in maths])
    _rng(seed, "labels:domain-order").shuffle(domain_rows)
    counts["domain"] = dump("domain.jsonl", domain_rows)

    good = [_plain_text(p) for p in prose + code + maths]
    counts["quality_pos"] = dump("quality_pos.jsonl", [{"text": t} for t in good])
    bad_rng = _rng(seed, "labels:bad")
    bad_pages: list[Page] = []
    for round_ in range(4):  # each generator makes a fixed number; draw several rounds
        r = _rng(seed, f"labels:bad:{round_}")
        bad_pages += spam_pages(r) + dirty_pages(_dirty_words(), r) + too_short_pages(mods, r)
        bad_pages += log_pages(r) + boilerplate_pages(r)
    bad = [_plain_text(p) for p in bad_pages]
    bad += [_word_salad(t, bad_rng) for t in bad_rng.sample(good, min(len(good), len(good) - len(bad)))]
    counts["quality_neg"] = dump("quality_neg.jsonl", [{"text": t} for t in bad])

    graded_rng = _rng(seed, "labels:graded")
    graded = []
    for text in good:
        lines = [ln for ln in text.split("\n\n") if ln.strip()]
        f = graded_rng.choice((0.0, 0.2, 0.4, 0.6, 0.8))
        n_junk = round(len(lines) * f)
        junk = _junk_lines(graded_rng, n_junk)
        for k, j in enumerate(graded_rng.sample(range(len(lines)), n_junk)):
            lines[j] = junk[k]
        graded.append({"text": "\n\n".join(lines), "score": round(1 - n_junk / max(1, len(lines)), 4)})
    counts["quality_scores"] = dump("quality_scores.jsonl", graded)

    def passages(modules: list[ModuleInfo], rng: Random, n: int) -> list[dict]:
        docs = [(m.name, " ".join(_clean_rst(d).split())) for m in modules for _h, d in m.sections]
        docs = [(name, d) for name, d in docs if len(d.split()) >= 40]
        rows = []
        for name, d in rng.sample(docs, min(n, len(docs))):
            words = d.split()
            start = rng.randint(0, len(words) - 30)
            rows.append({"question": "Which module does this passage document? "
                                     + " ".join(words[start:start + 30]),
                         "choices": sorted({name, *rng.sample([m.name for m in modules], 3)}),
                         "answer": name})
        return rows

    used = [m for m in mods if not m.name.startswith(("_", "idlelib", "lib2to3", "distutils"))
            and m.name.split(".")[0] not in MATH_MODULES]
    idle = [m for m in mods if m.name.startswith("idlelib")]
    counts["eval_pydoc_qa"] = dump("eval/pydoc_qa.jsonl", passages(used, _rng(seed, "labels:eval"), 60))
    counts["eval_idle_qa"] = dump("eval/idle_qa.jsonl", passages(idle, _rng(seed, "labels:idle"), 20))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kiln.curation.sample",
        description="Build the deterministic Common-Crawl-like sample WARC used by `make demo`. "
                    "Pages wrap real text from this machine (Python stdlib docstrings and sources, "
                    "gettext catalogues, /usr/share/doc manuals) in site boilerplate, and include "
                    "duplicates, spam, logs, legacy encodings and broken records for every "
                    "curation stage to handle.")
    parser.add_argument("--out", default="data/sample.warc.gz",
                        help="output path of the gzip WARC (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed gives a byte-identical file (default: %(default)s)")
    parser.add_argument("--labels", metavar="DIR",
                        help="also write the demo's labelled training sets and evaluation sets to DIR "
                             "(built with seed + 1, so from other pages than the WARC's)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = build_sample(args.out, seed=args.seed)
    elapsed = time.perf_counter() - start
    kinds = " ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, int)
                     and k not in ("responses", "records", "bytes", "seed"))
    print(f"wrote {args.out}: {summary['responses']} responses, {summary['records']} records, "
          f"{summary['bytes'] / 1e6:.1f} MB in {elapsed:.1f}s ({kinds})")
    if args.labels:
        counts = build_labels(args.labels, seed=args.seed + 1)
        print(f"wrote {args.labels}: " + " ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
