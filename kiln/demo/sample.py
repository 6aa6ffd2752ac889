"""Build the deterministic sample WARC that ``make demo`` curates.

The builder reads the text sources, has each page family write its pages, adds
the copies the dedup stages must find (byte-identical mirrors, near duplicates,
URL revisits) and records no stage should keep (images, PDFs, empty bodies),
renders everything and writes one WARC.  Every purpose draws from its own RNG
seeded from ``seed`` and a fixed name, so two builds with the same seed are
byte-identical.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from kiln.demo.crawl import (CRAWL_END, CRAWL_START, assign_url, capture_records, order_captures, random_date,
                             variant_url)
from kiln.demo.maths import math_pages
from kiln.demo.pages import (AUTHORS, FAKE_PDF, LANGS, MIRROR_HOSTS, PROSE_SITES, SITES, TARGETS, Page,
                             boilerplate_pages, code_pages, deal_sentences, dirty_pages, log_pages,
                             multilingual_pages, non_utf8_pages, not_found_page, oversized_page, perturb,
                             png_bytes, prose_pages, rng_for, spam_pages, too_short_pages)
from kiln.demo.render import render
from kiln.demo.sources import catalog_sentences, dirty_words, doc_html_articles, math_docs, stdlib_modules
from kiln.demo.warc import write_warc

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
#: Near duplicates change between these fractions of the article's words,
#: spread evenly, so that MinHash sees a range of Jaccard similarities.
NEAR_DUP_CHANGE = (0.01, 0.30)


def build_sample(out_path: str | Path, seed: int = 0) -> dict:
    """Write the sample WARC to ``out_path`` and return what was planted."""
    out_path = Path(out_path)

    # 1. Read the text sources (each may come back empty on another machine).
    mods = stdlib_modules()
    mods_by_name = {m.name: m for m in mods}
    doc_articles = doc_html_articles()
    pools = {lang: deal_sentences(catalog_sentences(lang), rng_for(seed, f"lang:{lang}"))
             for lang in LANGS}
    lang_sizes = {lang: len(p) for lang, p in pools.items()}
    # Pages that need legacy encodings take sentences from the end of the pools
    # first, so they never repeat a multilingual page's text.
    legacy = non_utf8_pages(pools, rng_for(seed, "non_utf8"))

    # 2. Original pages, one generator per kind.
    pages: list[Page] = []
    pages += prose_pages(mods, doc_articles, rng_for(seed, "prose"))
    pages += code_pages(mods, rng_for(seed, "code"))
    pages += math_pages(math_docs(mods_by_name), rng_for(seed, "math"))
    pages += multilingual_pages(pools, rng_for(seed, "multilingual"))
    pages += legacy
    pages += spam_pages(rng_for(seed, "spam"))
    pages += dirty_pages(dirty_words(), rng_for(seed, "dirty"))
    pages += too_short_pages(mods, rng_for(seed, "short"))
    pages += log_pages(rng_for(seed, "logs"))
    pages += boilerplate_pages(rng_for(seed, "boilerplate"))
    pages.append(oversized_page(rng_for(seed, "oversized")))
    pages.append(not_found_page(rng_for(seed, "404")))

    meta_rng = rng_for(seed, "meta")
    used: set[str] = set()
    for i, page in enumerate(pages):
        page.family = i
        page.author = page.author or (meta_rng.choice(AUTHORS) if page.kind not in
                                      ("boilerplate_only", "spam", "dirty_words", "log_dump") else "")
        page.date = random_date(meta_rng)
        assign_url(page, i, used, meta_rng)

    # 3. Boilerplate sentences repeated inside many articles (line dedup).
    prose = [p for p in pages if p.kind == "good_prose" and p.blocks[0][0] != "raw"]
    shared_rng = rng_for(seed, "shared-lines")
    for page in shared_rng.sample(prose, min(SHARED_LINE_PAGES, len(prose))):
        lines = shared_rng.sample(SHARED_LINES, shared_rng.randint(2, 3))
        page.blocks = page.blocks + [("p", line) for line in lines]

    # 4. Render the originals.
    for page in pages:
        html_text = render(page, rng_for(seed, f"render:{page.url}"))
        page.body = html_text.encode(page.codec, errors="xmlcharrefreplace")

    # 5. Copies of originals.
    copy_rng = rng_for(seed, "copies")
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
                              date=random_date(copy_rng)))

    n = max(1, len(near_src) - 1)
    fracs = [NEAR_DUP_CHANGE[0] + (NEAR_DUP_CHANGE[1] - NEAR_DUP_CHANGE[0]) * i / n for i in range(len(near_src))]
    copy_rng.shuffle(fracs)
    for k, (src, frac) in enumerate(zip(near_src, fracs)):  # kind 6: edited copy, other template
        others = [name for name, _w in PROSE_SITES if SITES[name].host != src.site.host]
        site = SITES[copy_rng.choice(others)]
        words = vocab if src.lang == "en" else sorted({w for _t, x in src.blocks if _t == "p"
                                                       for w in x.split()})
        page = Page("near_duplicate", src.title, perturb(src.blocks, frac, words, copy_rng), site,
                    lang=src.lang, author=copy_rng.choice(AUTHORS), date=random_date(copy_rng),
                    family=src.family, section=copy_rng.choice(site.sections))
        assign_url(page, 100_000 + k, used, copy_rng)
        page.body = render(page, rng_for(seed, f"render:{page.url}")).encode("utf-8")
        copies.append(page)

    for k, src in enumerate(variant_src):  # kind 7: revisit with tracking params, later date
        if src.date > CRAWL_END - timedelta(days=60):  # leave room for a later revisit
            src.date = random_date(copy_rng, CRAWL_START, CRAWL_END - timedelta(days=90))
            src.body = render(src, rng_for(seed, f"render:{src.url}")).encode(src.codec, errors="xmlcharrefreplace")
        later = src.date + timedelta(days=copy_rng.randint(3, 55), seconds=copy_rng.randint(0, 86_399))
        note = ("p", f"Update {later:%B %d, %Y}: this article was revised to fix typos and clarify "
                     f"the examples.")
        words = vocab if src.lang == "en" else sorted({w for _t, x in src.blocks if _t == "p"
                                                       for w in x.split()})
        blocks = [note] + perturb(src.blocks, 0.01, words, copy_rng)
        page = replace(src, kind="url_variant", blocks=blocks, date=later, canonical=src.url,
                       url=variant_url(src.url, k, copy_rng))
        page.body = render(page, rng_for(seed, f"render:{page.url}")).encode(page.codec, errors="xmlcharrefreplace")
        copies.append(page)

    # 6. Bad input records.
    bad_rng = rng_for(seed, "bad")
    bad = [
        Page("non_html", "logo", [], SITES["docs"], url="https://docs.pyref.example/static/img/logo.png",
             body=png_bytes(), content_type="image/png"),
        Page("non_html", "report", [], SITES["news"],
             url="https://news.daily-ledger.example/files/annual-report-2023.pdf",
             body=FAKE_PDF, content_type="application/pdf"),
        Page("empty_body", "", [], SITES["blog"], url="https://blog.kiln-sample.test/2024/02/draft-post/",
             body=b""),
        Page("empty_body", "", [], SITES["wiki"], url="https://wiki.opencorpus.example/wiki/Special:Random",
             body=b""),
    ]
    for page in bad:
        page.date = random_date(bad_rng)
        page.family = -1

    everything = order_captures(pages + copies + bad, rng_for(seed, "order"))
    records = capture_records(everything, seed)
    write_warc(out_path, records)

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
    summary["records"] = len(records)
    summary["bytes"] = out_path.stat().st_size
    summary["seed"] = seed
    return summary
