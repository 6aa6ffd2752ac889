"""The demo's post-training data: SFT conversations and preference pairs, in TRL's formats.

Every answer is real text: the first sentence or two of a standard-library docstring,
asked about by module, function or class name, or a docstring paragraph to summarise.
The preferences are learnable by a tiny reward model from surface features alone:
the chosen answer is that fluent, grounded text; the rejected one is plainly worse
(another answer's words shuffled into word salad, the answer shouted in capitals with
a spam link, or a fragment cut off mid-sentence).

Held-out preference rows come from top-level packages (`email`, `json`, ...) that the
training rows never draw on, so a reward model's accuracy on them is not recall.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from random import Random

from kiln.demo.pages import CITIES, SITES, SPAM_KEYWORDS, SPAM_TEMPLATES, rng_for, slugify
from kiln.demo.sources import ModuleInfo, clean_rst, stdlib_modules

#: Rows written (fewer only where this machine's standard library is short of docstrings).
COUNTS = {"sft_messages": 300, "sft_prompt_completion": 75, "prefs": 300, "prefs_eval": 60}
#: Of the SFT conversations, row i has a system turn when i % 5 < 2 (2 in 5) and a second
#: user/assistant exchange when i % 4 == 3 (1 in 4); of the preference rows, row i is in
#: the message-list format when i % 5 == 4 (1 in 5) and has a margin when i % 2 == 0.
SYSTEM_EVERY, SYSTEM_OF = 5, 2
MULTI_TURN_EVERY = 4
PREF_MESSAGES_EVERY = 5
#: Llama 2's margin: larger when the rejected answer is much worse than the chosen.
MARGINS = {"salad": 1.0, "spam": 1.0, "truncated": 0.3}
#: Top-level packages held out for prefs_eval.jsonl: one in this many.
HELD_OUT_ONE_IN = 8
#: Packages whose docstrings are generated boilerplate (codecs), old or IDE internals.
SKIPPED_PACKAGES = ("encodings", "idlelib", "lib2to3", "distutils", "pydoc_data", "ensurepip")

SYSTEM_PROMPTS = (
    "You are a helpful assistant who answers questions about the Python standard library.",
    "Answer briefly and accurately, in plain English.",
    "You are a concise technical writer. Stay close to the official documentation.",
)
QUESTIONS = {
    "module": ("What does the Python module `{name}` do?", "What is the `{name}` module for?",
               "In a sentence or two, what does Python's `{name}` module provide?"),
    "function": ("What does `{name}` do?", "Explain `{name}` in a sentence or two.",
                 "What is `{name}` in the Python standard library for?"),
    "class": ("What is the class `{name}`?", "What is `{name}` used for?",
              "Describe the Python class `{name}` briefly."),
}
FOLLOW_UPS = ("And {question}", "Thanks. {Question}", "One more: {question}")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`'\"])")


@dataclass(frozen=True)
class Fact:
    """One documented thing and what its docstring says about it."""

    module: str  # the module whose source holds the docstring
    kind: str  # "module" | "function" | "class"
    name: str  # as a question names it: `json`, `json.dumps()`, `json.JSONDecoder`
    answer: str  # the docstring's first sentence, and its second when both are short
    passage: str  # the docstring's first paragraph, quoted by "Summarise:" prompts
    summary: str  # the passage's first sentence


def sentences(text: str) -> list[str]:
    return _SENTENCE_END.split(text)


def _fact(module: str, kind: str, name: str, doc: str) -> Fact | None:
    """The fact a docstring states, or None when its opening is not a usable answer
    (a title, a table, a doctest, a URL, a fragment)."""
    passage = " ".join(re.split(r"\n\s*\n", clean_rst(doc).strip())[0].split())
    if any(bad in passage for bad in (">>>", "http", "|", "::", "--")):
        return None
    sents = sentences(passage)
    answer = sents[0]
    if len(sents) > 1 and len(answer.split()) + len(sents[1].split()) <= 45:
        answer += " " + sents[1]
    if not (6 <= len(sents[0].split()) <= 50 and sents[0][0].isupper() and sents[0].endswith(".")):
        return None
    return Fact(module, kind, name, answer, passage, sents[0])


def facts_of(mods: list[ModuleInfo]) -> list[Fact]:
    """Every usable fact of the standard library, each answer once, in module order."""
    out, seen = [], set()
    for mod in mods:
        top = mod.name.split(".")[0]
        if mod.name.startswith("_") or "._" in mod.name or top in SKIPPED_PACKAGES:
            continue
        found = [_fact(mod.name, "module", mod.name, mod.doc)] if mod.doc else []
        for heading, doc in mod.sections:
            if heading.startswith("class "):
                found.append(_fact(mod.name, "class", f"{mod.name}.{heading[6:]}", doc))
            elif "._" not in heading:
                found.append(_fact(mod.name, "function", f"{mod.name}.{heading}", doc))
        for fact in found:
            if fact is not None and fact.answer not in seen:
                seen.add(fact.answer)
                out.append(fact)
    return out


def split_held_out(facts: list[Fact], rng: Random) -> tuple[list[Fact], list[Fact]]:
    """(training facts, held-out facts), split by top-level package."""
    tops = sorted({f.module.split(".")[0] for f in facts})
    rng.shuffle(tops)
    held = set(tops[:len(tops) // HELD_OUT_ONE_IN])
    return ([f for f in facts if f.module.split(".")[0] not in held],
            [f for f in facts if f.module.split(".")[0] in held])


def can_summarise(fact: Fact) -> bool:
    """A passage worth summarising: more than its first sentence, and a paragraph, not a page."""
    return len(sentences(fact.passage)) >= 2 and 30 <= len(fact.passage.split()) <= 150


def task(fact: Fact, rng: Random, summarise_share: float = 0.5) -> tuple[str, str]:
    """(prompt, reference answer): a question about the fact, or its passage to summarise."""
    if can_summarise(fact) and rng.random() < summarise_share:
        return f"Summarise: {fact.passage}", fact.summary
    return rng.choice(QUESTIONS[fact.kind]).format(name=fact.name), fact.answer


# ---- SFT -------------------------------------------------------------------------

def conversation(i: int, fact: Fact, pool: list[Fact], by_module: dict[str, list[Fact]], rng: Random) -> dict:
    messages = []
    if i % SYSTEM_EVERY < SYSTEM_OF:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    prompt, answer = task(fact, rng)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if i % MULTI_TURN_EVERY == MULTI_TURN_EVERY - 1:
        # The follow-up asks about the same module where it documents more than one thing.
        siblings = [f for f in by_module[fact.module] if f != fact] or [f for f in pool if f != fact]
        other = rng.choice(siblings)
        question = rng.choice(QUESTIONS[other.kind]).format(name=other.name)
        follow_up = rng.choice(FOLLOW_UPS).format(question=question[0].lower() + question[1:], Question=question)
        messages += [{"role": "user", "content": follow_up}, {"role": "assistant", "content": other.answer}]
    return {"messages": messages}


def prompt_completion(fact: Fact, rng: Random) -> dict:
    prompt, answer = task(fact, rng)
    cue = "Summary:" if prompt.startswith("Summarise:") else "Answer:"
    if cue == "Answer:":
        prompt = f"Question: {prompt}"
    return {"prompt": f"{prompt}\n{cue}", "completion": f" {answer}"}


# ---- preferences -----------------------------------------------------------------

def rejected_answer(kind: str, fact: Fact, chosen: str, pool: list[Fact], rng: Random) -> str:
    """A plainly worse answer than `chosen`, the answer about `fact` (never equal to it)."""
    if kind == "salad":  # real words, no sentence: another module's answer, shuffled
        others = [f.answer.split() for f in pool if f.module != fact.module]
        words = rng.choice([w for w in others if sorted(w) != sorted(chosen.split())])
        rng.shuffle(words)
        return " ".join(words)
    if kind == "spam":
        keyword = rng.choice(SPAM_KEYWORDS)
        pitch = rng.choice(SPAM_TEMPLATES).format(kw=keyword, KW=keyword.title(), kw2=rng.choice(SPAM_KEYWORDS),
                                                  city=rng.choice(CITIES))
        link = f"http://{SITES['shop'].host}/{slugify(keyword, 'deal')}?ref={rng.randint(100, 999)}"
        return f"{chosen.upper()} {pitch.upper()} CLICK {link} !!!"
    words = chosen.split()  # truncated: the right start, cut off mid-sentence (never at a full stop)
    return " ".join(words[:max(3, len(words) // 3)]).rstrip(".,;:!?")


def preference(i: int, fact: Fact, pool: list[Fact], rng: Random, with_extras: bool = True) -> dict:
    kind = tuple(MARGINS)[i % len(MARGINS)]
    prompt, chosen = task(fact, rng)
    rejected = rejected_answer(kind, fact, chosen, pool, rng)
    if with_extras and i % PREF_MESSAGES_EVERY == PREF_MESSAGES_EVERY - 1:
        row: dict = {"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]}
    else:
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if with_extras and i % 2 == 0:
        row["margin"] = MARGINS[kind]
    return row


# ---- the builder -------------------------------------------------------------------

def build_post_data(out_dir: str | Path, seed: int = 1) -> dict:
    """Write the demo's post-training data into `out_dir`; returns the row counts.

    - sft.jsonl: 300 conversations `{"messages": [{"role", "content"}, ...]}` (120 with
      a system turn, 75 with two assistant turns), then 75 rows `{"prompt", "completion"}`;
    - prefs.jsonl: 300 rows `{"prompt", "chosen", "rejected"}` with strings, but every
      fifth (60) with message lists, and a `"margin"` on every other row (150); the
      rejected answers are a third each word salad, spam and truncated (MARGINS);
    - prefs_eval.jsonl: 60 rows `{"prompt", "chosen", "rejected"}` (strings, no margin)
      about packages none of the rows above draw on.
    The same seed on the same machine gives byte-identical files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = split_held_out(facts_of(stdlib_modules()), rng_for(seed, "post:split"))
    by_module: dict[str, list[Fact]] = {}
    for fact in train:
        by_module.setdefault(fact.module, []).append(fact)

    sft_rng = rng_for(seed, "post:sft")
    n_messages = min(COUNTS["sft_messages"], len(train))
    picked = sft_rng.sample(train, min(n_messages + COUNTS["sft_prompt_completion"], len(train)))
    sft = [conversation(i, f, train, by_module, sft_rng) for i, f in enumerate(picked[:n_messages])]
    sft += [prompt_completion(f, sft_rng) for f in picked[n_messages:]]

    prefs_rng = rng_for(seed, "post:prefs")
    prefs = [preference(i, f, train, prefs_rng)
             for i, f in enumerate(prefs_rng.sample(train, min(COUNTS["prefs"], len(train))))]
    eval_rng = rng_for(seed, "post:prefs_eval")
    prefs_eval = [preference(i, f, held_out, eval_rng, with_extras=False)
                  for i, f in enumerate(eval_rng.sample(held_out, min(COUNTS["prefs_eval"], len(held_out))))]

    def dump(name: str, rows: list[dict]) -> int:
        with open(out / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return len(rows)

    return {"sft": dump("sft.jsonl", sft), "prefs": dump("prefs.jsonl", prefs),
            "prefs_eval": dump("prefs_eval.jsonl", prefs_eval)}
