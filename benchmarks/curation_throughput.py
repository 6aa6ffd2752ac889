"""Curation throughput: kiln's Spark stages against their single-machine baselines.

On the same input, in one run, this measures documents per second for

(a) extraction: kiln's Spark job (`read_raw` + `ExtractStage` through `run_stage`,
    Parquet written) against trafilatura called in a plain Python loop, compared
    per core (the loop uses one core, Spark uses `--cores`). Target: kiln >= 0.85x.
    Two loops: one reading the same WARC files with warcio, as a user would write
    it (the like-for-like comparison; kiln's reader is fastwarc where it gives
    warcio's rows, `[read] warc_reader`), and one over pages already in memory
    (trafilatura alone: the stricter reference). benchmarks/extraction_engines.py
    measures the resiliparse engine the same way.
(b) heuristic filtering: kiln's `FilterStage` (datatrove's Gopher repetition,
    Gopher quality, C4 and FineWeb filters only) against datatrove's own
    `LocalPipelineExecutor` running the same filters, both on `--cores` cores.
    Target: kiln >= 1.0x.

Both sides of a comparison get the same documents and the same options: the
baselines import kiln's `decode_html` / `extract_main_content` and datatrove's
filter classes rather than re-typing them, and the script prints whether both
sides kept the same documents, because a benchmark comparing different work
means nothing. Nothing here raises on a missed target: it reports.

Spark session start-up is left out of the timed regions, and each kiln job runs
twice on the same input: the first run in a JVM also pays for compiling that
job's code paths. Both runs are reported; the targets are judged on the second,
the steady state a long production job sees. The machine is assumed to be
shared: each measurement waits for other processes to go idle and reports how
much CPU they took meanwhile.

    python benchmarks/curation_throughput.py --input data/sample.warc.gz --cores 2

The table is printed and written with a JSON of the same numbers to
`benchmarks/results/curation_throughput_<date>_<host>.{md,json}`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

# Before pyspark is imported: no network, loopback only, and Spark's Python
# workers must run this interpreter (the one with kiln's dependencies).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

import orjson  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from common import Monitor, NEIGHBOUR_WARNING, Rates, log, machine, versions, wait_until_quiet, warm_up, write_results  # noqa: E402
from kiln.formats import schema  # noqa: E402
from kiln.curation.extract import ExtractConfig, ExtractStage, decode_html, extract_main_content  # noqa: E402
from kiln.curation.filters import FilterConfig, FilterStage  # noqa: E402
from kiln.curation.langid import LangIdConfig, LangIdStage  # noqa: E402
from kiln.curation.readers import ReadConfig, read_raw, read_warc  # noqa: E402
from kiln.curation.spark import get_spark  # noqa: E402
from kiln.curation.stage import DOCS_DIR, run_stage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXTRACT_TARGET = 0.85  # kiln per-core docs/s >= 0.85 x the plain loop
FILTER_TARGET = 1.0  # kiln docs/s >= datatrove docs/s on the same cores

# Only datatrove's four filters, applied to every document (`languages: []`), which is
# exactly what datatrove's own pipeline does; kiln's Llama-3 filters have no datatrove
# counterpart and are switched off.
DATATROVE_FILTERS = {
    "dup_ngram_lines": {"enabled": False},
    "dirty_words": {"enabled": False},
    "token_kl": {"enabled": False},
    "gopher_repetition": {"languages": []},
    "gopher_quality": {"languages": []},
    "c4_quality": {"languages": []},
    "fineweb_quality": {"languages": []},
}

# Reasons the reader (not extraction) gives; rows with these never reach trafilatura.
READER_DROPS = {"not_html", "http_not_ok", "html_too_large", "empty_page", "bad_record", "truncated_record",
                "not_warc", "bad_html_type", "bad_text_type"}


@dataclass
class Measurement(Rates):
    name: str  # e.g. "extract / plain loop"
    cores: int
    docs: int  # documents given to the measured work
    seconds: float
    kept: int  # documents the work kept (extracted text / passed the filters)
    kept_chars: int  # characters of the kept text: a second check that both sides did the same work
    other_cpu_s: float = 0.0  # CPU seconds other processes on the machine used meanwhile (see common.Monitor)
    notes: dict = field(default_factory=dict)



# --------------------------------------------------------------------------- input


def ensure_input(path: Path) -> Path:
    if not path.exists():
        from kiln.demo import build_sample

        log(f"{path} is missing: building the sample WARC")
        path.parent.mkdir(parents=True, exist_ok=True)
        build_sample(path)
    return path


def load_pages(warc: Path, read_cfg: ReadConfig) -> list[tuple[str | None, bytes, str | None]]:
    """(url, html bytes, declared charset) of every page kiln would hand to extraction.

    kiln's own WARC reader picks the pages, so the loop sees exactly
    the HTML responses the Spark job extracts: not-HTML, non-2xx, empty and oversized
    records are left out on both sides.
    """
    pages = []
    for batch in read_warc(str(warc), read_cfg):
        d = batch.to_pydict()
        for url, html, charset, reason in zip(d[schema.URL], d[schema.HTML], d[schema.CHARSET],
                                              d[schema.DROP_REASON]):
            if reason is None and html is not None:
                pages.append((url, html, charset))
    return pages


# --------------------------------------------------------------------------- (a) extraction


def bench_extract_plain(pages, repeat: int, extract_cfg: ExtractConfig) -> Measurement:
    """The extraction engine (trafilatura by default) in a plain single-process loop over
    pages already in memory."""
    engine, options = extract_cfg.engine, extract_cfg.engine_kwargs()  # what kiln's ExtractStage passes
    kept = chars = undecodable = errors = 0
    with Monitor() as timer:
        for _ in range(repeat):
            for url, html, charset in pages:
                decoded = decode_html(html, charset)
                if decoded is None:
                    undecodable += 1
                    continue
                try:
                    result = extract_main_content(decoded[0], url, engine, **options)
                except Exception:  # noqa: BLE001 - kiln counts these as extract_error; so do we
                    errors += 1
                    continue
                if result is not None:
                    kept += 1
                    chars += len(result[0])
    return Measurement(f"extract / plain {engine} loop", 1, len(pages) * repeat, timer.seconds, kept, chars,
                       timer.other_cpu_s, {"undecodable": undecodable, "errors": errors})


def bench_extract_plain_from_warc(in_dir: Path, read_cfg: ReadConfig, extract_cfg: ExtractConfig) -> Measurement:
    """The same loop as a user would write it over the WARC files: warcio, then the engine.

    kiln's job reads and gunzips the WARCs; this loop does too, so the two do the same
    work end to end. It keeps the pages kiln extracts (HTML, 2xx, non-empty, under the
    size cap); `bench_extract_plain` above is the stricter reference without reading.
    """
    from warcio.archiveiterator import ArchiveIterator

    engine, options = extract_cfg.engine, extract_cfg.engine_kwargs()
    docs = kept = chars = 0
    with Monitor() as timer:
        for path in sorted(in_dir.iterdir()):
            with open(path, "rb") as f:
                for record in ArchiveIterator(f):
                    if record.rec_type != "response":
                        continue
                    ctype = (record.http_headers.get_header("Content-Type") or "").lower()
                    if not ctype.startswith(("text/html", "application/xhtml+xml")):
                        continue
                    if not str(record.http_headers.get_statuscode()).startswith("2"):
                        continue
                    html = record.content_stream().read()
                    if not html.strip() or len(html) > read_cfg.max_html_bytes:
                        continue
                    charset = ctype.partition("charset=")[2].strip() or None
                    docs += 1
                    decoded = decode_html(html, charset)
                    result = extract_main_content(decoded[0], record.rec_headers.get_header("WARC-Target-URI"),
                                                  engine, **options) if decoded else None
                    if result is not None:
                        kept += 1
                        chars += len(result[0])
    return Measurement(f"extract / plain loop reading the WARCs (warcio + {engine})", 1, docs, timer.seconds,
                       kept, chars, timer.other_cpu_s, {})


def copy_warcs(warc: Path, repeat: int, workdir: Path) -> Path:
    """`repeat` byte-identical copies of the WARC in one folder (set-up, untimed).

    Spark reads and extracts them as it would any batch of crawl files (one read task
    per file), with no shortcut from knowing they are copies.
    """
    in_dir = workdir / "warcs"
    in_dir.mkdir()
    for i in range(repeat):
        shutil.copyfile(warc, in_dir / f"copy-{i:03d}.warc.gz")
    return in_dir


def bench_extract_kiln(spark, in_dir: Path, name: str, cores: int, read_cfg: ReadConfig,
                       extract_cfg: ExtractConfig, expected_docs: int, out_dir: Path) -> tuple[Measurement, Path]:
    """kiln's extraction job: read the WARCs, extract, count, write Parquet."""
    with Monitor() as timer:
        source = read_raw(spark, [str(in_dir)], read_cfg)
        result = run_stage(spark, ExtractStage(extract_cfg), source, str(out_dir), log=log)
    result.unpersist()

    stats = result.stats
    reader_drops = sum(n for reason, n in stats.dropped.items() if reason in READER_DROPS)
    extracted = stats.docs_in - reader_drops  # pages that reached trafilatura
    if extracted != expected_docs:
        log(f"WARNING: kiln extracted {extracted} pages, the loop {expected_docs}")
    notes = {"dropped": stats.dropped, "input_files": len(list(in_dir.iterdir())),
             "partitions": source.to_df().rdd.getNumPartitions(),
             "seconds_to_stats": stats.extra["seconds"]}  # run_stage's clock: extraction done, before the write
    return (Measurement(name, cores, extracted, timer.seconds, stats.kept, stats.chars_kept,
                        timer.other_cpu_s, notes), out_dir / DOCS_DIR)


# --------------------------------------------------------------------------- (b) filtering


def english_documents(spark, extracted_docs: Path) -> pa.Table:
    """The distinct English documents extracted in (a), as an Arrow table on the driver.

    (a) wrote `repeat` copies of every page; one of each is kept. Language ID is set-up
    for (b), not part of any measurement.
    """
    df = spark.read.parquet(str(extracted_docs)).dropDuplicates([schema.ID])
    result = run_stage(spark, LangIdStage(LangIdConfig(keep_languages=["en"])), df, None, log=log)
    table = result.kept.sort(schema.ID).toArrow()
    result.unpersist()
    return table


def write_filter_inputs(docs: pa.Table, repeat: int, n_files: int, workdir: Path) -> tuple[Path, Path, int]:
    """`repeat` copies of `docs` (distinct ids) in `n_files` files, once as JSONL, once as Parquet.

    Each file holds whole copies, so every file has the same documents: however datatrove
    deals files to its tasks and Spark packs them into partitions, each core gets the same
    work. A few pages take seconds in GopherRepetitionFilter; an uneven split would measure
    the split, not the filters.
    """
    jsonl_dir, parquet_dir = workdir / "filter_in_jsonl", workdir / "filter_in_parquet"
    jsonl_dir.mkdir()
    parquet_dir.mkdir()
    ids = docs.column(schema.ID).to_pylist()
    id_index = docs.schema.get_field_index(schema.ID)
    per_file = repeat // n_files
    for i in range(n_files):
        copies = [docs.set_column(id_index, schema.ID, pa.array([f"{d}-{k}" for d in ids]))
                  for k in range(i * per_file, (i + 1) * per_file)]
        part = pa.concat_tables(copies)
        pq.write_table(part, parquet_dir / f"part-{i:03d}.parquet")
        with open(jsonl_dir / f"part-{i:03d}.jsonl", "wb") as f:
            for row in part.to_pylist():
                f.write(orjson.dumps(row) + b"\n")
    return jsonl_dir, parquet_dir, docs.num_rows * per_file * n_files


def bench_filter_datatrove(jsonl_dir: Path, n_docs: int, cores: int, workdir: Path) -> Measurement:
    """datatrove's own executor: read JSONL, four filters, write JSONL, `cores` tasks in parallel."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    out_dir = workdir / "filter_out_datatrove"
    executor = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(jsonl_dir)),
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            C4QualityFilter(),
            FineWebQualityFilter(),
            JsonlWriter(str(out_dir)),
        ],
        tasks=cores,
        workers=cores,
        logging_dir=str(workdir / "datatrove_logs"),  # fresh: skip_completed finds nothing to skip
    )
    # The executor's pool start-up is timed: it is how datatrove runs a job, and kiln's
    # timed region likewise includes its Python workers importing trafilatura/datatrove.
    with Monitor() as timer:
        executor.run()

    import gzip

    kept = chars = 0
    for path in sorted(out_dir.glob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            for line in f:
                kept += 1
                chars += len(orjson.loads(line)["text"])
    return Measurement(f"filter / datatrove LocalPipelineExecutor tasks={cores}", cores, n_docs, timer.seconds,
                       kept, chars, timer.other_cpu_s, {"output": "JsonlWriter defaults (gzip)"})


def bench_filter_kiln(spark, parquet_dir: Path, name: str, n_docs: int, cores: int, out_dir: Path) -> Measurement:
    """kiln's filter stage: read Parquet, the same four filters, count, write Parquet."""
    with Monitor() as timer:
        df = spark.read.parquet(str(parquet_dir))
        result = run_stage(spark, FilterStage(FilterConfig.from_table(DATATROVE_FILTERS)), df, str(out_dir), log=log)
    result.unpersist()
    stats = result.stats
    if stats.docs_in != n_docs:
        log(f"WARNING: kiln filtered {stats.docs_in} documents, expected {n_docs}")
    return Measurement(name, cores, stats.docs_in, timer.seconds, stats.kept,
                       stats.chars_kept, timer.other_cpu_s,
                       {"dropped": stats.dropped, "partitions": df.rdd.getNumPartitions(),
                        "seconds_to_stats": stats.extra["seconds"], "output": "Parquet (Spark default, snappy)"})


# --------------------------------------------------------------------------- report


def comparison(base: Measurement, kiln: Measurement, per_core: bool, target: float) -> dict:
    b = base.docs_per_s_per_core if per_core else base.docs_per_s
    k = kiln.docs_per_s_per_core if per_core else kiln.docs_per_s
    ratio = k / b
    return {"ratio": ratio, "target": target, "pass": ratio >= target,
            "same_docs_in": base.docs == kiln.docs,
            "same_kept": base.kept == kiln.kept, "same_kept_chars": base.kept_chars == kiln.kept_chars}


def render(report: dict) -> str:
    m, v, a = report["machine"], report["versions"], report["args"]
    lines = [
        f"# Curation throughput, {report['date']}",
        "",
        f"- machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, host `{m['hostname']}`, "
        f"Python {m['python']}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- input: `{a['input']}` ({report['pages']} HTML pages), extraction x{a['repeat']}, "
        f"filtering: {report['english_docs']} English documents x{a['filter_repeat']} in {a['files']} files",
        f"- command: `{report['command']}`",
        "",
        "| measurement | cores | docs | kept | seconds | docs/s | docs/s per core | other processes' CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["measurements"]:
        flag = " **(disturbed)**" if r["other_load"] > NEIGHBOUR_WARNING else ""
        lines.append(f"| {r['name']} | {r['cores']} | {r['docs']} | {r['kept']} | {r['seconds']:.1f} | "
                     f"{r['docs_per_s']:.1f} | {r['docs_per_s_per_core']:.1f} | {r['other_load']:.0%}{flag} |")
    lines += [
        "",
        "| comparison | kiln / baseline | target | result | same docs in | same docs kept | same kept chars |",
        "|---|---:|---:|---|---|---|---|",
    ]
    yn = {True: "yes", False: "**NO**"}
    for name, c in report["comparisons"].items():
        lines.append(f"| {name} | {c['ratio']:.2f}x | >= {c['target']:.2f}x | "
                     f"{'PASS' if c['pass'] else 'MISS'} | {yn[c['same_docs_in']]} | {yn[c['same_kept']]} | "
                     f"{yn[c['same_kept_chars']]} |")
    lines += [
        "",
        "Extraction is compared per core: the loop runs on one core, kiln on all of them. kiln's time "
        "includes reading and gunzipping the WARCs, the sandboxed trafilatura, and writing "
        "Parquet (the counts come from that one write). The first loop reads the same WARC files with warcio, "
        "kiln with fastwarc where it gives warcio's rows "
        "(the like-for-like comparison); the second runs over pages already read into memory "
        "(trafilatura alone, a stricter reference). Spark session start-up is excluded "
        "(a tiny warm-up job starts the Python "
        "workers first); each kiln job runs twice on the same input: the first run also pays for "
        "the JVM compiling that job's code paths, a once-per-application cost that long production "
        "jobs amortize, so the target is judged on the second. "
        "Filtering is compared in total docs/s on the same cores: datatrove reads JSONL and writes "
        "gzipped JSONL (its defaults), kiln reads and writes Parquet. \"other processes' CPU\" is the "
        "share of the whole machine that processes outside the benchmark used during the measurement; "
        f"above {NEIGHBOUR_WARNING:.0%} the numbers are not trustworthy.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default=str(ROOT / "data" / "sample.warc.gz"),
                   help="WARC to extract (built with kiln.demo when missing; default: %(default)s)")
    p.add_argument("--cores", type=int, default=2, help="Spark local[N] and datatrove tasks (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=6,
                   help="copies of the input WARC for extraction. With the ~920-page sample on 2 cores, 6 "
                        "copies take ~40 s in the loop and ~25 s in Spark. Rounded up to a multiple of "
                        "--cores: Spark reads each WARC in one task, and 3 equal files on 2 cores would "
                        "leave one core idle for a third of the job (default: %(default)s)")
    p.add_argument("--filter-repeat", type=int, default=6,
                   help="copies of the English documents for filtering; 6 copies of the sample's ~750 "
                        "take ~27 s on 2 cores. Rounded up to a multiple of --files (default: %(default)s)")
    p.add_argument("--files", type=int, default=0,
                   help="files the filter input is split into, each holding whole copies; datatrove "
                        "runs one task per core over them (default: --cores)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="result folder (default: %(default)s)")
    p.add_argument("--wait-quiet", type=float, default=90.0,
                   help="before each measurement wait up to this many seconds for other processes to go "
                        "idle; 0 to start at once (default: %(default)s)")
    p.add_argument("--keep-temp", action="store_true", help="keep the temporary folder (for profiling)")
    args = p.parse_args(argv)
    args.files = max(args.files or args.cores, 2)  # at least 2 files, so datatrove's 2 tasks both work
    args.repeat = -(-args.repeat // args.cores) * args.cores
    args.filter_repeat = -(-args.filter_repeat // args.files) * args.files

    warc = ensure_input(Path(args.input))
    workdir = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    extract_cfg = ExtractConfig()
    read_cfg = ReadConfig()
    try:
        # (a) The plain loops first, before Spark's JVM exists, so nothing of ours shares their core.
        pages = load_pages(warc, read_cfg)
        in_dir = copy_warcs(warc, args.repeat, workdir)
        log(f"{len(pages)} HTML pages in {warc}; plain loops x{args.repeat}")
        wait_until_quiet(args.wait_quiet)
        ext_base_warc = bench_extract_plain_from_warc(in_dir, read_cfg, extract_cfg)
        log(f"plain loop reading the WARCs: {ext_base_warc.seconds:.1f}s")
        wait_until_quiet(args.wait_quiet)
        ext_base = bench_extract_plain(pages, args.repeat, extract_cfg)
        log(f"plain loop over pages in memory: {ext_base.seconds:.1f}s")

        # Session start-up (JVM launch, ~5-10 s) is paid once per application, not per document,
        # so it is kept out of the timed region; the warm-up job starts the Python workers.
        spark = get_spark("kiln-bench", f"local[{args.cores}]")
        warm_up(spark, args.cores)
        n_docs = len(pages) * args.repeat
        # The same job twice. The JVM compiles its hot paths (Arrow conversion, caching, Parquet)
        # during its first real job: on 2 cores that costs ~20% of a 25 s job, once per application,
        # and a production run of hours amortizes it. Both runs are reported; the second is the
        # steady state the target is about.
        log(f"kiln extraction x{args.repeat}, first job in this JVM")
        wait_until_quiet(args.wait_quiet)
        ext_kiln_cold, _ = bench_extract_kiln(
            spark, in_dir, f"extract / kiln Spark local[{args.cores}], first job (cold JVM)", args.cores,
            read_cfg, extract_cfg, n_docs, workdir / "extract_cold")
        log(f"kiln extraction, cold: {ext_kiln_cold.seconds:.1f}s")
        wait_until_quiet(args.wait_quiet)
        ext_kiln, extracted = bench_extract_kiln(
            spark, in_dir, f"extract / kiln Spark local[{args.cores}]", args.cores,
            read_cfg, extract_cfg, n_docs, workdir / "extract_out")
        log(f"kiln extraction: {ext_kiln.seconds:.1f}s")

        # (b) inputs: (a)'s English documents, replicated (set-up, untimed).
        english = english_documents(spark, extracted)
        jsonl_dir, parquet_dir, n_docs = write_filter_inputs(english, args.filter_repeat, args.files, workdir)
        log(f"filtering {n_docs} documents ({english.num_rows} English x{args.filter_repeat}) in {args.files} files")
        wait_until_quiet(args.wait_quiet)
        # Twice again: the first filter job still compiles the Parquet-read and filter paths.
        filt_kiln_cold = bench_filter_kiln(
            spark, parquet_dir, f"filter / kiln Spark local[{args.cores}], first filter job", n_docs, args.cores,
            workdir / "filter_cold")
        log(f"kiln filtering, first job: {filt_kiln_cold.seconds:.1f}s")
        wait_until_quiet(args.wait_quiet)
        filt_kiln = bench_filter_kiln(spark, parquet_dir, f"filter / kiln Spark local[{args.cores}]", n_docs,
                                      args.cores, workdir / "filter_out_kiln")
        log(f"kiln filtering: {filt_kiln.seconds:.1f}s")
        spark.stop()  # datatrove gets the machine to itself, as kiln had
        wait_until_quiet(args.wait_quiet)
        filt_base = bench_filter_datatrove(jsonl_dir, n_docs, args.cores, workdir)
        log(f"datatrove filtering: {filt_base.seconds:.1f}s")
    finally:
        if args.keep_temp:
            log(f"temporary files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    measurements = [ext_base_warc, ext_base, ext_kiln_cold, ext_kiln, filt_base, filt_kiln_cold, filt_kiln]
    comparisons = {
        "extraction, docs/s per core, vs the loop reading the WARCs": comparison(
            ext_base_warc, ext_kiln, per_core=True, target=EXTRACT_TARGET),
        "extraction, docs/s per core, vs the loop over pages in memory": comparison(
            ext_base, ext_kiln, per_core=True, target=EXTRACT_TARGET),
        "extraction, docs/s per core, vs the loop reading the WARCs, kiln's first job (cold JVM)": comparison(
            ext_base_warc, ext_kiln_cold, per_core=True, target=EXTRACT_TARGET),
        f"filtering, docs/s on {args.cores} cores": comparison(filt_base, filt_kiln, per_core=False,
                                                               target=FILTER_TARGET),
        f"filtering, docs/s on {args.cores} cores, kiln's first filter job": comparison(
            filt_base, filt_kiln_cold, per_core=False, target=FILTER_TARGET),
    }
    for name, c in comparisons.items():
        if not (c["same_docs_in"] and c["same_kept"]):
            log(f"WARNING: {name}: the two sides did not keep the same documents; the comparison is not like for like")
    for m in measurements:
        if m.other_load > NEIGHBOUR_WARNING:
            log(f"WARNING: {m.name}: other processes used {m.other_load:.0%} of the machine meanwhile; "
                "rerun on a quiet machine")
    report = {
        "date": date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/curation_throughput.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "machine": machine(),
        "versions": versions('trafilatura', 'datatrove', 'warcio', 'fastwarc'),
        "pages": len(pages),
        "english_docs": english.num_rows,
        "measurements": [{**asdict(m), "docs_per_s": m.docs_per_s, "docs_per_s_per_core": m.docs_per_s_per_core,
                          "other_load": m.other_load} for m in measurements],
        "comparisons": comparisons,
    }
    text = render(report)
    print(text)
    write_results(args.out, "curation_throughput", report, text, args.cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
