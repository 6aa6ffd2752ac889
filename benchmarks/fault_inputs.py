"""Damaged inputs for benchmarks/faults.py, each with what a correct reader must make of it.

A corrupted file is built from a small valid one whose records' byte ranges are known,
so every corruption says which records it left intact (they must come out, kept or
dropped with a reason), which it damaged (they may come out at most once, or vanish
into one counted bad-record row) and which it removed (they must not come out). The
expectations are per record URL; the fault suite compares them with the rows kiln
wrote for that file.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the tests' page builder and stdlib text, not a copy of them

from kiln.demo.warc import Record, http_response  # noqa: E402
from kiln.demo.warc import write_warc as write_records  # noqa: E402
from tests.conftest import docstrings, page  # noqa: E402

# Real English prose: long docstrings of a few standard-library modules.
MODULES = ("argparse", "textwrap", "difflib", "tarfile", "shutil", "heapq", "bisect", "calendar")


def paragraphs(limit: int = 40) -> list[str]:
    out = []
    for module in MODULES:
        out.extend(" ".join(d.split()) for d in docstrings(module, min_chars=300))
    return out[:limit]


# --------------------------------------------------------------------------- WARC


@dataclass
class Member:
    """One record of a WARC (one gzip member in a .warc.gz) and where its bytes lie."""

    url: str
    start: int
    end: int


@dataclass
class BaseWarc:
    data: bytes
    members: list[Member]
    gz: bool

    @property
    def suffix(self) -> str:
        return ".warc.gz" if self.gz else ".warc"


def warc_records(n_html: int = 5, non_html: bool = True, prefix: str = "https://faults.example/page") -> list[Record]:
    """`n_html` HTML pages of real prose (three paragraphs each) and, with `non_html`, one
    text/plain response: every record a response, so each is one row of the extract stage."""
    texts = paragraphs()
    records = []
    for i in range(n_html + int(non_html)):
        url = f"{prefix}/{i}"
        if i < n_html:
            body = page(f"Page {i}", texts[3 * i:3 * i + 3]).encode()
            ctype = "text/html; charset=utf-8"
        else:
            body = ("plain text, not a page\n" * 20).encode()
            ctype = "text/plain"
        headers = {"WARC-Date": f"2024-01-{i + 1:02d}T00:00:00Z",
                   "WARC-Record-ID": f"<urn:uuid:00000000-0000-4000-8000-{i:012d}>"}
        records.append(Record("response", url, body, headers,
                              http=http_response(200, "OK", [("Content-Type", ctype)])))
    return records


def build_base_warc(tmp: Path, gz: bool, records: list[Record] | None = None) -> BaseWarc:
    """The records written one at a time and concatenated (a gzip member per record when
    `gz`, as Common Crawl ships): the byte range of every record is then known."""
    records = records or warc_records()
    scratch = Path(tempfile.mkdtemp(dir=tmp))
    data, members = b"", []
    for i, rec in enumerate(records):
        one = write_records(scratch / f"one-{i}{'.warc.gz' if gz else '.warc'}", [rec], gzip=gz).read_bytes()
        members.append(Member(rec.url, len(data), len(data) + len(one)))
        data += one
    shutil.rmtree(scratch)
    return BaseWarc(data, members, gz)


@dataclass
class Expect:
    """What the rows of one input file must be. `appear[url] = (min, max)` rows whose id
    is the record's (or, for a damaged record, whose URL is the record's or a few flipped
    characters away); `fault_rows` bounds the rows without a URL (bad_record,
    truncated_record); `never_kept` lists URLs that must not be kept."""

    appear: dict[str, tuple[int, int]] = field(default_factory=dict)
    damaged: set[str] = field(default_factory=set)
    fault_rows: int = 0
    never_kept: set[str] = field(default_factory=set)
    flips: int = 0  # characters a damaged URL may differ by


@dataclass
class FaultFile:
    name: str  # e.g. "warc.gz flip 3 bytes"
    data: bytes
    suffix: str
    expect: Expect
    detail: str = ""


def flip_bytes(base: BaseWarc, rng: random.Random) -> FaultFile:
    n = rng.randint(1, 8)
    positions = sorted(rng.sample(range(len(base.data)), n))
    data = bytearray(base.data)
    for p in positions:
        data[p] ^= 1 << rng.randrange(8)  # one bit: the byte always changes
    exp = Expect(flips=n)
    for m in base.members:
        if any(m.start <= p < m.end for p in positions):
            exp.damaged.add(m.url)
            exp.appear[m.url] = (0, 1)
            exp.fault_rows += 1
        else:
            exp.appear[m.url] = (1, 1)
    return FaultFile(f"flip {n} bit(s)", bytes(data), base.suffix, exp, f"offsets {positions}")


def truncate(base: BaseWarc, rng: random.Random) -> FaultFile:
    cut = rng.randint(1, len(base.data) - 1)
    exp = Expect()
    for m in base.members:
        if m.end <= cut:
            exp.appear[m.url] = (1, 1)
        elif m.start < cut:
            exp.damaged.add(m.url)
            exp.appear[m.url] = (0, 1)
            exp.fault_rows = 1
        else:
            exp.appear[m.url] = (0, 0)  # its bytes are gone: a row for it would be invented
    if cut in [m.start for m in base.members]:
        exp.fault_rows = 1  # cut on a boundary: a valid, shorter file; one counted row at most
    return FaultFile("truncated", base.data[:cut], base.suffix, exp, f"at {cut} of {len(base.data)}")


def duplicate_member(base: BaseWarc, rng: random.Random) -> FaultFile:
    k = rng.randrange(len(base.members))
    at = rng.randint(0, len(base.members))  # insert the copy before member `at` (or at the end)
    m = base.members[k]
    copy = base.data[m.start:m.end]
    cut = base.members[at].start if at < len(base.members) else len(base.data)
    exp = Expect()
    for other in base.members:
        exp.appear[other.url] = (2, 2) if other is m else (1, 1)
    what = "gzip member" if base.gz else "record"
    return FaultFile(f"{what} duplicated", base.data[:cut] + copy + base.data[cut:], base.suffix, exp,
                     f"record {k} copied before record {at}")


def warc_corruptions(tmp: Path, n: int, seed: int) -> list[FaultFile]:
    """`n` seeded corruptions, a third of each kind, of a .warc.gz and a .warc alike."""
    rng = random.Random(seed)
    bases = [build_base_warc(tmp, gz=True), build_base_warc(tmp, gz=False)]
    kinds = [flip_bytes, truncate, duplicate_member]
    out = []
    for i in range(n):
        base = bases[i % 2]
        f = kinds[(i // 2) % 3](base, rng)
        f.name = f"{'warc.gz' if base.gz else 'warc'} {f.name}"
        out.append(f)
    return out


# --------------------------------------------------------------------------- JSONL

VALID, NEVER_KEPT, EITHER, UNPARSABLE = "valid", "never_kept", "either", "unparsable"


@dataclass
class Line:
    raw: bytes  # without its newline
    url: str | None
    # VALID: must come out once (kept, or dropped with a reason); NEVER_KEPT: an object whose
    # content is unusable, must come out once dropped with a reason; EITHER: once or not at
    # all; UNPARSABLE: no URL can come out, at most one row without one
    kind: str
    what: str


def _obj_line(url: str, column: str, value, texts: list[str], rng: random.Random) -> dict:
    text = " ".join(rng.sample(texts, 2))
    obj = {"url": url, "text": text, "html": page("A page", [text])}
    obj[column] = value
    return obj


def _dump(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def jsonl_line(kind: str, url: str, column: str, texts: list[str], rng: random.Random) -> Line:
    """One line of a given fault kind; `column` is the content column the job reads."""
    text = " ".join(rng.sample(texts, 2))
    good = _obj_line(url, column, text if column == "text" else page("A page", [text]), texts, rng)
    if kind == "valid":
        return Line(_dump(good), url, VALID, "valid")
    if kind == "valid_nul":  # a JSON \u0000 escape inside the text: still a valid string
        good[column] = good[column].replace(" ", " \u0000 ", 1)
        return Line(json.dumps(good).encode(), url, VALID, "NUL escape in the text")
    if kind == "valid_crlf":
        return Line(_dump(good) + b"\r", url, VALID, "CRLF line ending")
    if kind == "valid_unicode":  # non-ASCII text, properly UTF-8
        good[column] = good[column] + " Straße, café, naïve, 東京"
        return Line(_dump(good), url, VALID, "non-ASCII UTF-8")
    if kind == "empty_text":
        good[column] = rng.choice(["", "   ", "\n\t"])
        return Line(_dump(good), url, NEVER_KEPT, f"empty {column} {good[column]!r}")
    if kind == "missing_column":
        del good[column]
        return Line(_dump(good), url, NEVER_KEPT, f"no {column} key")
    if kind == "null_value":
        good[column] = None
        return Line(_dump(good), url, NEVER_KEPT, f"{column}: null")
    if kind == "non_string":
        value = rng.choice([12345, 3.5, ["a", "list"], {"a": "dict"}, True, False, 0])
        good[column] = value
        return Line(_dump(good), url, NEVER_KEPT, f"{column}: {json.dumps(value)}")
    if kind == "broken":
        raw = _dump(good)
        return Line(raw[:rng.randint(1, len(raw) - 2)], None, UNPARSABLE, "cut-off JSON")
    if kind == "not_object":
        raw = rng.choice([b"[1, 2, 3]", b'"just a string"', b"42", b"null", b"true"])
        return Line(raw, None, UNPARSABLE, f"JSON {raw.decode()} (not an object)")
    if kind == "latin1":  # the whole line in Latin-1: invalid UTF-8
        good[column] = good[column] + " café crème brûlée"
        return Line(json.dumps(good, ensure_ascii=False).encode("latin-1", "replace"), url, EITHER,
                    "Latin-1 encoded line")
    if kind == "bad_utf8":  # stray continuation bytes inside the string
        raw = _dump(good)
        i = raw.index(b'"' + column.encode() + b'": "') + len(column) + 5
        return Line(raw[:i] + b"\x80\xbf\xfe" + raw[i:], url, EITHER, "invalid UTF-8 bytes in the string")
    if kind == "lone_surrogate":  # valid JSON escape, not a valid Unicode string
        raw = json.dumps(good).encode()
        i = raw.index(b'"' + column.encode() + b'": "') + len(column) + 5
        return Line(raw[:i] + rb"\ud800" + raw[i:], url, EITHER, "lone surrogate escape \\ud800")
    if kind == "giant_valid":  # a long but valid document
        reps = 1_500_000 // len(text) + 1 if column == "text" else 2_200_000 // len(text) + 1
        good[column] = " ".join([text] * reps) if column == "text" else page("Huge", [text] * reps)
        # html larger than [read] max_html_bytes is a valid record dropped as html_too_large
        return Line(_dump(good), url, VALID, f"giant line ({len(_dump(good)) / 1e6:.1f} MB)")
    if kind == "giant_garbage":  # one line: random bytes with every newline byte replaced
        block = bytes(rng.getrandbits(8) for _ in range(4096)).replace(b"\n", b"?").replace(b"\r", b"?")
        return Line(block * 700, None, UNPARSABLE, "giant line of random bytes (2.9 MB)")
    raise ValueError(kind)


FAULT_KINDS = ("empty_text", "missing_column", "null_value", "non_string", "non_string", "broken", "broken",
               "not_object", "latin1", "bad_utf8", "lone_surrogate", "giant_garbage", "valid_nul", "valid_crlf",
               "valid_unicode", "blank")
GIANT_VALID_EVERY = 10  # one file in ten carries a giant valid line as well


@dataclass
class JsonlFile:
    name: str
    data: bytes
    column: str  # text or html: the extract job's content column
    lines: list[Line]
    suffix: str = ".jsonl"


def jsonl_file(index: int, column: str, texts: list[str], rng: random.Random, all_broken: bool = False) -> JsonlFile:
    lines: list[Line] = []
    kinds = (["broken"] * rng.randint(2, 4) if all_broken else
             ["valid"] * rng.randint(1, 3) + [rng.choice(FAULT_KINDS) for _ in range(rng.randint(2, 5))])
    if not all_broken and index % GIANT_VALID_EVERY == 0:
        kinds.append("giant_valid")
    rng.shuffle(kinds)
    blanks = 0
    for j, kind in enumerate(kinds):
        if kind == "blank":  # an empty or whitespace-only line: not a record at all
            lines.append(Line(rng.choice([b"", b"   ", b"\t"]), None, UNPARSABLE, "blank line"))
            blanks += 1
            continue
        lines.append(jsonl_line(kind, f"https://faults.example/jsonl/{index}/{j}", column, texts, rng))
    bom = not all_broken and rng.random() < 0.05
    data = b"\n".join(line.raw for line in lines)
    if rng.random() < 0.8:
        data += b"\n"  # else the last line has no newline
    if bom:
        data = b"\xef\xbb\xbf" + data
        if lines and lines[0].kind == VALID:
            lines[0].kind, lines[0].what = EITHER, lines[0].what + " after a UTF-8 BOM"
    suffix = ".jsonl"
    if rng.random() < 0.15:  # some files compressed (intact): the same lines through gzip
        data, suffix = gzip_bytes(data), ".jsonl.gz"
    what = "; ".join(sorted({line.what.split(" (")[0] for line in lines if line.kind != VALID} or {"all valid"}))
    name = (f"{column}{' gz' if suffix.endswith('.gz') else ''}{' BOM' if bom else ''}: {what}"
            + (" [all lines broken]" if all_broken else ""))
    return JsonlFile(name, data, column, lines, suffix)


def jsonl_corruptions(n: int, seed: int) -> list[JsonlFile]:
    """`n` seeded malformed JSONL files, half read with --text-column text and half with
    --html-column html; three read as text are nothing but broken lines."""
    rng = random.Random(seed)
    texts = paragraphs()
    all_broken = set(range(5, n, max(1, n // 3)))
    return [jsonl_file(i, "text" if i % 2 == 1 or i in all_broken else "html", texts, rng,
                       all_broken=i in all_broken) for i in range(n)]


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


# --------------------------------------------------------------------------- training


def training_corpus(root: Path) -> Path:
    """Token shards of real text in three domains and the tokenizer they were cut with
    (`root/tok`), as tests/training builds them; `root/tok_other` is a second tokenizer
    of the same vocabulary size trained on other text (its hash differs)."""
    from kiln.curation.tokenizer import train_tokenizer
    from tests.conftest import STDLIB
    from tests.training.corpus import build_corpus

    quiet = lambda msg: None  # noqa: E731
    build_corpus(root, log=quiet)
    code = ["\n".join((STDLIB / f"{m}.py").read_text().splitlines()[i:i + 30])
            for m in ("shutil", "heapq", "bisect") for i in range(0, 900, 30)]
    train_tokenizer(docstrings("calendar") + docstrings("pathlib") + code, str(root / "tok_other"),
                    vocab_size=512, log=quiet)
    return root


def training_recipe(path: Path, corpus: Path, output: Path, tokenizer: str = "tok", tokens: int = 12_800) -> Path:
    """The trainer tests' debug recipe: 25 steps of 8 x 64 tokens, a checkpoint every 5."""
    from tests.training.corpus import CORE, recipe_text

    stages = CORE.replace("tokens = 12_800", f"tokens = {tokens}")
    path.write_text(recipe_text(corpus, output, stages, tokenizer=tokenizer))
    return path
