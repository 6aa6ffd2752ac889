"""The demo's labelled training sets and evaluation sets, labelled by construction.

They come from the same page generators as the sample WARC, with another seed, so
the classifiers learn from pages the sample does not contain.
"""

from __future__ import annotations

import json
from pathlib import Path
from random import Random

from kiln.demo.maths import MATH_EXAMPLES, math_pages
from kiln.demo.pages import (CITIES, SPAM_KEYWORDS, SPAM_TEMPLATES, Page, boilerplate_pages, code_pages, dirty_pages,
                             log_pages, prose_pages, rng_for, spam_pages, too_short_pages)
from kiln.demo.sources import MATH_MODULES, ModuleInfo, clean_rst, dirty_words, math_docs, stdlib_modules


def plain_text(page: Page) -> str:
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
    mods = stdlib_modules()
    prose = prose_pages(mods, [], rng_for(seed, "labels:prose"))
    code = code_pages(mods, rng_for(seed, "labels:code"))
    maths = math_pages(math_docs({m.name: m for m in mods}), rng_for(seed, "labels:math"))

    def dump(name: str, rows: list[dict]) -> int:
        with open(out / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return len(rows)

    counts = {}
    domain_rows = ([{"text": plain_text(p), "label": "general"} for p in prose]
                   + [{"text": plain_text(p), "label": "code"} for p in code]
                   + [{"text": plain_text(p), "label": "math"} for p in maths])
    rng_for(seed, "labels:domain-order").shuffle(domain_rows)
    counts["domain"] = dump("domain.jsonl", domain_rows)

    good = [plain_text(p) for p in prose + code + maths]
    counts["quality_pos"] = dump("quality_pos.jsonl", [{"text": t} for t in good])
    bad_rng = rng_for(seed, "labels:bad")
    bad_pages: list[Page] = []
    for round_ in range(4):  # each generator makes a fixed number; draw several rounds
        r = rng_for(seed, f"labels:bad:{round_}")
        bad_pages += spam_pages(r) + dirty_pages(dirty_words(), r) + too_short_pages(mods, r)
        bad_pages += log_pages(r) + boilerplate_pages(r)
    bad = [plain_text(p) for p in bad_pages]
    bad += [_word_salad(t, bad_rng) for t in bad_rng.sample(good, min(len(good), len(good) - len(bad)))]
    counts["quality_neg"] = dump("quality_neg.jsonl", [{"text": t} for t in bad])

    graded_rng = rng_for(seed, "labels:graded")
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
        docs = [(m.name, " ".join(clean_rst(d).split())) for m in modules for _h, d in m.sections]
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
    counts["eval_pydoc_qa"] = dump("eval/pydoc_qa.jsonl", passages(used, rng_for(seed, "labels:eval"), 60))
    counts["eval_idle_qa"] = dump("eval/idle_qa.jsonl", passages(idle, rng_for(seed, "labels:idle"), 20))

    # The annealing probe's eval sets (make probe): worked maths examples as text (bits
    # per byte), and the pydoc passages as multiple choice (kiln probe's format).
    probe_rng = rng_for(seed, "labels:probe-math")
    examples = [g(probe_rng) for g in (probe_rng.choice(gens) for gens in MATH_EXAMPLES.values() for _ in range(6))]
    counts["eval_math_text"] = dump("eval/math_text.jsonl", [{"text": "\n\n".join([heading, *paras])}
                                                              for heading, paras in examples])
    qa = passages(used, rng_for(seed, "labels:eval"), 60)  # the rows of pydoc_qa.jsonl again
    counts["eval_pydoc_mc"] = dump("eval/pydoc_mc.jsonl", [
        {"context": row["question"] + "\nAnswer:", "choices": row["choices"], "answer": row["choices"].index(row["answer"])}
        for row in qa])
    return counts
