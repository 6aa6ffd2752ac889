"""The pages of the demo crawl, before rendering: who hosts them and what they say.

Each family is one generator that takes its own ``random.Random`` and returns
``Page`` objects whose article is a list of (tag, payload) blocks; ``render``
wraps them in site chrome.  The families cover what every curation stage must
handle:

* extraction (trafilatura) must find the article among the boilerplate;
* language ID sees English, 15 other languages and non-UTF-8 encodings;
* quality filters (Gopher / C4 / FineWeb / Llama-3 style) meet spam, keyword
  stuffing, dirty words, log dumps, too-short and link-only pages;
* dedup stages meet near duplicates (``perturb``) and, from the sample
  builder, URL variants, byte-identical copies and shared boilerplate lines;
* domain classifiers meet prose, code, maths (``kiln.demo.maths``) and
  multilingual text.
"""

from __future__ import annotations

import re
import struct
import sys
import textwrap
import unicodedata
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from random import Random

from kiln.demo.sources import CJK_LANGS, MATH_MODULES, ModuleInfo, clean_rst, doc_blocks, word_count

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

#: Languages for multilingual pages, in the order pages are dealt out.
LANGS = ("de", "fr", "es", "ru", "ja", "zh_CN", "ko", "pt_BR", "it", "pl",
         "uk", "sv", "tr", "nl", "cs")

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

#: Words of the docstring pages per page, before the next page is started.
PROSE_PAGE_WORDS = (250, 1000)

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

# Small valid PNG is built in png_bytes(); this is a stand-in PDF body.
FAKE_PDF = (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\n"
            b"endobj\n2 0 obj\n<< /Type /Pages /Kids [] /Count 0 >>\nendobj\n"
            b"trailer\n<< /Root 1 0 R >>\n%%EOF\n")


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


def rng_for(seed: int, name: str) -> Random:
    """An independent RNG per purpose, so adding a page kind does not shift
    the random stream of the others (str seeds are hashed with SHA-512)."""
    return Random(f"kiln-sample:{seed}:{name}")


def slugify(text: str, fallback: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = "-".join(slug.split("-")[:8])
    return slug if len(slug) >= 4 else fallback


# ---- prose and code ------------------------------------------------------

def pick_site(rng: Random, choices=PROSE_SITES) -> Site:
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
        sections = ([("", mod.doc)] if word_count(mod.doc) >= 20 else []) + mod.sections
        pages_secs: list[list] = [[]]
        count = 0
        for sec in sections:
            pages_secs[-1].append(sec)
            count += word_count(sec[1])
            if count >= PROSE_PAGE_WORDS[0] and count >= rng.randint(*PROSE_PAGE_WORDS):
                pages_secs.append([])
                count = 0
        if count < 130 and len(pages_secs) > 1:  # fold a short tail into the previous page
            tail = pages_secs.pop()
            pages_secs[-1].extend(tail)
        summary = (mod.doc.strip().split("\n")[0].strip().rstrip(".") if mod.doc
                   else f"{mod.name} library reference")[:90]
        for part, secs in enumerate(pages_secs, 1):
            if sum(word_count(d) for _, d in secs) < 130:
                continue
            blocks: list = []
            for heading, doc in secs:
                if heading:
                    blocks.append(("h2", heading))
                blocks.extend(doc_blocks(doc))
            title = rng.choice(forms).format(mod=mod.name, summary=summary)
            if part > 1:
                title += f" (part {part})"
            candidates.append(Page("good_prose", title, blocks, pick_site(rng), section="library"))
    n_doc = min(DOC_HTML_PAGES, len(doc_articles))
    n_docstring = min(TARGETS["good_prose"] - n_doc, len(candidates))
    pages = rng.sample(candidates, n_docstring)
    for title, inner, _path in rng.sample(doc_articles, n_doc):
        pages.append(Page("good_prose", title, [("raw", inner)], pick_site(rng, (("docs", 3), ("wiki", 1))),
                          section="manuals"))
    return pages


def code_pages(mods: list[ModuleInfo], rng: Random) -> list[Page]:
    """Kind 2: source listings (whole small modules or a few functions)."""
    pool = [m for m in mods if len(m.functions) >= 3 and not m.name.startswith("_")
            and "idlelib" not in m.name]
    pages = []
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for mod in rng.sample(pool, min(TARGETS["code"], len(pool))):
        intro = doc_blocks(mod.doc)[:2] if mod.doc else []
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
                    blocks.append(("p", " ".join(clean_rst(doc).split("\n\n")[0].split())))
                blocks.append(("code", textwrap.dedent("\n".join(lines[first - 1:last]))))
        site = pick_site(rng, (("code", 3), ("docs", 1), ("blog", 1), ("forum", 1)))
        pages.append(Page("code", title, blocks, site, section="python"))
    return pages


# ---- multilingual ----------------------------------------------------------

def deal_sentences(sents: list[tuple[str, str]], rng: Random) -> list[str]:
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
                links.append((f"http://{slugify(k, 'deal')}-{rng.randint(1, 999)}.bestdeals.test/",
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
              if d and 8 <= word_count(d) <= 30 and not q.startswith("_")]
    stubs = ("This page is under construction. Please check back soon.",
             "This content has moved. Please update your bookmarks.",
             "Sorry, this article is only available to subscribers.")
    pages = []
    for i in range(TARGETS["too_short"]):
        if i % 5 == 4 or not shorts:
            title, text = rng.choice(FILLER_HEADLINES), rng.choice(stubs)
        else:
            title, text = rng.choice(shorts)
        pages.append(Page("too_short", title, [("p", text)], pick_site(rng), section="notes"))
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
        links = [(f"/posts/{slugify(h, 'post')}/", h) for h in rng.sample(FILLER_HEADLINES, 12)]
        links += [(f"/tags/{t}/", f"#{t}") for t in rng.sample(TAGS, 10)]
        blocks = [("links", links), ("p", f"Page {rng.randint(2, 9)} of {rng.randint(10, 30)}")]
        site = SITES["portal"] if i % 3 else SITES["blog"]
        pages.append(Page("boilerplate_only", f"Tag: {tag}", blocks, site, section="tags"))
    return pages


# ---- copies ---------------------------------------------------------------

def perturb(blocks: list, frac: float, vocab: list[str], rng: Random) -> list:
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


# ---- bad input -------------------------------------------------------------

def png_bytes(width: int = 16, height: int = 16) -> bytes:
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

