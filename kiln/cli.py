"""The `kiln` command.

    kiln curate extract  --input X.warc.gz --output OUT      HTML -> main-content text
    kiln curate langid   --input OUT --output OUT2           fastText language ID
    kiln curate filter   --input OUT2 --output OUT3          Gopher / C4 / FineWeb / Llama 3 filters
    kiln curate dedup-url   --input OUT3 --output OUT4       newest page per normalized URL
    kiln curate dedup-exact --input OUT4 --output OUT5       one copy of each text
    kiln curate dedup-minhash --input OUT5 --output OUT6     MinHash-LSH near-duplicates
    kiln curate dedup-lines --input OUT6 --output OUT7       lines repeated across documents removed
    kiln curate pipeline recipes/demo.toml                   several stages in one Spark application
    kiln curate sample   --out data/sample.warc.gz           build the bundled demo WARC

Each stage is also `spark-submit kiln/curation/jobs/<stage>.py ...` with the same
options: a local run starts `local[*]` Spark itself, spark-submit brings its own master.
"""

from __future__ import annotations

import argparse
import os
import sys

from kiln.config import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _common(p: argparse.ArgumentParser, needs_input: bool = True) -> None:
    p.add_argument("--input", nargs="+", required=needs_input, metavar="PATH",
                   help="input files, directories or globs (local paths or fsspec URLs)")
    p.add_argument("--output", required=needs_input, metavar="DIR",
                   help="output directory: docs/ (Parquet), stats.json, dropped/ with --write-dropped")
    p.add_argument("--recipe", metavar="TOML", help="take this stage's settings from a recipe's sections")
    p.add_argument("--write-dropped", action="store_true",
                   help="also write dropped documents with their drop_reason to OUT/dropped/")
    p.add_argument("--master", help="Spark master for a local run (default local[*]; ignored under spark-submit)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description="Pretraining-data curation on Spark (kiln curate ...).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    curate = sub.add_parser("curate", help="curation stages on Spark",
                            description="Curation stages on Spark. Every stage writes docs/ and stats.json.")
    stages = curate.add_subparsers(dest="stage", required=True)

    p = stages.add_parser("extract", help="HTML (WARC / JSONL / Parquet) to main-content text with trafilatura",
                          description="Read WARC (.warc, .warc.gz), JSONL (.jsonl[.gz|.zst]) or Parquet pages and "
                                      "extract the main content with trafilatura. Output columns: id, url, text, "
                                      "title, crawl_date, source, charset.")
    _common(p)
    p.add_argument("--format", choices=["auto", "warc", "jsonl", "parquet"], help="input format (default: by file name)")
    p.add_argument("--html-column", help="JSONL/Parquet column with raw HTML (default html)")
    p.add_argument("--text-column", help="JSONL/Parquet column with plain text: skips extraction")
    p.add_argument("--url-column", help="JSONL/Parquet URL column (default url)")
    p.add_argument("--date-column", help="JSONL/Parquet crawl-date column (default crawl_date)")
    p.add_argument("--timeout", type=float, help="per-page extraction timeout in seconds (default 5)")
    p.add_argument("--max-html-bytes", type=int, help="pages larger than this are dropped (default 2000000)")
    p.add_argument("--partitions", type=int, help="Spark partitions after reading (default: 2 x cores when files are fewer)")

    p = stages.add_parser("langid", help="fastText lid.176 language ID: adds lang, lang_score",
                          description="Label each document with fastText lid.176 (176 languages).")
    _common(p)
    p.add_argument("--model", help="fastText LID model (.ftz or lid.176.bin); default: the bundled lid.176.ftz")
    p.add_argument("--keep-lang", help="comma-separated languages to keep, e.g. en,de,fr (default: all)")
    p.add_argument("--min-score", type=float, help="drop documents whose language score is lower (default 0)")

    p = stages.add_parser("filter", help="Gopher / C4 / FineWeb (datatrove) and Llama 3 heuristic filters",
                          description="Heuristic filters in order: " + ", ".join(
                              __import__("kiln.curation.filters", fromlist=["x"]).FILTER_ORDER)
                          + ". Tune them in a recipe's [filter.NAME] tables.")
    _common(p)
    p.add_argument("--disable", nargs="+", default=[], metavar="FILTER", help="filters to switch off")

    p = stages.add_parser("dedup-url", help="URL dedup: the newest crawl of each normalized URL is kept",
                          description="Llama 3 URL dedup: URLs are normalized (case of scheme and host, default "
                                      "ports, fragment, trailing slash, tracking parameters, query order) and the "
                                      "page with the latest crawl_date is kept (ties: smallest id). Adds "
                                      "url_normalized; drops the others as url_duplicate.")
    _common(p)
    p.add_argument("--keep-query-order", action="store_true", help="do not sort query parameters")

    p = stages.add_parser("dedup-exact", help="exact dedup on a hash of normalized text",
                          description="Exact dedup: SHA-256 of the text with whitespace collapsed and case folded; "
                                      "the earliest crawl of each text is kept (ties: smallest id). Adds text_hash; "
                                      "drops the others as exact_duplicate.")
    _common(p)
    p.add_argument("--case-sensitive", action="store_true", help="do not fold case before hashing")
    p.add_argument("--keep-whitespace", action="store_true", help="do not collapse whitespace before hashing")

    p = stages.add_parser("dedup-minhash", help="MinHash-LSH fuzzy dedup with connected components in Spark",
                          description="Word 5-gram shingles (character n-grams for CJK), datasketch MinHash "
                                      "signatures, LSH with --bands x --rows (default 14 x 8, as FineWeb), "
                                      "connected components in Spark. The smallest id of each component is kept; "
                                      "the others are dropped as minhash_duplicate. Adds minhash_cluster.")
    _common(p)
    p.add_argument("--ngram", type=int, help="words per shingle (default 5)")
    p.add_argument("--bands", type=int, help="LSH bands (default 14)")
    p.add_argument("--rows", type=int, help="hash values per band (default 8)")
    p.add_argument("--per-language", action="store_true", help="only documents of the same lang can be duplicates")
    p.add_argument("--threshold", type=float, help="choose bands x rows for this Jaccard instead")
    p.add_argument("--verify", type=float, metavar="JACCARD",
                   help="verify candidate pairs: keep only those with exact shingle Jaccard >= JACCARD")

    p = stages.add_parser("dedup-lines", help="ccNet / Llama 3 line dedup across buckets of documents",
                          description="Lines (normalized: case, digits, punctuation) found in more than "
                                      "--max-count documents of their bucket of --bucket-docs documents are "
                                      "removed from every document. Documents left empty are dropped as "
                                      "line_dedup_empty, shorter than --min-chars as line_dedup_too_short.")
    _common(p)
    p.add_argument("--bucket-docs", type=int, help="documents per bucket (default 30000000, as Llama 3)")
    p.add_argument("--max-count", type=int, help="remove lines seen in more documents than this (default 6)")
    p.add_argument("--min-chars", type=int, help="drop documents shorter than this after removal (default 50)")

    p = stages.add_parser("pipeline", help="run a recipe's stages in one Spark application",
                          description="Run the stages of a TOML recipe (see recipes/demo.toml) and print the funnel.")
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--input", nargs="+", metavar="PATH", help="override [pipeline] input")
    p.add_argument("--output", metavar="DIR", help="override [pipeline] output")
    p.add_argument("--force", action="store_true", help="recompute every stage even if a finished output matches")
    p.add_argument("--write-dropped", action="store_true", help="override [pipeline] write_dropped")
    p.add_argument("--master", help="Spark master for a local run (default local[*])")

    p = stages.add_parser("sample", help="build the demo WARC from text on this machine",
                          description="Deterministically build the sample WARC used by `make demo`.")
    p.add_argument("--out", default="data/sample.warc.gz", help="output WARC path")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _recipe_for(args):
    """The recipe a command runs: the --recipe file (or defaults) with the options applied."""
    from kiln.curation.pipeline import load_recipe, parse_recipe

    recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else parse_recipe({})
    cfg = recipe.pipeline
    if args.input:
        cfg.input = args.input
    if args.output:
        cfg.output = args.output
    if args.write_dropped:
        cfg.write_dropped = True
    if args.stage != "pipeline":
        cfg.stages = [args.stage.replace("-", "_")]
        cfg.resume = False
    else:
        cfg.resume = not args.force
    if args.stage == "extract":
        for opt, key in (("format", "format"), ("html_column", "html_column"), ("text_column", "text_column"),
                         ("url_column", "url_column"), ("date_column", "date_column"), ("partitions", "partitions")):
            if getattr(args, opt) is not None:
                setattr(recipe.read, key, getattr(args, opt))
        if args.timeout is not None:
            recipe.extract.timeout_s = args.timeout
        if args.max_html_bytes is not None:
            recipe.extract.max_html_bytes = args.max_html_bytes
    elif args.stage == "langid":
        if args.model:
            recipe.langid.model_path = args.model
        if args.keep_lang:
            recipe.langid.keep_languages = [x.strip() for x in args.keep_lang.split(",") if x.strip()]
        if args.min_score is not None:
            recipe.langid.min_score = args.min_score
    elif args.stage == "dedup-url":
        if args.keep_query_order:
            recipe.dedup_url.sort_query = False
    elif args.stage == "dedup-minhash":
        for opt in ("ngram", "bands", "rows"):
            if getattr(args, opt) is not None:
                setattr(recipe.dedup_minhash, opt, getattr(args, opt))
        if args.per_language:
            recipe.dedup_minhash.per_language = True
        if args.threshold is not None:
            recipe.dedup_minhash.threshold = args.threshold
        if args.verify is not None:
            recipe.dedup_minhash.verify, recipe.dedup_minhash.verify_threshold = True, args.verify
    elif args.stage == "dedup-lines":
        for opt in ("bucket_docs", "max_count", "min_chars"):
            if getattr(args, opt) is not None:
                setattr(recipe.dedup_lines, opt, getattr(args, opt))
    elif args.stage == "dedup-exact":
        if args.case_sensitive:
            recipe.dedup_exact.lowercase = False
        if args.keep_whitespace:
            recipe.dedup_exact.collapse_whitespace = False
    elif args.stage == "filter":
        from kiln.curation.filters import FILTERS

        for name in args.disable:
            if name not in FILTERS:
                raise ConfigError(f"--disable: unknown filter {name!r} (known: {', '.join(FILTERS)})")
            recipe.filter = dict(recipe.filter)
            recipe.filter[name] = {**recipe.filter.get(name, {}), "enabled": False}
    return recipe


def curate(args) -> int:
    if args.stage == "sample":
        from kiln.curation.sample import build_sample

        summary = build_sample(args.out, seed=args.seed)
        print(f"wrote {args.out}: {summary}")
        return 0
    from kiln.curation import pipeline
    from kiln.curation.spark import get_spark

    recipe = _recipe_for(args)
    spark = get_spark(f"kiln-{args.stage}", args.master)
    pipeline.run(spark, recipe, stage_dirs=args.stage == "pipeline")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "curate":
            return curate(args)
    except ConfigError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        message = _task_error(e)
        if message is None:
            raise
        print(f"kiln: error: {message}", file=sys.stderr)
        return 1
    return 0


def _task_error(e: Exception) -> str | None:
    """The Python error behind a failed Spark task, without the JVM stack."""
    text = str(e)
    if "ConfigError:" in text:
        return text.split("ConfigError:", 1)[1].strip().splitlines()[0]
    return None


if __name__ == "__main__":
    sys.exit(main())
