"""The Llama 3 heuristic filters that datatrove lacks, as datatrove filters.

Llama 3 (section 3.1.1) adds to the Gopher/C4 rules: (a) "duplicated n-gram
coverage ratio" to remove lines of repeated content such as logging or error
messages, which are long and unique and so survive line dedup; (b) "dirty word
counting" for adult pages that domain block lists miss; (c) "a token-distribution
Kullback-Leibler divergence to filter out documents containing excessive numbers
of outlier tokens compared to the training corpus distribution". Each is a
`BaseFilter`, so it runs in a datatrove pipeline as well as in kiln's Spark stage.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from importlib import resources

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

# Han, kana and CJK compatibility characters are one token each: these scripts do not
# separate words with spaces, and a whole sentence as one "word" is useless for counting.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
TOKEN_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def tokens(text: str) -> list[str]:
    return TOKEN_RE.findall(text.lower())


class DuplicatedNgramLineFilter(BaseFilter):
    """Removes lines mostly covered by n-grams repeated elsewhere in the document.

    A word is covered when it lies inside an n-gram that occurs at least twice in
    the document (Gopher's duplicated n-gram coverage, taken per line). Log and
    error dumps repeat their phrases line after line with a varying timestamp or
    id, so each line is unique yet mostly covered. The document is dropped when
    more than `max_removed_fraction` of its characters would go.
    """

    name = "Llama 3 duplicated n-gram lines"

    def __init__(self, n: int = 5, max_line_coverage: float = 0.8, min_line_words: int = 10,
                 max_removed_fraction: float = 0.5, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.n = n
        self.max_line_coverage = max_line_coverage
        self.min_line_words = min_line_words
        self.max_removed_fraction = max_removed_fraction

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lines = doc.text.split("\n")
        line_words = [tokens(line) for line in lines]
        flat = [(i, w) for i, words in enumerate(line_words) for w in words]
        n = self.n
        grams = Counter(tuple(w for _, w in flat[j:j + n]) for j in range(len(flat) - n + 1))
        covered = [False] * len(flat)
        for j in range(len(flat) - n + 1):
            if grams[tuple(w for _, w in flat[j:j + n])] > 1:
                covered[j:j + n] = [True] * n
        covered_chars = [0] * len(lines)
        word_chars = [0] * len(lines)
        for (i, w), c in zip(flat, covered):
            word_chars[i] += len(w)
            covered_chars[i] += len(w) if c else 0
        remove = [
            len(line_words[i]) >= self.min_line_words
            and covered_chars[i] > self.max_line_coverage * word_chars[i]
            for i in range(len(lines))
        ]
        if not any(remove):
            return True
        removed_chars = sum(len(line) for line, r in zip(lines, remove) if r)
        if removed_chars > self.max_removed_fraction * len(doc.text):
            return False, "dup_ngram_coverage"
        self.stat_update("lines_removed", value=sum(remove))
        doc.text = "\n".join(line for line, r in zip(lines, remove) if not r)
        return True


def load_word_list(path: str = "") -> frozenset[str]:
    """The dirty-word list: a local file (one entry per line, # comments) or kiln's own
    `dirty_words_en.txt`, the sexual and obscene part of better-profanity's list."""
    if path:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    else:
        text = (resources.files("kiln.curation.filters") / "dirty_words_en.txt").read_text("utf-8")
    lines = (line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return frozenset(" ".join(tokens(line)) for line in lines if tokens(line))


class DirtyWordsFilter(BaseFilter):
    """Drops documents with many hits from a dirty-word list (C4's list idea, counted).

    C4 dropped a page on any single hit, which also removes medical and legal text;
    Llama 3 counts. A page is dropped when it has at least `min_hits` hits and they
    make at least `min_ratio` of its words. Multi-word entries match as phrases.
    """

    name = "Llama 3 dirty words"

    def __init__(self, min_hits: int = 3, min_ratio: float = 0.005, word_list_path: str = "",
                 exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.min_hits = min_hits
        self.min_ratio = min_ratio
        self.word_list_path = word_list_path
        self._words = None

    @property
    def words(self) -> frozenset[str]:
        if self._words is None:
            self._words = load_word_list(self.word_list_path)
            self._max_len = max((w.count(" ") + 1 for w in self._words), default=1)
        return self._words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        words = self.words
        toks = tokens(doc.text)
        hits = 0
        for length in range(1, self._max_len + 1):
            hits += sum(" ".join(toks[i:i + length]) in words for i in range(len(toks) - length + 1))
        if hits >= self.min_hits and hits >= self.min_ratio * max(len(toks), 1):
            return False, "dirty_words"
        return True


class TokenKLFilter(BaseFilter):
    """Drops documents whose token distribution is far from the corpus's (KL divergence).

    The reference is a unigram distribution per language, computed from the corpus
    in a first pass (`reference_from_counts`): the `vocab_size` most frequent tokens
    and one bucket for all others, add-`alpha` smoothed. A document's KL(p_doc || q)
    is large when its mass sits on tokens the corpus rarely uses (gibberish, foreign
    scripts, encoded data) or piles on a few tokens (keyword stuffing).
    """

    name = "Llama 3 token-distribution KL"

    def __init__(self, max_kl: float = 4.0, min_tokens: int = 50, vocab_size: int = 50_000,
                 alpha: float = 1.0, reference: dict | None = None, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.max_kl = max_kl
        self.min_tokens = min_tokens
        self.vocab_size = vocab_size
        self.alpha = alpha
        self.reference = reference  # {lang: (log_q: dict[token, float], log_q_other: float)}

    def kl(self, text: str, lang: str | None) -> float | None:
        ref = (self.reference or {}).get(lang or "")
        toks = tokens(text)
        if ref is None or len(toks) < self.min_tokens:
            return None
        log_q, log_q_other = ref
        counts = Counter(toks)
        n = len(toks)
        other = 0
        kl = 0.0
        for tok, c in counts.items():
            lq = log_q.get(tok)
            if lq is None:
                other += c
            else:
                kl += c / n * (math.log(c / n) - lq)
        if other:
            kl += other / n * (math.log(other / n) - log_q_other)
        return kl

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self.reference is None:
            raise RuntimeError("TokenKLFilter needs a reference distribution (first pass) before filtering")
        kl = self.kl(doc.text, doc.metadata.get("lang", ""))
        if kl is not None and kl > self.max_kl:
            return False, "token_kl_outlier"
        return True


def reference_from_counts(counts: dict[str, dict[str, int]], totals: dict[str, int], alpha: float) -> dict:
    """Smoothed log-probabilities from per-language top-token counts and total token counts."""
    reference = {}
    for lang, top in counts.items():
        total = totals[lang]
        other = total - sum(top.values())
        denom = total + alpha * (len(top) + 1)
        log_q = {tok: math.log((c + alpha) / denom) for tok, c in top.items()}
        reference[lang] = (log_q, math.log((other + alpha) / denom))
    return reference
