"""Extraction engines: trafilatura and resiliparse inside kiln's extract stage.

On the demo sample, in one run, this measures

(a) quality: each engine's text against the text the demo generator put in each page.
    kiln.demo builds every page from known blocks (paragraphs, headings, lists, code,
    tables, manual pages' HTML) and wraps them in navigation, sidebars, related links,
    share buttons, a footer and a cookie banner; the sample is rebuilt here with the
    generator to recover those blocks (and must come out byte-identical to the input).
    Scores are token-level: the extracted text and the article's blocks as bags of
    lower-cased word tokens (a CJK character is a token), overlap counted with
    multiplicity; precision falls with boilerplate kept, recall with content lost.
    Micro (all tokens of all pages) and macro (mean of per-page F1) over every page kiln
    extracts. The page's <h1> title is not part of the reference: kiln keeps the title
    in its own column.
(b) speed: documents per second per core of kiln's extraction job (`read_raw` +
    `ExtractStage` through `run_stage`, Parquet written, Spark local[--cores]) with
    each engine, against the same engine in a plain single-process loop reading the
    same WARC files with warcio (curation_throughput's loop, imported). Targets: the
    trafilatura engine >= 0.85x its loop per core; the resiliparse engine >= 3x the
    trafilatura engine per core, both inside kiln. Every kiln job also reports the CPU
    seconds its JVM and its Python processes (workers and their sandboxes) used, so a
    gap can be placed.
(c) WARC reading: kiln's reader (`read_warc`) over the sample with warcio and with
    fastwarc, in this process: documents per second, and whether the rows (ids, URLs,
    dates, HTML, drops) are identical.

Spark start-up is excluded and a first job, not judged, warms the JVM (see
curation_throughput). The machine is assumed shared: each measurement waits for other
processes to go idle, reports how much CPU they took meanwhile, and is taken `--runs`
times, in rounds over all loops and jobs, the fastest run kept (a neighbour, or a slow
spell of the VM, only ever slows a run down).

    python benchmarks/extraction_engines.py --input data/sample.warc.gz --cores 2

The table is printed and written with a JSON of the same numbers to
`benchmarks/results/extraction_engines_<date>_<host>.{md,json}`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import date
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

import pyarrow as pa  # noqa: E402

from common import NEIGHBOUR_WARNING, Monitor, Rates, log, machine, versions, wait_until_quiet, warm_up, write_results  # noqa: E402
from curation_throughput import bench_extract_kiln, bench_extract_plain_from_warc, copy_warcs, ensure_input, load_pages  # noqa: E402
from kiln.curation.extract import ENGINES, ExtractConfig, decode_html, extract_main_content  # noqa: E402
from kiln.curation.readers import ReadConfig, read_warc  # noqa: E402
from kiln.curation.spark import get_spark  # noqa: E402
from kiln.formats import schema  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAFILATURA_TARGET = 0.85  # kiln's trafilatura engine, per core, over the plain trafilatura loop
RESILIPARSE_TARGET = 3.0  # kiln's resiliparse engine, per core, over kiln's trafilatura engine
# A CJK character is a word of its own; elsewhere a word is a run of letters and digits.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
TOKEN = re.compile(f"[{CJK}]|(?:(?![{CJK}])[^\\W_])+")


@dataclass
class Measurement(Rates):
    name: str
    cores: int
    docs: int
    seconds: float
    kept: int
    kept_chars: int
    other_cpu_s: float = 0.0
    cpu_s: dict = field(default_factory=dict)  # CPU seconds of the measured processes, by kind
    notes: dict = field(default_factory=dict)

    @property
    def docs_per_cpu_s(self) -> float:
        """Documents per CPU second of the measured processes: what docs/s per core comes
        to on an idle machine whose cores the job keeps busy, and far less disturbed than
        wall-clock rates when other processes share the machine."""
        return self.docs / sum(self.cpu_s.values())


# --------------------------------------------------------------------------- (a) quality


def reference_texts(warc: Path, seed: int = 0) -> tuple[dict[str, tuple[str, str]], bool]:
    """url -> (page kind, article text) for every capture of the demo sample, and whether
    the rebuilt sample is byte-identical to `warc` (else the reference is not its truth).

    build_sample returns only a summary, so the captures are taken on their way to
    `capture_records`; the module attribute is restored before this returns."""
    import kiln.demo.sample as sample

    captured = []
    original = sample.capture_records

    def capture(pages, seed):
        captured.extend(pages)
        return original(pages, seed)

    sample.capture_records = capture
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rebuilt = Path(tmp) / "sample.warc.gz"
            sample.build_sample(rebuilt, seed)
            same = rebuilt.read_bytes() == warc.read_bytes()
    finally:
        sample.capture_records = original
    return {p.url: (p.kind, article_text(p.blocks)) for p in captured}, same


def article_text(blocks: list) -> str:
    """The text of a page's article blocks, as kiln.demo.render writes them."""
    import lxml.html

    parts = []
    for tag, payload in blocks:
        if tag in ("p", "h2", "h3", "pre", "code"):
            parts.append(payload)
        elif tag == "ul":
            parts.extend(payload)
        elif tag == "links":
            parts.extend(text for _href, text in payload)
        elif tag == "table":
            parts.extend(" ".join(row) for row in payload)
        elif tag == "raw":  # a manual page's HTML
            parts.append(lxml.html.fragment_fromstring(payload, create_parent="div").text_content())
    return "\n".join(parts)


def tokens(text: str | None) -> Counter:
    return Counter(TOKEN.findall(text.lower())) if text else Counter()


def prf(overlap: int, extracted: int, reference: int) -> dict:
    p = overlap / extracted if extracted else 0.0
    r = overlap / reference if reference else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def quality(pages, references: dict, extract_cfg: ExtractConfig) -> dict:
    """Token precision / recall / F1 of one engine's text on every page kiln extracts,
    overall and per page kind. Pages the engine finds nothing in count with no tokens."""
    engine, options = extract_cfg.engine, extract_cfg.engine_kwargs()
    totals = defaultdict(lambda: [0, 0, 0])  # kind -> overlap, extracted, reference tokens
    per_page_f1 = defaultdict(list)
    missing = empty = 0
    for url, html, charset in pages:
        if url not in references:
            missing += 1
            continue
        kind, reference = references[url]
        decoded = decode_html(html, charset)
        result = extract_main_content(decoded[0], url, engine, **options) if decoded else None
        empty += result is None
        got, want = tokens(result[0] if result else None), tokens(reference)
        overlap = sum((got & want).values())
        for key in (kind, "all"):
            t = totals[key]
            t[0] += overlap
            t[1] += sum(got.values())
            t[2] += sum(want.values())
            per_page_f1[key].append(prf(overlap, sum(got.values()), sum(want.values()))["f1"])
    out = {kind: {**prf(*t), "macro_f1": sum(per_page_f1[kind]) / len(per_page_f1[kind]),
                  "pages": len(per_page_f1[kind])} for kind, t in sorted(totals.items())}
    out["all"].update(no_text=empty, no_reference=missing)
    return out


# --------------------------------------------------------------------------- CPU accounting


def cpu_by_kind() -> dict[str, float]:
    """CPU seconds (their own and their reaped children's) of this process's descendants:
    the JVM, the Python processes under it (Spark's workers and their extraction
    sandboxes), and this driver."""
    tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                raw = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            f = raw.rsplit(")", 1)[1].split()
            procs[int(name)] = (int(f[1]), raw[raw.find("(") + 1:raw.rfind(")")], sum(map(int, f[11:15])) / tick)
    out = {"jvm": 0.0, "python": 0.0, "driver": 0.0}
    for pid, (_ppid, comm, cpu) in procs.items():
        p = pid
        for _ in range(64):
            if p == me or p not in procs or p <= 1:
                break
            p = procs[p][0]
        if p != me:
            continue  # not ours
        out["driver" if pid == me else "jvm" if comm == "java" else "python"] += cpu
    return out


def cpu_delta(before: dict, after: dict) -> dict:
    return {k: round(after[k] - before[k], 2) for k in before}


# --------------------------------------------------------------------------- (b) speed


def plain_loop(in_dir: Path, read_cfg: ReadConfig, extract_cfg: ExtractConfig) -> Measurement:
    t0 = time.process_time()
    m = bench_extract_plain_from_warc(in_dir, read_cfg, extract_cfg)
    return Measurement(m.name, 1, m.docs, m.seconds, m.kept, m.kept_chars, m.other_cpu_s,
                       {"driver": round(time.process_time() - t0, 2)})


def measured(measure, wait: float) -> Measurement:
    """`measure()` once the machine is quiet."""
    wait_until_quiet(wait)
    m = measure()
    log(f"{m.name}: {m.seconds:.1f}s")
    return m


def fastest(measure, runs: int, wait: float) -> Measurement:
    """The fastest of `runs` measurements; the others' times are kept in its notes."""
    done = [measured(measure, wait) for _ in range(runs)]
    best = max(done, key=lambda m: m.docs_per_s)
    best.notes["seconds_of_each_run"] = [round(m.seconds, 2) for m in done]
    return best


def kiln_job(spark, in_dir: Path, name: str, cores: int, read_cfg: ReadConfig, extract_cfg: ExtractConfig,
             n_docs: int, out_dir: Path) -> Measurement:
    before = cpu_by_kind()
    m, _docs = bench_extract_kiln(spark, in_dir, name, cores, read_cfg, extract_cfg, n_docs, out_dir)
    cpu = cpu_delta(before, cpu_by_kind())
    shutil.rmtree(out_dir, ignore_errors=True)
    return Measurement(m.name, m.cores, m.docs, m.seconds, m.kept, m.kept_chars, m.other_cpu_s, cpu, m.notes)


# --------------------------------------------------------------------------- (c) reading


def bench_reader(warc: Path, reader: str, repeat: int) -> tuple[Measurement, pa.Table]:
    cfg = ReadConfig(warc_reader=reader)
    table = None
    with Monitor() as timer:
        t0 = time.process_time()
        for _ in range(repeat):
            table = pa.Table.from_batches(list(read_warc(str(warc), cfg)), schema=schema.RAW)
        cpu = time.process_time() - t0
    kept = table.column(schema.DROP_REASON).null_count
    return Measurement(f"read_warc / {reader}", 1, table.num_rows * repeat, timer.seconds, kept * repeat, 0,
                       timer.other_cpu_s, {"driver": round(cpu, 2)}), table


# --------------------------------------------------------------------------- report


def ratio(name: str, base: Measurement, new: Measurement, target: float | None, same_work: bool) -> dict:
    r = new.docs_per_s_per_core / base.docs_per_s_per_core
    out = {"name": name, "ratio": r, "ratio_per_cpu_s": new.docs_per_cpu_s / base.docs_per_cpu_s, "target": target,
           "pass": None if target is None else r >= target, "same_docs_in": base.docs == new.docs}
    if same_work:
        out.update(same_kept=base.kept == new.kept, same_kept_chars=base.kept_chars == new.kept_chars)
    return out


def render(report: dict) -> str:
    m, v, a = report["machine"], report["versions"], report["args"]
    lines = [
        f"# Extraction engines, {report['date']}",
        "",
        f"- machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, host `{m['hostname']}`, "
        f"Python {m['python']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- input: `{a['input']}` ({report['pages']} HTML pages), speed: x{a['repeat']} copies; "
        f"reading: x{a['read_repeat']}",
        f"- ground truth: the demo generator's article blocks; rebuilt sample byte-identical to the input: "
        f"{'yes' if report['reference_matches_input'] else '**NO**'}",
        f"- command: `{report['command']}`",
        "",
        "## Quality on the sample (token-level, against the generator's article text)",
        "",
        "| engine | precision | recall | F1 | macro F1 | pages | no text |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, q in report["quality"].items():
        al = q["all"]
        lines.append(f"| {engine} | {al['precision']:.3f} | {al['recall']:.3f} | {al['f1']:.3f} | "
                     f"{al['macro_f1']:.3f} | {al['pages']} | {al['no_text']} |")
    kinds = [k for k in next(iter(report["quality"].values())) if k != "all"]
    lines += ["", "F1 per page kind:", "", "| kind | pages | " + " | ".join(report["quality"]) + " |",
              "|---|---:|" + "---:|" * len(report["quality"])]
    for kind in kinds:
        pages = next(iter(report["quality"].values()))[kind]["pages"]
        lines.append(f"| {kind} | {pages} | " + " | ".join(
            f"{q[kind]['f1']:.3f} (P {q[kind]['precision']:.2f}, R {q[kind]['recall']:.2f})"
            for q in report["quality"].values()) + " |")
    lines += [
        "",
        "## Speed",
        "",
        "| measurement | cores | docs | kept | seconds | docs/s | docs/s per core | CPU s (JVM / Python / driver) "
        "| docs per CPU s | other processes' CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in report["measurements"]:
        flag = " **(disturbed)**" if r["other_load"] > NEIGHBOUR_WARNING else ""
        c = r["cpu_s"]
        cpu = f"{c.get('jvm', 0):.1f} / {c.get('python', 0):.1f} / {c.get('driver', 0):.1f}"
        lines.append(f"| {r['name']} | {r['cores']} | {r['docs']} | {r['kept']} | {r['seconds']:.1f} | "
                     f"{r['docs_per_s']:.1f} | {r['docs_per_s_per_core']:.1f} | {cpu} | {r['docs_per_cpu_s']:.1f} | "
                     f"{r['other_load']:.0%}{flag} |")
    lines += ["", "| comparison | ratio (docs/s per core) | target | result | ratio (docs per CPU s) | same docs in "
              "| same kept | same kept chars |", "|---|---:|---:|---|---:|---|---|---|"]
    yn = {True: "yes", False: "**NO**", None: "n/a"}
    for c in report["comparisons"]:
        result = "n/a" if c["pass"] is None else "PASS" if c["pass"] else "FAIL"
        target = "" if c["target"] is None else f">= {c['target']:.2f}x"
        lines.append(f"| {c['name']} | {c['ratio']:.2f}x | {target} | {result} | {c['ratio_per_cpu_s']:.2f}x | "
                     f"{yn[c['same_docs_in']]} | {yn[c.get('same_kept')]} | {yn[c.get('same_kept_chars')]} |")
    lines += ["", f"WARC reading in one process: fastwarc and warcio give identical rows: "
              f"{'yes' if report['reader_rows_identical'] else '**NO**'}.", ""]
    if report.get("analysis"):
        lines += ["## Where the time goes", "", report["analysis"], ""]
    return "\n".join(lines)


def analysis(loop: Measurement, kiln: Measurement) -> str:
    """The gap between a kiln job and its loop, placed by CPU seconds per document."""
    per_doc = {k: v / kiln.docs * 1e3 for k, v in kiln.cpu_s.items()}
    loop_ms = loop.cpu_s["driver"] / loop.docs * 1e3
    busy = sum(kiln.cpu_s.values()) / (kiln.seconds * kiln.cores)
    return (f"{kiln.name}: {per_doc['python']:.2f} ms of Python CPU per document (Spark's workers reading the WARCs, "
            f"Arrow batches, the sandbox round trip and the engine in its child) against {loop_ms:.2f} ms in the "
            f"loop (warcio and the engine); the JVM adds {per_doc['jvm']:.2f} ms (Arrow ingest, Parquet, the "
            f"counts), the driver {per_doc['driver']:.2f} ms. The {kiln.cores} cores were {busy:.0%} busy with the "
            f"job's own processes.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default=str(ROOT / "data" / "sample.warc.gz"),
                   help="the demo sample WARC (built with kiln.demo when missing; default: %(default)s)")
    p.add_argument("--cores", type=int, default=2, help="Spark local[N] (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=12,
                   help="copies of the input for the speed runs, rounded up to a multiple of --cores: about 40 s "
                        "per trafilatura job on 2 cores, long enough that what the JVM still compiles after its "
                        "first jobs is a small part of it (default: %(default)s)")
    p.add_argument("--read-repeat", type=int, default=5, help="passes over the input per reader (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3,
                   help="rounds of measurements; the fastest run of each counts (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="result folder (default: %(default)s)")
    p.add_argument("--wait-quiet", type=float, default=90.0,
                   help="before each measurement wait up to this many seconds for other processes to go idle "
                        "(default: %(default)s)")
    args = p.parse_args(argv)
    args.repeat = -(-args.repeat // args.cores) * args.cores

    warc = ensure_input(Path(args.input))
    read_cfg = ReadConfig()
    configs = {engine: ExtractConfig(engine=engine) for engine in ENGINES}
    workdir = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    try:
        # (c) reading, and the pages both loops and the quality pass see.
        tables = {}

        def reader(name):
            m, tables[name] = bench_reader(warc, name, args.read_repeat)
            return m

        read_warcio = fastest(partial(reader, "warcio"), args.runs, args.wait_quiet)
        read_fast = fastest(partial(reader, "fastwarc"), args.runs, args.wait_quiet)
        identical = tables["warcio"].equals(tables["fastwarc"])
        log(f"read_warc: warcio {read_warcio.docs_per_s:.0f} docs/s, fastwarc {read_fast.docs_per_s:.0f} docs/s, "
            f"identical rows: {identical}")
        pages = load_pages(warc, read_cfg)

        # (a) quality (untimed)
        references, same = reference_texts(warc)
        if not same:
            log("WARNING: the rebuilt sample differs from the input: the reference texts are not its ground truth")
        scores = {engine: quality(pages, references, cfg) for engine, cfg in configs.items()}
        for engine, q in scores.items():
            log(f"{engine}: P {q['all']['precision']:.3f} R {q['all']['recall']:.3f} F1 {q['all']['f1']:.3f}")

        # (b) speed
        in_dir = copy_warcs(warc, args.repeat, workdir)
        spark = get_spark("kiln-bench", f"local[{args.cores}]")
        warm_up(spark, args.cores)
        n_docs = len(pages) * args.repeat

        def job(engine: str, warc_reader: str, note: str = "") -> Measurement:
            name = f"extract / kiln Spark local[{args.cores}], {engine}, {warc_reader} reader" + (
                f", {note}" if note else "")
            return kiln_job(spark, in_dir, name, args.cores, ReadConfig(warc_reader=warc_reader), configs[engine],
                            n_docs, workdir / "out")

        # The JVM compiles its hot paths during the first jobs of an application: one job of
        # each engine first (the trafilatura one reported). Then rounds in which every loop
        # and every kiln configuration runs once, so that a slow spell of the machine (on
        # this VM trafilatura's own CPU time per page drifts by 10-15 % between minutes)
        # falls on all of them alike; the fastest run of each counts. The idle JVM takes
        # about 0.03 cores while a loop runs on one core of two.
        cold = measured(partial(job, "trafilatura", "fastwarc", "first job (cold JVM)"), args.wait_quiet)
        measured(partial(job, "resiliparse", "warcio", "warm-up"), args.wait_quiet)
        plans = {}
        for engine, cfg in configs.items():
            plans[("loop", engine)] = partial(plain_loop, in_dir, read_cfg, cfg)
            for warc_reader in ("fastwarc", "warcio"):
                plans[(engine, warc_reader)] = partial(job, engine, warc_reader)
        done = defaultdict(list)
        for _ in range(args.runs):
            for key, plan in plans.items():
                done[key].append(measured(plan, args.wait_quiet))
        best = {}
        for key, ms in done.items():
            best[key] = max(ms, key=lambda m: m.docs_per_s)
            best[key].notes["seconds_of_each_run"] = [round(m.seconds, 2) for m in ms]
        loops = {engine: best[("loop", engine)] for engine in ENGINES}
        kiln = {key: m for key, m in best.items() if key[0] != "loop"}
        spark.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    traf, res = kiln[("trafilatura", "fastwarc")], kiln[("resiliparse", "fastwarc")]
    comparisons = [
        ratio("trafilatura engine in kiln vs the plain trafilatura loop reading the WARCs, docs/s per core",
              loops["trafilatura"], traf, TRAFILATURA_TARGET, True),
        ratio("resiliparse engine in kiln vs the trafilatura engine in kiln, docs/s per core",
              traf, res, RESILIPARSE_TARGET, False),
        ratio("resiliparse engine in kiln vs the plain resiliparse loop reading the WARCs, docs/s per core",
              loops["resiliparse"], res, None, True),
        ratio("trafilatura engine in kiln, fastwarc reader vs warcio reader", kiln[("trafilatura", "warcio")],
              traf, None, True),
        ratio("resiliparse engine in kiln, fastwarc reader vs warcio reader", kiln[("resiliparse", "warcio")],
              res, None, True),
        ratio("trafilatura engine in kiln, first job (cold JVM) vs the plain loop", loops["trafilatura"],
              cold, None, True),
        ratio("read_warc, fastwarc vs warcio (one process)", read_warcio, read_fast, None, True),
    ]
    measurements = [read_warcio, read_fast, *loops.values(), cold, *kiln.values()]
    for m in measurements:
        if m.other_load > NEIGHBOUR_WARNING:
            log(f"WARNING: {m.name}: other processes used {m.other_load:.0%} of the machine meanwhile")
    report = {
        "date": date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/extraction_engines.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "machine": machine(),
        "versions": versions("trafilatura", "resiliparse", "fastwarc", "warcio", "datatrove"),
        "pages": len(pages),
        "reference_matches_input": same,
        "reader_rows_identical": identical,
        "quality": scores,
        "settings": {engine: cfg.engine_kwargs() for engine, cfg in configs.items()},
        "measurements": [{**asdict(m), "docs_per_s": m.docs_per_s, "docs_per_s_per_core": m.docs_per_s_per_core,
                          "docs_per_cpu_s": m.docs_per_cpu_s, "other_load": m.other_load} for m in measurements],
        "comparisons": comparisons,
        "analysis": "\n\n".join(analysis(loops[e], kiln[(e, "fastwarc")]) for e in ENGINES),
    }
    text = render(report)
    print(text)
    write_results(args.out, "extraction_engines", report, text, args.cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
