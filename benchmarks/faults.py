"""The fault suite: kiln's real commands on damaged input and under kill -9, with the
accounting checked row by row.

Every case runs kiln's own code (`kiln.cli.main` in-process, sharing one Spark session,
or `python -m kiln.cli` in a subprocess where a process is to be killed or timed) and
reports its outcome and three checks:

- in == kept + dropped: the stage's stats.json balances, its counts are the rows it
  wrote (docs/ and dropped/<reason>/), and the rows of each input file are the rows
  kiln's reader makes of that file on its own;
- nothing invented: every row traces to a record of its input file (WARC records by
  id, a damaged one by its URL; JSONL records by URL), no record comes out more often
  than the file holds it, a value that is not a document (a number where the text
  should be) is never kept, and rows without a URL (bad_record, truncated_record) are
  no more than the damaged places;
- nothing lost: every record of the input that the damage left intact comes out,
  kept or dropped with a reason; so does a JSONL object whose content is unusable (a
  number, a null, no such key): dropped with its reason, not skipped. A line in a
  wrong encoding, or valid JSON after a byte-order mark, may come out either way.

Groups of cases:

- warc: 100 seeded corruptions of a small WARC of real pages (.warc.gz and .warc
  alike): bits flipped, truncation at a random offset, a gzip member (or record)
  duplicated. All files go through one `kiln curate extract` job (`source` says which
  row came from which file); a job that fails is split in halves until the failing
  file is found, and that file's case is a crash.
- jsonl: 100 seeded malformed JSONL files (cut-off lines, JSON that is not an object,
  non-string and null values, Latin-1 and invalid UTF-8, lone surrogates, blank lines,
  giant lines, a BOM, no final newline, gzip), half through `--text-column text` and
  half through the HTML path; three are nothing but broken lines.
- named: the thirteen items of the hardening issue, one case each, each checking the
  fixed behaviour the issue describes.
- kill: kill -9 of `kiln train` at a seeded random step, then a rerun, against an
  uninterrupted run (same per-step losses and final loss); kill -9 of
  `kiln curate pipeline` at a seeded random moment of a seeded random stage, then a
  rerun, against an uninterrupted run (same funnel, same rows in every stage).

    python benchmarks/faults.py                 (make faults)
    python benchmarks/faults.py --only named kill --keep /tmp/faults

Nothing here raises on a failed case: it reports (`--strict` exits 1 on any FAIL).
The table is printed and written with a JSON of the same results to
`benchmarks/results/faults_<date>_<host>.{md,json}`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
# Before pyspark is imported: no network, loopback only, Spark's Python workers run
# this interpreter, and langid finds the bundled fastText model.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
# Spark's console progress bar would interleave with the suite's table.
os.environ.setdefault("PYSPARK_SUBMIT_ARGS", "--conf spark.ui.showConsoleProgress=false pyspark-shell")
if (ROOT / ".venv/share/kiln/lid.176.ftz").exists():
    os.environ.setdefault("KILN_LID_MODEL", str(ROOT / ".venv/share/kiln/lid.176.ftz"))

import polars as pl  # noqa: E402

from common import log, machine, processes, versions, write_results  # noqa: E402
from fault_inputs import (EITHER, NEVER_KEPT, UNPARSABLE, VALID, FaultFile, JsonlFile, build_base_warc,  # noqa: E402
                          gzip_bytes, jsonl_corruptions, jsonl_line, paragraphs, training_corpus, training_recipe,
                          warc_corruptions, warc_records)
from kiln.cli import main as kiln_main  # noqa: E402
from kiln.curation.readers import ReadConfig, read_jsonl, read_warc  # noqa: E402

COLUMNS = ["id", "url", "source"]
KILL_TIMEOUT_S = 60  # a job that has not finished this long after a worker was killed is hung
WORK_MARKER = ".kiln-faults"  # marks a --keep folder as the suite's own, to be replaced by the next run
# What the JVM prints when a Spark session starts: a refusal must come before any of it.
SPARK_STARTED = ("log4j", "SparkContext", "NativeCodeLoader")


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    group: str
    case: str
    outcome: str  # what kiln did: "ran", "refused (rc 2)", "crashed: TypeError ...", "hung", ...
    balanced: bool | None  # in == kept + dropped (None: not applicable)
    not_invented: bool | None
    not_lost: bool | None
    passed: bool
    detail: str = ""
    seconds: float = 0.0


def verdict(expected: bool, *checks: bool | None) -> bool:
    return expected and all(c is not False for c in checks)


def mark(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


# --------------------------------------------------------------------------- running kiln


@dataclass
class Call:
    rc: int | None  # None: kiln raised instead of returning
    err: str  # stderr, and the error summary when it raised
    seconds: float


def kiln(*argv: str) -> Call:
    """`kiln ARGV` in this process, its stderr and stdout captured."""
    err, out = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = kiln_main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a crash is an outcome to report (DCP raises BaseExceptions)
        rc = None
        err.write("\n" + short_error(e))
    return Call(rc, err.getvalue(), time.perf_counter() - t0)


_PY_ERROR = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt))\b:?(.*)$")


def short_error(e: BaseException | str) -> str:
    """The Python error behind a failed Spark job (the last `XxxError: ...` line of the
    worker's traceback), else the exception's first line."""
    text = str(e)
    found = [m for m in (_PY_ERROR.match(line) for line in text.splitlines()) if m]
    python = [m for m in found if not m.group(1).startswith(("org.", "java.", "py4j."))]
    if python:
        return (python[-1].group(1) + ":" + python[-1].group(2))[:240]
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}"[:240] if isinstance(e, BaseException) else first[:240]


def call_outcome(call: Call) -> str:
    if call.rc == 0:
        return "ran"
    if call.rc is None:
        return "crashed: " + call.err.strip().splitlines()[-1][:200]
    message = [line for line in call.err.splitlines() if line.startswith("kiln: error:")]
    return f"{'refused' if call.rc == 2 else 'failed'} (rc {call.rc})" + (
        f": {message[-1].removeprefix('kiln: error: ')[:200]}" if message else "")


def stage_rows(out: Path) -> pl.DataFrame:
    """Every row a stage wrote: docs/ (drop_reason null) and dropped/drop_reason=R/.

    A stage inside a fused group writes no docs/: what it kept is every row of the
    pipeline's next stage (that stage's input), read from there."""
    frames = [pl.read_parquet(f, columns=COLUMNS).with_columns(pl.lit(None, pl.String).alias("drop_reason"))
              for f in sorted((out / "docs").glob("*.parquet"))]
    if not (out / "docs").exists() and (nxt := next_stage_dir(out)) is not None:
        frames.append(stage_rows(nxt).select(COLUMNS).with_columns(pl.lit(None, pl.String).alias("drop_reason")))
    for d in sorted((out / "dropped").glob("drop_reason=*")):
        reason = unquote(d.name.split("=", 1)[1])
        frames += [pl.read_parquet(f, columns=COLUMNS).with_columns(pl.lit(reason).alias("drop_reason"))
                   for f in sorted(d.glob("*.parquet"))]
    empty = pl.DataFrame(schema={"id": pl.String, "url": pl.String, "source": pl.String, "drop_reason": pl.String})
    return pl.concat([f.cast({c: pl.String for c in COLUMNS}) for f in frames]) if frames else empty


def next_stage_dir(out: Path) -> Path | None:
    """The pipeline stage directory after `out` (NN_name numbering), if there is one."""
    later = sorted(d for d in out.parent.glob("[0-9][0-9]_*") if d.is_dir() and d.name > out.name)
    return later[0] if later else None


def extract_rows(p: Path, out: Path, *extra: str) -> tuple[pl.DataFrame | None, str]:
    """`kiln curate extract` of one file, dropped rows written: its rows, or None and why it failed."""
    call = kiln("curate", "extract", "--input", str(p), "--output", str(out), "--write-dropped", *extra)
    return (stage_rows(out), "") if call.rc == 0 else (None, call_outcome(call))


def stats_balance(out: Path, rows: pl.DataFrame) -> tuple[bool, str]:
    """stats.json balances and agrees with the rows written."""
    st = json.loads((out / "stats.json").read_text())
    dropped = st["dropped"]
    written = {r: n for r, n in rows.group_by("drop_reason").len().iter_rows() if r is not None}
    kept_rows = rows.filter(pl.col("drop_reason").is_null()).height
    problems = []
    if st["docs_in"] != st["kept"] + sum(dropped.values()):
        problems.append(f"stats.json in {st['docs_in']} != kept {st['kept']} + dropped {sum(dropped.values())}")
    if kept_rows != st["kept"] or written != dropped or rows.height != st["docs_in"]:
        problems.append(f"stats.json (in {st['docs_in']}, kept {st['kept']}, {dropped}) != rows written "
                        f"({rows.height}, kept {kept_rows}, {written})")
    return not problems, "; ".join(problems)


def reader_rows(path: str, cfg: ReadConfig, fmt: str) -> tuple[int | None, str]:
    """The rows kiln's reader makes of one file, read here on the driver."""
    reader = read_warc if fmt == "warc" else read_jsonl
    try:
        return sum(b.num_rows for b in reader(path, cfg)), ""
    except Exception as e:  # noqa: BLE001
        return None, short_error(e)


@dataclass
class FileRun:
    """One input file's part of an extract job: its rows, or why the job failed."""

    rows: pl.DataFrame | None
    job_balanced: bool | None
    job_detail: str
    outcome: str


def extract_files(paths: list[str], out_root: Path, extra: list[str], counter: list[int]) -> dict[str, FileRun]:
    """One extract job over `paths`; a failed job is split in halves until each failing
    file has run alone (its outcome then is the crash)."""
    counter[0] += 1
    out = out_root / f"job{counter[0]:03d}"
    call = kiln("curate", "extract", "--input", *paths, "--output", str(out), "--write-dropped", *extra)
    if call.rc != 0:
        if len(paths) == 1:
            return {paths[0]: FileRun(None, None, "", call_outcome(call))}
        half = len(paths) // 2
        return {**extract_files(paths[:half], out_root, extra, counter),
                **extract_files(paths[half:], out_root, extra, counter)}
    rows = stage_rows(out)
    ok, detail = stats_balance(out, rows)
    by_source = {src: g for (src,), g in rows.group_by("source")}
    empty = rows.head(0)
    return {p: FileRun(by_source.get(p, empty), ok, detail, "ran") for p in paths}


def extract_all(paths: list[str], out_root: Path, extra: list[str], cfg: ReadConfig, fmt: str
                ) -> tuple[dict[str, FileRun], dict[str, tuple[int | None, str]], int]:
    """Every file through extract jobs: files whose reader fails here on the driver run
    alone (so one crash does not cost a bisection), the rest in one job."""
    counter = [0]
    counts = {p: reader_rows(p, cfg, fmt) for p in paths}
    solo = [p for p in paths if counts[p][0] is None]
    batch = [p for p in paths if counts[p][0] is not None]
    runs = extract_files(batch, out_root, extra, counter) if batch else {}
    for p in solo:
        runs.update(extract_files([p], out_root, extra, counter))
    return runs, counts, counter[0]


def file_balance(run: FileRun, count: tuple[int | None, str]) -> tuple[bool | None, str]:
    if run.rows is None:
        return None, ""
    n, err = count
    problems = [run.job_detail] if not run.job_balanced else []
    if n is None:
        problems.append(f"kiln's reader fails on the file alone ({err}) yet the job wrote {run.rows.height} rows")
    elif n != run.rows.height:
        problems.append(f"the reader makes {n} rows of the file, the job wrote {run.rows.height}")
    return not problems, "; ".join(problems)


# --------------------------------------------------------------------------- warc


def check_warc(f: FaultFile, run: FileRun, base_ids: dict[str, str]) -> tuple[bool, bool, str]:
    """(nothing invented, nothing lost, why not) for one corrupted WARC's rows."""
    exp, rows = f.expect, run.rows
    seen = {url: 0 for url in exp.appear}
    invented, lost = [], []
    for row in rows.filter(pl.col("url").is_not_null()).iter_rows(named=True):
        url = base_ids.get(row["id"])
        if url is None:  # a damaged record whose date, id or URL bytes changed: its URL, else a near one
            candidates = sorted(u for u in exp.damaged if _near(u, row["url"], exp.flips))
            candidates.sort(key=lambda u: (u != row["url"], seen[u] >= exp.appear[u][1]))
            url = candidates[0] if candidates else None
        if url is None:
            invented.append(f"row {row['url']} ({row['drop_reason'] or 'kept'}) matches no record")
        else:
            seen[url] += 1
    for url, (lo, hi) in exp.appear.items():
        if seen[url] > hi:
            invented.append(f"{url}: {seen[url]} rows, the file holds it {hi} time(s)")
        elif seen[url] < lo:
            lost.append(f"{url}: intact, {seen[url]} rows (expected {lo})")
    faults = rows.filter(pl.col("url").is_null()).height
    if faults > exp.fault_rows:
        reasons = sorted(set(rows.filter(pl.col("url").is_null())["drop_reason"].to_list()))
        invented.append(f"{faults} rows without a URL ({', '.join(map(str, reasons))}) for "
                        f"{exp.fault_rows} damaged place(s)")
    return not invented, not lost, "; ".join(invented + lost)


def _near(a: str, b: str | None, flips: int) -> bool:
    return b is not None and len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= flips


def warc_group(work: Path, n: int, seed: int) -> list[Result]:
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    files = warc_corruptions(work, n, seed)
    pristine = work / "pristine.warc.gz"
    pristine.write_bytes(build_base_warc(work, gz=True).data)
    base_ids = {}
    for batch in read_warc(str(pristine), ReadConfig()):
        base_ids.update(zip(batch.column("id").to_pylist(), batch.column("url").to_pylist()))
    paths = []
    for i, f in enumerate(files):
        p = work / "in" / f"case{i:03d}{f.suffix}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(f.data)
        paths.append(str(p))
    runs, counts, jobs = extract_all(paths, work / "out", [], ReadConfig(), "warc")
    seconds = (time.perf_counter() - t0) / max(1, len(files))
    log(f"warc: {len(files)} files in {jobs} extract job(s), {time.perf_counter() - t0:.1f} s")
    results = []
    for i, (f, p) in enumerate(zip(files, paths)):
        run = runs[p]
        if run.rows is None:
            results.append(Result("warc", f"{i:03d} {f.name}", run.outcome, None, None, False, False,
                                  f"{f.detail}; the job failed on this file (a job over many files fails for all)", seconds))
            continue
        balanced, why_unbalanced = file_balance(run, counts[p])
        not_invented, not_lost, why = check_warc(f, run, base_ids)
        reasons = run.rows.group_by("drop_reason").len().sort("drop_reason", nulls_last=False)
        rows = ", ".join(f"{r or 'kept'} {k}" for r, k in reasons.iter_rows()) or "no rows"
        detail = "; ".join(x for x in (f.detail, rows, why_unbalanced, why) if x)
        results.append(Result("warc", f"{i:03d} {f.name}", "ran", balanced, not_invented, not_lost,
                              verdict(True, balanced, not_invented, not_lost), detail, seconds))
    return results


# --------------------------------------------------------------------------- jsonl


def check_jsonl(f: JsonlFile, run: FileRun) -> tuple[bool, bool, str]:
    lines = {line.url: line for line in f.lines if line.url}
    rows = run.rows
    counts = dict(rows.filter(pl.col("url").is_not_null()).group_by("url").len().iter_rows())
    kept = set(rows.filter(pl.col("drop_reason").is_null() & pl.col("url").is_not_null())["url"].to_list())
    invented, lost, notes = [], [], []
    for url, n in counts.items():
        if url not in lines:
            invented.append(f"row for {url}, which is in no line")
    for url, line in lines.items():
        n = counts.get(url, 0)
        if n > 1:
            invented.append(f"{line.what}: {n} rows for one line")
        elif line.kind == VALID and n == 0:
            lost.append(f"{line.what}: valid line, no row")
        elif line.kind == NEVER_KEPT and url in kept:
            invented.append(f"{line.what}: kept as a document")
        elif line.kind == NEVER_KEPT and n == 0:
            lost.append(f"{line.what}: a record with a URL vanished without a row")
        elif line.kind == EITHER and n == 0:
            notes.append(f"{line.what}: no row with its URL (a bad_record at most)")
    damaged = sum(1 for line in f.lines if line.kind in (UNPARSABLE, EITHER) and line.what != "blank line")
    faults = rows.filter(pl.col("url").is_null()).height
    if faults > damaged + 1:
        invented.append(f"{faults} rows without a URL for {damaged} unparsable line(s)")
    return not invented, not lost, "; ".join(invented + lost + notes)


def jsonl_group(work: Path, n: int, seed: int) -> list[Result]:
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    files = jsonl_corruptions(n, seed)
    results: dict[int, Result] = {}
    for column in ("text", "html"):
        chosen = [(i, f) for i, f in enumerate(files) if f.column == column]
        paths = []
        for i, f in chosen:
            p = work / column / f"case{i:03d}{f.suffix}"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(f.data)
            paths.append(str(p))
        extra = ["--text-column", "text"] if column == "text" else ["--html-column", "html"]
        cfg = ReadConfig(text_column="text") if column == "text" else ReadConfig(html_column="html")
        t1 = time.perf_counter()
        runs, counts, jobs = extract_all(paths, work / f"out_{column}", extra, cfg, "jsonl")
        log(f"jsonl: {len(paths)} files read as {column} in {jobs} extract job(s), {time.perf_counter() - t1:.1f} s")
        seconds = (time.perf_counter() - t1) / max(1, len(paths))
        for (i, f), p in zip(chosen, paths):
            run = runs[p]
            if run.rows is None:
                results[i] = Result("jsonl", f"{i:03d} {f.name}", run.outcome, None, None, False, False,
                                    "the job failed on this file (a job over many files fails for all)", seconds)
                continue
            balanced, why_unbalanced = file_balance(run, counts[p])
            not_invented, not_lost, why = check_jsonl(f, run)
            reasons = run.rows.group_by("drop_reason").len().sort("drop_reason", nulls_last=False)
            rows = ", ".join(f"{r or 'kept'} {k}" for r, k in reasons.iter_rows()) or "no rows"
            results[i] = Result("jsonl", f"{i:03d} {f.name}", "ran", balanced, not_invented, not_lost,
                                verdict(True, balanced, not_invented, not_lost),
                                "; ".join(x for x in (rows, why_unbalanced, why) if x), seconds)
    log(f"jsonl: {time.perf_counter() - t0:.1f} s")
    return [results[i] for i in sorted(results)]


# --------------------------------------------------------------------------- named items


def tree_digest(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under `path`: size and modification time (what a write would change)."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


class Named:
    """The issue's thirteen items. Each method is one case, checking the fixed
    behaviour the issue describes; shared inputs are built once."""

    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True)
        self.warc5 = build_base_warc(work, gz=False, records=warc_records(5, non_html=False))
        self.warc_gz = work / "pages.warc.gz"
        self.warc_gz.write_bytes(build_base_warc(work, gz=True, records=warc_records(5, non_html=False)).data)
        self.urls = [f"https://faults.example/page/{i}" for i in range(5)]
        self._extract_dir: Path | None = None
        self._langid_dir: Path | None = None

    def extract_dir(self) -> Path:
        if self._extract_dir is None:
            self._extract_dir = self.work / "stage_extract"
            call = kiln("curate", "extract", "--input", str(self.warc_gz), "--output", str(self._extract_dir))
            if call.rc != 0:
                raise RuntimeError(f"setting up an extract output failed: {call_outcome(call)}")
        return self._extract_dir

    def langid_dir(self) -> Path:
        if self._langid_dir is None:
            self._langid_dir = self.work / "stage_langid"
            call = kiln("curate", "langid", "--input", str(self.extract_dir()), "--output", str(self._langid_dir))
            if call.rc != 0:
                raise RuntimeError(f"setting up a langid output failed: {call_outcome(call)}")
        return self._langid_dir

    # 1 ------------------------------------------------------------------
    def same_dir_refused(self) -> Result:
        x, lang = self.extract_dir(), self.langid_dir()
        before_x, before_l = tree_digest(x), tree_digest(lang)
        checks = []
        a = kiln("curate", "langid", "--input", str(x), "--output", str(x))
        checks.append(("langid --input X --output X", a.rc == 2 and tree_digest(x) == before_x, call_outcome(a)))
        b = kiln("curate", "extract", "--input", str(self.warc_gz), "--output", str(lang))
        checks.append(("extract --output <langid's dir>", b.rc == 2 and tree_digest(lang) == before_l,
                       call_outcome(b)))
        inner = x / "inner"
        c = kiln("curate", "langid", "--input", str(x), "--output", str(inner))
        checks.append(("langid --output X/inner", c.rc == 2 and not inner.exists() and tree_digest(x) == before_x,
                       call_outcome(c)))
        ok = all(passed for _, passed, _ in checks)
        detail = "; ".join(f"{what}: {'refused, intact' if passed else 'NOT refused or touched'} ({outcome})"
                           for what, passed, outcome in checks)
        return Result("", "same or nested input/output refused, inputs intact",
                      "refused" if ok else "not refused", None, None, None, ok, detail)

    # 2 ------------------------------------------------------------------
    def valid_warc_rows(self) -> Result:
        parts, ok_all, balanced_all = [], True, True
        for name in ("five.warc", "five-plain-bytes.warc.gz"):
            p = self.work / name
            p.write_bytes(self.warc5.data)
            out = self.work / f"out_{name}"
            rows, failed = extract_rows(p, out)
            if rows is None:
                parts.append(f"{name}: {failed}")
                ok_all = False
                continue
            balanced, why = stats_balance(out, rows)
            balanced_all &= balanced
            urls = sorted(u for u in rows["url"].to_list() if u)
            ok = rows.height == 5 and urls == self.urls
            ok_all &= ok
            reasons = dict(rows.group_by("drop_reason").len().iter_rows())
            parts.append(f"{name}: {rows.height} rows {reasons}" + (f" ({why})" if why else ""))
        return Result("", "valid 5-record WARC (.warc and the same bytes as .warc.gz): exactly 5 rows",
                      "ran" if ok_all else "wrong rows", balanced_all, ok_all, ok_all,
                      ok_all and balanced_all, "; ".join(parts))

    # 3 ------------------------------------------------------------------
    def not_warc_files(self) -> Result:
        text = "\n".join(paragraphs(6)).encode()
        cases = [("plain-text.warc.gz", text), ("gzipped-text.warc.gz", gzip_bytes(text))]
        parts, ok_all, balanced_all = [], True, True
        for name, data in cases:
            p = self.work / name
            p.write_bytes(data)
            out = self.work / f"out_{name}"
            rows, failed = extract_rows(p, out)
            if rows is None:
                parts.append(f"{name}: {failed}")
                ok_all = False
                continue
            balanced, why = stats_balance(out, rows)
            balanced_all &= balanced
            reasons = dict(rows.group_by("drop_reason").len().iter_rows())
            # One dropped row that names the file: not documents made of text lines.
            ok = rows.height == 1 and None not in reasons and "not_html" not in reasons
            ok_all &= ok
            parts.append(f"{name}: {rows.height} rows {reasons}")
        return Result("", "text named .warc.gz and gzipped non-WARC: one dropped row each, no invented documents",
                      "ran" if ok_all else "wrong rows", balanced_all, ok_all, None, ok_all and balanced_all,
                      "; ".join(parts))

    # 4 ------------------------------------------------------------------
    def non_string_values(self) -> Result:
        rng = random.Random(4)
        texts = paragraphs()
        parts, ok_all = [], True
        for column, values in (("text", [12345, ["a", "list"], {"a": "dict"}, True]), ("html", [12345])):
            lines = [jsonl_line("valid", f"https://faults.example/n4/{column}/valid", column, texts, rng)]
            data = [lines[0].raw]
            for k, v in enumerate(values):
                obj = {"url": f"https://faults.example/n4/{column}/{k}", column: v}
                data.append(json.dumps(obj).encode())
            p = self.work / f"non_string_{column}.jsonl"
            p.write_bytes(b"\n".join(data) + b"\n")
            out = self.work / f"out_non_string_{column}"
            extra = ["--text-column", "text"] if column == "text" else ["--html-column", "html"]
            rows, failed = extract_rows(p, out, *extra)
            if rows is None:
                parts.append(f"{column}: {failed}")
                ok_all = False
                continue
            kept = sorted(rows.filter(pl.col("drop_reason").is_null())["url"].to_list())
            dropped = dict(rows.filter(pl.col("drop_reason").is_not_null()).select("url", "drop_reason").iter_rows())
            bad = [f"https://faults.example/n4/{column}/{k}" for k in range(len(values))]
            ok = all(u not in kept for u in bad) and all(u in dropped for u in bad)
            if column == "text":
                ok = ok and kept == [lines[0].url]
            ok_all &= ok
            parts.append(f"{column} {[json.dumps(v) for v in values]}: kept {len(kept)}, dropped "
                         f"{sorted(set(dropped.values()))}" + ("" if ok else " (a non-string value kept or lost)"))
        return Result("", "JSONL non-string text values dropped with a reason; html 12345 does not crash",
                      "ran" if ok_all else "wrong rows", None, ok_all, None, ok_all, "; ".join(parts))

    # 5 ------------------------------------------------------------------
    def bad_config_values(self) -> Result:
        x = self.extract_dir()
        checks = []
        out = self.work / "out_filter_str"
        a = kiln("curate", "filter", "--input", str(x), "--output", str(out),
                 "--set", 'filter.gopher_quality.min_doc_words="50"')
        checks.append(("min_doc_words = \"50\"", a.rc == 2 and "min_doc_words" in a.err and not out.exists(), a))
        out = self.work / "out_extract_timeout"
        b = kiln("curate", "extract", "--input", str(self.warc_gz), "--output", str(out), "--set", "extract.timeout_s=-1.0")
        checks.append(("timeout_s = -1.0", b.rc == 2 and "timeout_s" in b.err and not out.exists(), b))
        ok = all(passed for _, passed, _ in checks)
        detail = "; ".join(f"{what}: {'refused at start naming the key' if passed else 'NOT refused at start'} "
                           f"({call_outcome(call)}, {call.seconds:.1f} s)" for what, passed, call in checks)
        return Result("", "[filter.gopher_quality] min_doc_words = \"50\", [extract] timeout_s = -1.0 refused",
                      "refused" if ok else "not refused", None, None, None, ok, detail)

    # 7 ------------------------------------------------------------------
    def killed_extraction_worker(self) -> Result:
        """kill -9 of the Spark Python worker while its extraction sandbox works: the
        job must finish (the task retried) and the sandbox child must not outlive it."""
        texts = paragraphs()
        records = warc_records(0, non_html=False)
        from kiln.demo.warc import Record, http_response
        from tests.conftest import page

        for i in range(240):
            body = page(f"Page {i}", [texts[(i + k) % len(texts)] for k in range(6)]).encode()
            records.append(Record("response", f"https://faults.example/busy/{i}", body,
                                  {"WARC-Date": "2024-02-01T00:00:00Z",
                                   "WARC-Record-ID": f"<urn:uuid:00000000-0000-4000-9000-{i:012d}>"},
                                  http=http_response(200, "OK", [("Content-Type", "text/html; charset=utf-8")])))
        warc = self.work / "busy.warc.gz"
        warc.write_bytes(build_base_warc(self.work, gz=True, records=records).data)
        out = self.work / "out_busy"
        proc, log_path = spawn([sys.executable, "-m", "kiln.cli", "curate", "extract", "--input", str(warc),
                                "--output", str(out), "--write-dropped"], self.work / "busy.log")
        victim = sandbox = None
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and victim is None:
            time.sleep(0.05)
            victim, sandbox = busy_worker(proc.pid)
        if victim is None:
            kill_group(proc)
            return Result("", "kill -9 of a busy extraction worker", "no busy worker seen", None, None, None, False,
                          f"rc {proc.returncode}: the job ended before a worker with a sandbox child was found")
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            rc = proc.wait(timeout=KILL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        orphan = sandbox is not None and alive(sandbox)
        kill_group(proc)
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
        if rc is None:
            return Result("", "kill -9 of a busy extraction worker", f"hung (> {KILL_TIMEOUT_S} s after the kill)",
                          None, None, None, False,
                          f"killed worker {victim}; its sandbox child {sandbox} "
                          f"{'still alive' if orphan else 'gone'}")
        after = time.monotonic() - killed_at
        if rc != 0:
            return Result("", "kill -9 of a busy extraction worker", f"failed (rc {rc}) {after:.0f} s after the kill",
                          None, None, None, False,
                          f"sandbox child {'outlived its worker' if orphan else 'gone'}; {' '.join(tail)[:200]}")
        rows = stage_rows(out)
        balanced, why = stats_balance(out, rows)
        urls = set(rows["url"].to_list())
        want = {r.url for r in records}
        not_lost, not_invented = want <= urls and rows.height == len(want), urls <= want
        return Result("", "kill -9 of a busy extraction worker",
                      f"finished {after:.0f} s after the kill (task retried)", balanced, not_invented, not_lost,
                      verdict(not orphan, balanced, not_invented, not_lost),
                      f"{rows.height} rows for {len(want)} records; sandbox child "
                      f"{'OUTLIVED its worker' if orphan else 'died with its worker'}" + (f"; {why}" if why else ""))

    # 11 -----------------------------------------------------------------
    def missing_input_fast(self) -> Result:
        missing = self.work / "no-such-dir" / "crawl.warc.gz"
        recipe = self.work / "missing.toml"
        recipe.write_text(f'[pipeline]\ninput = ["{missing}"]\noutput = "{self.work / "out_missing_pipeline"}"\n')
        commands = {
            "extract": ["curate", "extract", "--input", str(missing), "--output", str(self.work / "out_missing")],
            "extract glob": ["curate", "extract", "--input", str(self.work / "no-such-dir" / "*.warc.gz"),
                             "--output", str(self.work / "out_missing_glob")],
            "langid": ["curate", "langid", "--input", str(self.work / "no-such-stage"),
                       "--output", str(self.work / "out_missing_langid")],
            "pipeline": ["curate", "pipeline", str(recipe)],
        }
        parts, ok_all = [], True
        for what, argv in commands.items():
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "kiln.cli", *argv], capture_output=True, text=True,
                                  timeout=120, env=subprocess_env())
            seconds = time.perf_counter() - t0
            named = "no-such" in done.stderr
            spark = any(sign in done.stderr for sign in SPARK_STARTED)
            ok = done.returncode == 2 and named and not spark
            ok_all &= ok
            parts.append(f"{what}: rc {done.returncode} in {seconds:.1f} s"
                         + ("" if named else " (message does not name the path)")
                         + (" (Spark had started)" if spark else ""))
        return Result("", "missing input reported before Spark starts (no JVM output; seconds for information, "
                          "process start included)", "refused" if ok_all else "Spark started or not refused",
                      None, None, None, ok_all, "; ".join(parts))

    # 13 -----------------------------------------------------------------
    def mix_fit_messages(self) -> Result:
        import numpy as np

        rng = np.random.default_rng(13)
        W = rng.dirichlet([1.0, 1.0, 1.0], size=12)
        y = 2.0 + np.exp(W @ np.array([-1.0, 0.0, 1.0]))
        nan_csv, inf_csv = self.work / "runs_all_nan.csv", self.work / "runs_inf.csv"
        frame = pl.DataFrame({"w_a": W[:, 0], "w_b": W[:, 1], "w_c": W[:, 2]})
        frame.with_columns(pl.lit(float("nan")).alias("loss")).write_csv(nan_csv)
        y_inf = y.copy()
        y_inf[[2, 7]] = np.inf
        frame.with_columns(pl.Series("loss", y_inf)).write_csv(inf_csv)
        a = kiln("mix", "fit", str(nan_csv), "--weights", "w_*", "--target", "loss",
                 "--out", str(self.work / "fit_nan.json"))
        msg = next((line for line in a.err.splitlines() if line.startswith("kiln: error:")), "")
        nan_ok = (a.rc == 2 and str(nan_csv) in msg and "'loss'" in msg and "12 rows" in msg
                  and "no number" in msg and "String" not in msg)
        b = kiln("mix", "fit", str(inf_csv), "--weights", "w_*", "--target", "loss", "--method", "linear",
                 "--bootstrap", "2", "--out", str(self.work / "fit_inf.json"))
        drop = next((line for line in b.err.splitlines() if "dropped" in line), "")
        inf_ok = b.rc == 0 and "infinite" in drop and "NaN" not in drop and "data rows 3, 8" in drop
        return Result("", "kiln mix fit: all-NaN target and inf rows reported as such",
                      "ran", None, None, None, nan_ok and inf_ok,
                      f"all-NaN: {msg.removeprefix('kiln: error: ') or call_outcome(a)}; "
                      f"inf rows: {drop.removeprefix('kiln mix: ') or call_outcome(b)}")


# --------------------------------------------------------------------------- subprocesses


def subprocess_env() -> dict:
    return dict(os.environ)  # with the offline and Spark settings made at the top


def spawn(argv: list[str], log_path: Path) -> tuple[subprocess.Popen, Path]:
    """A subprocess in a session of its own: kill -9 of its group ends all it started."""
    f = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=subprocess_env())
    f.close()
    return proc, log_path


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def descendants(root: int) -> dict[int, tuple]:
    procs = processes()
    out, frontier = {}, {root}
    while frontier:
        children = {pid for pid, p in procs.items() if p[0] in frontier and pid not in out}
        for pid in children:
            out[pid] = procs[pid]
        frontier = children
    return out


def busy_worker(root: int) -> tuple[int | None, int | None]:
    """A Spark Python worker of `root`'s job that has an extraction sandbox child:
    (worker pid, sandbox pid). The tree is JVM -> pyspark daemon -> worker -> sandbox,
    all Python but the JVM."""
    tree = descendants(root)
    python = {pid for pid, p in tree.items() if p[1].startswith("python")}
    for pid in sorted(python):
        parent = tree[pid][0]
        kids = [c for c, p in tree.items() if p[0] == pid and c in python]
        if parent in python and kids:
            return pid, kids[0]
    return None, None


# --------------------------------------------------------------------------- training


class Training:
    """Training cases on one shard set built once: a reference run in this process, a
    run stopped after 13 steps (checkpoints 5 and 10) that the resume cases copy."""

    def __init__(self, work: Path):
        from kiln.training import recipe as recipes
        from kiln.training.train import RunOptions, train

        self.work = work
        work.mkdir(parents=True)
        self.corpus = training_corpus(work / "corpus")
        self.recipes, self.train, self.RunOptions = recipes, train, RunOptions
        ref = training_recipe(work / "reference.toml", self.corpus, work / "reference")
        with quiet():
            self.reference_summary = self.train(self.recipes.load(str(ref)))[0]
        self.reference = losses(work / "reference" / "01_core")
        partial = training_recipe(work / "partial.toml", self.corpus, work / "partial")
        with quiet():
            self.train(self.recipes.load(str(partial)), self.RunOptions(stop_after_steps=13))
        self.partial = work / "partial"

    def resumed_copy(self, name: str) -> tuple[Path, Path]:
        """A copy of the stopped run and a recipe that writes there."""
        run = self.work / name
        shutil.copytree(self.partial, run)
        return run, training_recipe(self.work / f"{name}.toml", self.corpus, run)

    def resume(self, recipe: Path) -> tuple[str, str]:
        """(outcome, stderr) of resuming in this process."""
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                self.train(self.recipes.load(str(recipe)))
            return "ran", err.getvalue()
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            return f"{'refused' if type(e).__name__ == 'ConfigError' else 'crashed'}: {short_error(e)}", err.getvalue()

    # 6 ------------------------------------------------------------------
    def other_tokenizer(self) -> Result:
        out = self.work / "other_tokenizer"
        recipe = training_recipe(self.work / "other_tokenizer.toml", self.corpus, out, tokenizer="tok_other",
                                 tokens=1_024)
        call = kiln("train", str(recipe))
        message = next((line for line in call.err.splitlines() if line.startswith("kiln: error:")), "")
        trained = (out / "01_core" / "checkpoints").exists()
        ok = call.rc == 2 and "tokenizer" in message.lower() and not trained
        return Result("", "[run] tokenizer other than the shards' refused at start", call_outcome(call),
                      None, None, None, ok, "trained anyway" if trained else message[:200])

    # 8 ------------------------------------------------------------------
    def damaged_newest_checkpoint(self) -> Result:
        run, recipe = self.resumed_copy("damaged")
        newest = run / "01_core" / "checkpoints" / "step-00000010"
        shard = max((p for p in newest.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        outcome, err = self.resume(recipe)
        resumed = re.findall(r"resumed from \S*?(step-\d+)", err)
        got = losses(run / "01_core") if outcome == "ran" else {}
        same = got == self.reference
        ok = outcome == "ran" and resumed == ["step-00000005"] and same
        return Result("", "damaged newest checkpoint: falls back to the previous complete one", outcome,
                      None, None, None, ok,
                      f"half of {shard.name} cut off in step-00000010; resumed from {resumed or 'nothing'}; "
                      f"losses {'equal' if same else 'differ from'} the uninterrupted run's")

    # 9, 10 --------------------------------------------------------------
    def crafted_pickle(self, which: str) -> Result:
        run, recipe = self.resumed_copy(f"crafted_{which.strip('.').replace('-', '_')}")
        newest = run / "01_core" / "checkpoints" / "step-00000010"
        marker = self.work / f"pwned_{which.strip('.')}"
        if which == "rng-rank0.pt":
            import torch

            torch.save(Payload(str(marker)), newest / which)
        else:
            (newest / which).write_bytes(pickle.dumps(Payload(str(marker))))
        outcome, err = self.resume(recipe)
        ran_code = marker.exists()
        resumed = re.findall(r"resumed from \S*?(step-\d+)", err)
        return Result("", f"crafted {which} pickle does not run code on resume", outcome, None, None, None,
                      not ran_code, f"{'the pickle RAN CODE (created ' + marker.name + ')' if ran_code else 'no code ran'};"
                      f" resumed from {resumed or 'nothing'}")

    # 12 -----------------------------------------------------------------
    def metrics_once(self) -> Result:
        run, recipe = self.resumed_copy("metrics_once")
        outcome, _ = self.resume(recipe)
        steps = [json.loads(line)["step"] for line in (run / "01_core" / "metrics.jsonl").read_text().splitlines()]
        repeated = sorted({s for s in steps if steps.count(s) > 1})
        same = losses(run / "01_core") == self.reference
        ok = outcome == "ran" and steps == list(range(1, 26)) and same
        return Result("", "after a resume, metrics.jsonl holds each step once", outcome, None, None, None, ok,
                      f"{len(steps)} records for 25 steps" + (f"; repeated steps {repeated}" if repeated else "")
                      + f"; losses {'equal' if same else 'differ from'} the uninterrupted run's")

    # kill ---------------------------------------------------------------
    def sigkill(self, seed: int) -> Result:
        """`kiln train` in a subprocess, kill -9 at a seeded random step, rerun: the final
        loss and every step's loss are those of an uninterrupted run."""
        t0 = time.perf_counter()
        rng = random.Random(seed)
        reference = self.work / "kill_reference"
        ref_recipe = training_recipe(self.work / "kill_reference.toml", self.corpus, reference)
        done = subprocess.run([sys.executable, "-m", "kiln.cli", "train", str(ref_recipe)], capture_output=True,
                              text=True, timeout=300, env=subprocess_env())
        if done.returncode != 0:
            return Result("kill", "kill -9 of kiln train, rerun", f"reference run failed (rc {done.returncode})",
                          None, None, None, False, done.stderr.strip().splitlines()[-1][:200])
        want = losses(reference / "01_core")
        want_final = json.loads((reference / "01_core" / "final" / "kiln_stage.json").read_text())["final_loss"]
        run = self.work / "killed"
        recipe = training_recipe(self.work / "killed.toml", self.corpus, run)
        target = rng.randint(1, 24)
        proc, log_path = spawn([sys.executable, "-m", "kiln.cli", "train", str(recipe)], self.work / "killed.log")
        metrics = run / "01_core" / "metrics.jsonl"
        while proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= target:
                break
            time.sleep(0.005)
        kill_group(proc)
        reached = metrics.read_text().count("\n") if metrics.exists() else 0
        if proc.returncode == 0:
            return Result("kill", "kill -9 of kiln train, rerun", "finished before the kill", None, None, None,
                          False, f"aimed at step {target}")
        again = subprocess.run([sys.executable, "-m", "kiln.cli", "train", str(recipe)], capture_output=True,
                               text=True, timeout=300, env=subprocess_env())
        if again.returncode != 0:
            return Result("kill", "kill -9 of kiln train, rerun", f"rerun failed (rc {again.returncode})",
                          None, None, None, False, again.stderr.strip().splitlines()[-1][:200])
        got = losses(run / "01_core")
        final = json.loads((run / "01_core" / "final" / "kiln_stage.json").read_text())["final_loss"]
        resumed = re.findall(r"resumed from \S*?(step-\d+)", again.stderr)
        ok = final == want_final and got == want
        return Result("kill", "kill -9 of kiln train at a random step, rerun", "resumed and finished",
                      None, None, None, ok,
                      f"killed after step {reached} (aimed at {target}); resumed from {resumed or 'nothing'}; "
                      f"final loss {final!r} vs {want_final!r} uninterrupted; per-step losses "
                      f"{'equal' if got == want else 'DIFFER'}", time.perf_counter() - t0)


class Payload:
    """A pickle that opens (creates) a file when loaded: proof that loading ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def losses(stage_dir: Path) -> dict[int, float]:
    """step -> train loss; a resumed run's later record of a step wins."""
    out = {}
    path = stage_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        out[r["step"]] = r["train/loss"]
    return out


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


# --------------------------------------------------------------------------- pipeline kill


class PipelineKill:
    """`kiln curate pipeline` killed with -9 and rerun, against an uninterrupted run.

    The uninterrupted run is made first, in this process on the shared Spark session
    (`reference`); the killed run and its rerun are subprocesses (`sigkill`). The kill
    lands at a seeded random moment inside a seeded random stage: after that stage's
    "running" line, within the time the stage took in the uninterrupted run."""

    STAGES = ["extract", "langid", "filter", "dedup_url", "dedup_exact"]

    def __init__(self, work: Path):
        from kiln.demo.warc import Record, http_response
        from tests.conftest import page

        self.work = work
        work.mkdir(parents=True)
        texts = paragraphs()
        records = []
        for i in range(36):
            # Every ninth page repeats an earlier one at another URL, and every twelfth is a
            # later capture of an earlier URL: both dedup stages have work.
            j = i - 9 if i % 9 == 8 else i
            url = f"https://faults.example/pipe/{i - 5 if i % 12 == 11 else i}"
            body = page(f"Page {j}", [texts[(j + k) % len(texts)] for k in range(4)]).encode()
            records.append(Record("response", url, body,
                                  {"WARC-Date": f"2024-03-{i % 28 + 1:02d}T00:00:00Z",
                                   "WARC-Record-ID": f"<urn:uuid:00000000-0000-4000-a000-{i:012d}>"},
                                  http=http_response(200, "OK", [("Content-Type", "text/html; charset=utf-8")])))
        self.warc = work / "crawl.warc.gz"
        self.warc.write_bytes(build_base_warc(work, gz=True, records=records).data)
        self.reference_dir = work / "reference"
        self.reference_error = ""
        self.stage_seconds: list[float] = []

    def recipe(self, out: Path) -> Path:
        path = self.work / f"{out.name}.toml"
        stages = ", ".join(f'"{s}"' for s in self.STAGES)
        path.write_text(f'[pipeline]\ninput = ["{self.warc}"]\noutput = "{out}"\nstages = [{stages}]\n'
                        'write_dropped = true\n'
                        # as recipes/demo.toml: docstrings quote code, whose tokens are words without a letter
                        '[filter.gopher_quality]\nmax_non_alpha_words_ratio = 0.6\n')
        return path

    def reference(self) -> None:
        call = kiln("curate", "pipeline", str(self.recipe(self.reference_dir)))
        if call.rc != 0:
            self.reference_error = call_outcome(call)
            return
        self.stage_seconds = [s["extra"]["seconds"]
                              for s in json.loads((self.reference_dir / "funnel.json").read_text())]

    def sigkill(self, seed: int) -> Result:
        name = "kill -9 of kiln curate pipeline at a random moment of a random stage, rerun"
        t0 = time.perf_counter()
        if self.reference_error:
            return Result("kill", name, f"uninterrupted run failed: {self.reference_error}", None, None, None, False)
        rng = random.Random(seed)
        k = rng.randrange(len(self.STAGES))
        delay = rng.uniform(0.0, 1.0) * self.stage_seconds[k]
        argv = [sys.executable, "-m", "kiln.cli", "curate", "pipeline"]
        killed = self.work / "killed"
        proc, log_path = spawn([*argv, str(self.recipe(killed))], self.work / "killed.log")
        started, ended = f"[{self.STAGES[k]}] running", f"[{self.STAGES[k]}] in="
        while proc.poll() is None and started not in log_path.read_text(errors="replace"):
            time.sleep(0.02)
        # The stage may run faster here than it did in the uninterrupted run: the kill
        # comes at the chosen moment or as the stage ends, whichever is first.
        t_kill = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < t_kill and ended not in log_path.read_text(errors="replace"):
            time.sleep(0.02)
        into = delay - max(0.0, t_kill - time.monotonic())
        finished_first = proc.returncode == 0
        kill_group(proc)
        finished = sorted(p.parent.name for p in killed.glob("*/stats.json"))
        again = subprocess.run([*argv, str(self.recipe(killed))], capture_output=True, text=True, timeout=300,
                               env=subprocess_env())
        if again.returncode != 0:
            return Result("kill", name, f"rerun failed (rc {again.returncode})", None, None, None, False,
                          again.stderr.strip().splitlines()[-1][:200], time.perf_counter() - t0)
        reused = re.findall(r"\[(\w+)\] reusing finished output", again.stderr)
        balanced, invented_ok, lost_ok, diffs = True, True, True, []
        for stats in sorted(self.reference_dir.glob("*/stats.json")):
            a_dir, b_dir = stats.parent, killed / stats.parent.name
            a, b = (json.loads((d / "stats.json").read_text()) for d in (a_dir, b_dir))
            keys = ("docs_in", "kept", "dropped", "bytes_in", "bytes_kept", "chars_kept")
            if any(a[key] != b[key] for key in keys):
                diffs.append(f"{a_dir.name}: funnel differs ({[key for key in keys if a[key] != b[key]]})")
            rows_b = stage_rows(b_dir)
            ok_b, why = stats_balance(b_dir, rows_b)
            balanced &= ok_b
            if why:
                diffs.append(f"{a_dir.name}: {why}")
            rows_a = set(stage_rows(a_dir).select("id", "drop_reason").iter_rows())
            rows_b = set(rows_b.select("id", "drop_reason").iter_rows())
            if rows_b - rows_a:
                invented_ok = False
                diffs.append(f"{a_dir.name}: {len(rows_b - rows_a)} rows not in the uninterrupted run")
            if rows_a - rows_b:
                lost_ok = False
                diffs.append(f"{a_dir.name}: {len(rows_a - rows_b)} rows of the uninterrupted run missing")
        return Result("kill", name, "finished before the kill" if finished_first else "rerun finished",
                      balanced, invented_ok, lost_ok, not diffs and not finished_first,
                      f"killed {into:.1f} s into {self.STAGES[k]} (finished then: {', '.join(finished) or 'none'}); "
                      f"rerun reused {', '.join(reused) or 'nothing'}; "
                      + ("; ".join(diffs) if diffs else "funnel and every stage's rows equal the uninterrupted run's"),
                      time.perf_counter() - t0)


# --------------------------------------------------------------------------- report


def guarded(group: str, label: str, fn) -> Result:
    """One case; an exception escaping it (the suite's own setup, or kiln raising where
    it should have returned) fails that case instead of ending the suite."""
    t0 = time.perf_counter()
    try:
        r = fn()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        r = Result(group, "", f"error: {short_error(e)}", None, None, None, False)
    r.group, r.seconds = group, r.seconds or time.perf_counter() - t0
    r.case = f"{label} {r.case}".strip()
    return r


def once(make):
    """`make()` on first use; later calls return its value (or raise its error) again."""
    box: list = []

    def get():
        if not box:
            try:
                box.append((make(), None))
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001
                box.append((None, e))
        value, error = box[0]
        if error is not None:
            raise error
        return value

    return get


def source_version() -> str:
    """The commit the suite ran against, and whether the working tree differed from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def markdown(report: dict, results: list[Result]) -> str:
    lines = [f"# Fault suite, {report['date']}", "",
             f"- machine: {report['machine']}", f"- versions: {report['versions']}",
             f"- kiln source: {report['source']}",
             f"- command: `{report['command']}`", f"- seed: {report['seed']}",
             f"- runtime: {report['seconds']:.0f} s", "",
             "| group | cases | pass | fail |", "|---|---:|---:|---:|"]
    for group, c in report["groups"].items():
        lines.append(f"| {group} | {c['cases']} | {c['pass']} | {c['fail']} |")
    # What the checks and groups mean: the module's own description of them.
    lines += ["", *"\n\n".join(__doc__.split("\n\n")[1:5]).splitlines(), "",
              "`-`: a check that does not apply to the case.", ""]
    for group in report["groups"]:
        lines += [f"## {group}", "",
                  "| case | outcome | in = kept + dropped | nothing invented | nothing lost | verdict | s | detail |",
                  "|---|---|---|---|---|---|---:|---|"]
        for r in results:
            if r.group == group:
                cells = [r.case, r.outcome, mark(r.balanced), mark(r.not_invented), mark(r.not_lost),
                         "PASS" if r.passed else "FAIL", f"{r.seconds:.1f}", r.detail]
                lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def print_table(results: list[Result]) -> None:
    print(f"{'group':<6} {'case':<62} {'bal':>4} {'inv':>4} {'lost':>4} {'':>5} {'s':>5}  outcome / detail")
    for r in results:
        print(f"{r.group:<6} {r.case[:62]:<62} {mark(r.balanced):>4} {mark(r.not_invented):>4} "
              f"{mark(r.not_lost):>4} {'PASS' if r.passed else 'FAIL':>5} {r.seconds:5.1f}  {r.outcome[:60]}"
              + (f" | {r.detail[:160]}" if not r.passed and r.detail else ""))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warc-cases", type=int, default=100)
    p.add_argument("--jsonl-cases", type=int, default=100)
    p.add_argument("--only", nargs="+", choices=["warc", "jsonl", "named", "kill"], help="run only these groups")
    p.add_argument("--keep", metavar="DIR", help="work here and keep the inputs and outputs (default: a temp dir)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="result folder")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    p.add_argument("--strict", action="store_true", help="exit 1 when a case fails")
    args = p.parse_args()
    groups = args.only or ["warc", "jsonl", "named", "kill"]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kiln-faults-"))
    if args.keep and work.exists() and any(work.iterdir()):
        if not (work / WORK_MARKER).exists():
            p.error(f"--keep {work}: not empty and not an earlier fault suite's folder; give a new one")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).touch()
    t0 = time.perf_counter()
    results: list[Result] = []

    def run(group: str, label: str, fn) -> None:
        results.append(guarded(group, label, fn))
        r = results[-1]
        log(f"{group} {r.case}: {'PASS' if r.passed else 'FAIL'} ({r.seconds:.1f} s)")

    try:
        named = Named(work / "named") if "named" in groups else None
        pipeline = PipelineKill(work / "pipeline") if "kill" in groups else None
        training = once(lambda: Training(work / "training"))
        if {"warc", "jsonl", "named"} & set(groups) or pipeline:
            from kiln.curation.spark import get_spark

            spark = get_spark("kiln-faults", "local[2]")
            spark.sparkContext.setLogLevel("OFF")  # failed tasks are outcomes here, not log noise
            if "warc" in groups:
                results += warc_group(work / "warc", args.warc_cases, args.seed)
            if "jsonl" in groups:
                results += jsonl_group(work / "jsonl", args.jsonl_cases, args.seed)
            if named:
                for item, fn in ((1, named.same_dir_refused), (2, named.valid_warc_rows), (3, named.not_warc_files),
                                 (4, named.non_string_values), (5, named.bad_config_values),
                                 (13, named.mix_fit_messages)):
                    run("named", f"{item:02d}", fn)
            if pipeline:
                pipeline.reference()
            spark.stop()  # the cases below start Spark in subprocesses of their own
        if named:
            run("named", "11", named.missing_input_fast)
            run("named", "07", named.killed_extraction_worker)
            for item, fn in ((6, lambda: training().other_tokenizer()),
                             (8, lambda: training().damaged_newest_checkpoint()),
                             (9, lambda: training().crafted_pickle("rng-rank0.pt")),
                             (10, lambda: training().crafted_pickle(".metadata")),
                             (12, lambda: training().metrics_once())):
                run("named", f"{item:02d}", fn)
        if "kill" in groups:
            run("kill", "", lambda: training().sigkill(args.seed))
            run("kill", "", lambda: pipeline.sigkill(args.seed))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    order = {"warc": 0, "jsonl": 1, "named": 2, "kill": 3}
    results.sort(key=lambda r: (order[r.group], r.case))
    seconds = time.perf_counter() - t0
    print_table(results)
    report = {"date": date.today().isoformat(), "machine": machine(), "versions": versions("torch", "warcio"),
              "source": source_version(),
              "command": " ".join(["python benchmarks/faults.py", *sys.argv[1:]]), "seed": args.seed,
              "seconds": round(seconds, 1),
              "groups": {g: {"cases": sum(r.group == g for r in results),
                             "pass": sum(r.group == g and r.passed for r in results),
                             "fail": sum(r.group == g and not r.passed for r in results)}
                         for g in order if any(r.group == g for r in results)},
              "results": [asdict(r) for r in results]}
    summary = ", ".join(f"{g} {c['pass']}/{c['cases']}" for g, c in report["groups"].items())
    print(f"\npassed: {summary}; {seconds:.0f} s")
    if not args.no_write:
        write_results(args.out, "faults", report, markdown(report, results), os.cpu_count() or 1)
    return 1 if args.strict and any(not r.passed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
