"""The `kiln` command.

    kiln curate extract  --input X.warc.gz --output OUT      HTML -> main-content text
    kiln curate langid   --input OUT --output OUT2           fastText language ID
    kiln curate filter   --input OUT2 --output OUT3          Gopher / C4 / FineWeb / Llama 3 filters
    kiln curate dedup-url   --input OUT3 --output OUT4       newest page per normalized URL
    kiln curate dedup-exact --input OUT4 --output OUT5       one copy of each text
    kiln curate dedup-minhash --input OUT5 --output OUT6     MinHash-LSH near-duplicates
    kiln curate dedup-lines --input OUT6 --output OUT7       lines repeated across documents removed
    kiln curate quality  --input OUT7 --output OUT8 --model quality.bin    fastText quality score
    kiln curate scorer   --input OUT8 --output OUT9 --model scorer/        transformer quality score
    kiln curate domain   --input OUT9 --output OUT10 --model domain.bin    domain (and topic) labels
    kiln curate decontam --input OUT10 --output OUT11 --eval-sets E.jsonl  n-gram overlap with eval sets
    kiln curate tokenize --input OUT11 --output OUT12 --tokenizer tok/     token shards per domain
    kiln curate pipeline recipes/demo.toml                   several stages in one Spark application

    kiln curate train-quality --positives P.jsonl --negatives N.jsonl --output quality.bin
    kiln curate train-domain  --input labels.jsonl --output domain.bin
    kiln curate train-scorer  --input scores.jsonl --label-column score --tokenizer tok/ --output scorer/
    kiln curate train-tokenizer --input OUT7 --vocab-size 8192 --output tok/
    kiln curate sample   --out data/sample.warc.gz [--labels data/labels]   the bundled demo data

    kiln mix design|run|fit|predict|optimize|almr|cmr|report ...   choose the mixture (kiln mix --help)
    kiln train recipes/tiny_train.toml                       staged pretraining; torchrun -m kiln.training for FSDP2

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
        prog="kiln", description="Pretraining data for LLMs: curation on Spark (kiln curate), the mixture "
                                  "optimizer (kiln mix) and staged training (kiln train).",
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

    p = stages.add_parser("quality", help="fastText quality classifier: adds quality_score, keeps the best",
                          description="Score documents with a fastText quality model (kiln curate train-quality): "
                                      "quality_score = P(positive class). Keep documents scoring at least "
                                      "--min-score, or the best --keep-top-fraction of the corpus (DCLM keeps "
                                      "0.1); drops are quality_low_score / quality_not_top_fraction, and "
                                      "empty texts empty_document.")
    _common(p)
    p.add_argument("--model", help="fastText quality model (.bin from train-quality)")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--min-score", type=float, help="keep documents with quality_score >= this")
    keep.add_argument("--keep-top-fraction", type=float, help="keep this share of documents by score, e.g. 0.1")

    p = stages.add_parser("scorer", help="transformer quality scorer (DistilRoBERTa role): adds model_score",
                          description="Batched inference of a transformers sequence classifier/regressor trained "
                                      "with train-scorer, one model per Spark worker, torch threads = task cores, "
                                      "a GPU when present. Adds model_score; --min-score drops model_score_low.")
    _common(p)
    p.add_argument("--model", help="directory written by train-scorer")
    p.add_argument("--min-score", type=float, help="drop documents scoring lower")
    p.add_argument("--batch-size", type=int, help="documents per forward pass (default 32)")

    p = stages.add_parser("domain", help="domain (and topic) classification: adds domain, domain_score, topic",
                          description="Documents whose lang is not in --languages go to the multilingual domain; "
                                      "the others are classified by a fastText model (train-domain) or a "
                                      "transformer (train-scorer --task classification, --backend transformer). "
                                      "A topic model adds topic, and --topic-rate TOPIC=RATE keeps that share of "
                                      "a topic's documents (drops: topic_downsampled).")
    _common(p)
    p.add_argument("--model", help="domain model: fastText .bin, or a train-scorer directory with --backend transformer")
    p.add_argument("--backend", choices=["fasttext", "transformer"], help="classifier kind (default fasttext)")
    p.add_argument("--domains", help="comma-separated domains (default general,math,code,multilingual)")
    p.add_argument("--languages", help="comma-separated languages the model classifies (default en)")
    p.add_argument("--topic-model", help="fastText topic model (train-domain --label-column topic)")
    p.add_argument("--topic-rate", action="append", default=[], metavar="TOPIC=RATE",
                   help="keep this share of TOPIC's documents (repeatable)")

    p = stages.add_parser("decontam", help="drop or flag documents sharing n-grams with evaluation sets",
                          description="Documents sharing a 13-gram (of lower-cased words, punctuation ignored) "
                                      "with an item of an evaluation set are dropped as eval_contamination, or "
                                      "flagged in contaminated_by with --mode flag. stats.json counts documents "
                                      "per evaluation set.")
    _common(p)
    p.add_argument("--eval-sets", nargs="+", metavar="JSONL", help="evaluation sets, one JSONL file each")
    p.add_argument("--fields", help="comma-separated JSON fields with evaluation text (default: every string)")
    p.add_argument("--ngram", type=int, help="words per n-gram (default 13)")
    p.add_argument("--mode", choices=["drop", "flag"], help="drop contaminated documents or only flag them")

    p = stages.add_parser("tokenize", help="token shards per domain (contract 3) and availability.json",
                          description="Tokenize documents in Spark, each partition writing its own flat shard "
                                      "per domain (uint16, or uint32 when the vocabulary needs it; documents "
                                      "separated by EOS) with a JSON index, then availability.json with tokens "
                                      "and documents per domain.")
    _common(p)
    p.add_argument("--tokenizer", help="tokenizer.json, or a directory from train-tokenizer")
    p.add_argument("--shards", metavar="DIR", help="where shards go (default OUT/shards)")

    p = stages.add_parser("train-quality", help="train the fastText quality classifier (positives vs negatives)",
                          description="Train a fastText classifier of positive (e.g. pages referenced by "
                                      "Wikipedia) vs negative (random crawl) documents. Prints validation "
                                      "precision/recall; writes MODEL.bin and MODEL.bin.json.")
    p.add_argument("--positives", nargs="+", required=True, metavar="PATH", help="JSONL/Parquet files of good documents")
    p.add_argument("--negatives", nargs="+", required=True, metavar="PATH", help="JSONL/Parquet files of other documents")
    p.add_argument("--output", required=True, metavar="MODEL.bin")
    _fasttext_options(p)

    p = stages.add_parser("train-domain", help="train a fastText multi-class classifier (domains or topics)",
                          description="Train a fastText classifier on labelled documents (a text and a label "
                                      "column), e.g. general/math/code, or topics for downsampling.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="JSONL/Parquet labelled documents")
    p.add_argument("--label-column", default="label", help="column with the class (default label)")
    p.add_argument("--output", required=True, metavar="MODEL.bin")
    _fasttext_options(p)

    p = stages.add_parser("train-scorer", help="train a small transformers classifier/regressor on labelled docs",
                          description="Train a sequence regressor (quality scores a larger model gave) or "
                                      "classifier with transformers, from scratch (a tiny config and a local "
                                      "tokenizer) or from a local checkpoint. CPU works; a GPU is used if present.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="JSONL/Parquet labelled documents")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label", help="column with the score or class (default label)")
    p.add_argument("--task", choices=["regression", "classification"], help="default regression")
    p.add_argument("--tokenizer", help="tokenizer (directory or tokenizer.json) for a model trained from scratch")
    p.add_argument("--model-dir", help="local transformers checkpoint to fine-tune instead")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--max-length", type=int, help="tokens per document (default 256)")
    p.add_argument("--output", required=True, metavar="DIR")

    p = stages.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with tokenizers",
                          description="Byte-level BPE with EOS <|endoftext|> and the chat-format special tokens "
                                      "post-training needs; reads a bounded sample of documents on the driver.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="kiln stage directories, Parquet or JSONL files")
    p.add_argument("--text-column", default="text")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-chars", type=int, default=200_000_000, help="characters read for training")
    p.add_argument("--output", required=True, metavar="DIR")

    p = stages.add_parser("pipeline", help="run a recipe's stages in one Spark application",
                          description="Run the stages of a TOML recipe (see recipes/demo.toml) and print the funnel.")
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--input", nargs="+", metavar="PATH", help="override [pipeline] input")
    p.add_argument("--output", metavar="DIR", help="override [pipeline] output")
    p.add_argument("--force", action="store_true", help="recompute every stage even if a finished output matches")
    p.add_argument("--until", metavar="STAGE",
                   help="stop after this stage (e.g. dedup_lines, to train a tokenizer on its output; a later "
                        "full run reuses the finished stages)")
    p.add_argument("--write-dropped", action="store_true", help="override [pipeline] write_dropped")
    p.add_argument("--master", help="Spark master for a local run (default local[*])")

    p = sub.add_parser("train", help="staged pretraining from a TOML recipe (FSDP2 under torchrun)",
                       description="Train the stages of a recipe (core, long context, annealing) on token shards: "
                                   "each stage starts from the previous one's weights, checkpoints with "
                                   "torch.distributed.checkpoint and exports a Hugging Face model directory. "
                                   "Single process, or `torchrun --nproc_per_node=N -m kiln.training RECIPE`.")
    p.add_argument("recipe", help="training recipe TOML (see recipes/tiny_train.toml)")
    p.add_argument("--output", help="override [run] output")
    p.add_argument("--shards", help="override [run] shards")
    p.add_argument("--no-resume", action="store_true",
                   help="start unfinished stages from scratch instead of their newest complete checkpoint")

    from kiln.mixing.cli import add_parser as add_mix_parser

    add_mix_parser(sub)

    p = stages.add_parser("sample", help="build the demo WARC from text on this machine",
                          description="Deterministically build the sample WARC used by `make demo`.")
    p.add_argument("--out", default="data/sample.warc.gz", help="output WARC path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", metavar="DIR", help="also write the demo's labelled sets and evaluation sets here")
    return parser


def _fasttext_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-column", default="text", help="column with the document text (default text)")
    p.add_argument("--epoch", type=int, help="passes over the data (default 25)")
    p.add_argument("--lr", type=float, help="learning rate (default 0.5)")
    p.add_argument("--word-ngrams", type=int, help="word n-gram features (default 2)")
    p.add_argument("--dim", type=int, help="embedding size (default 64)")
    p.add_argument("--val-fraction", type=float, help="held-out share per class (default 0.1)")
    p.add_argument("--seed", type=int, help="split and training seed (default 0)")


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
        if args.until:
            if args.until not in cfg.stages:
                raise ConfigError(f"--until {args.until}: not a stage of this recipe ({', '.join(cfg.stages)})")
            cfg.stages = cfg.stages[: cfg.stages.index(args.until) + 1]
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
    elif args.stage == "quality":
        _set(recipe.quality, model_path=args.model, min_score=args.min_score,
             keep_top_fraction=args.keep_top_fraction)
    elif args.stage == "scorer":
        _set(recipe.scorer, model_dir=args.model, min_score=args.min_score, batch_size=args.batch_size)
    elif args.stage == "domain":
        _set(recipe.domain, model_path=args.model, backend=args.backend, domains=_csv(args.domains),
             languages=_csv(args.languages), topic_model=args.topic_model)
        for item in args.topic_rate:
            topic, _, rate = item.partition("=")
            try:
                recipe.domain.topic_rates[topic] = float(rate)
            except ValueError:
                raise ConfigError(f"--topic-rate {item!r}: expected TOPIC=RATE, e.g. sports=0.5") from None
    elif args.stage == "decontam":
        _set(recipe.decontam, eval_sets=args.eval_sets, fields=_csv(args.fields), ngram=args.ngram, mode=args.mode)
    elif args.stage == "tokenize":
        _set(recipe.tokenize, tokenizer=args.tokenizer, shards_dir=args.shards)
    elif args.stage == "filter":
        from kiln.curation.filters import FILTERS

        for name in args.disable:
            if name not in FILTERS:
                raise ConfigError(f"--disable: unknown filter {name!r} (known: {', '.join(FILTERS)})")
            recipe.filter = dict(recipe.filter)
            recipe.filter[name] = {**recipe.filter.get(name, {}), "enabled": False}
    return recipe


def _set(cfg, **values) -> None:
    """Apply the options the user gave (None = not given) onto a config dataclass."""
    for key, value in values.items():
        if value is not None:
            setattr(cfg, key, value)


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [x.strip() for x in value.split(",") if x.strip()]


def train(args) -> int:
    """The train-* commands: driver-side, no Spark."""
    from kiln.curation.labelled import read_labelled

    if args.stage in ("train-quality", "train-domain"):
        from kiln.curation.classify import QUALITY_NEGATIVE, QUALITY_POSITIVE, FastTextTrainConfig, train_fasttext

        cfg = FastTextTrainConfig()
        _set(cfg, epoch=args.epoch, lr=args.lr, word_ngrams=args.word_ngrams, dim=args.dim,
             val_fraction=args.val_fraction, seed=args.seed)
        if args.stage == "train-quality":
            data = read_labelled(args.positives, args.text_column, label=QUALITY_POSITIVE)
            negatives = read_labelled(args.negatives, args.text_column, label=QUALITY_NEGATIVE)
            data.extend(negatives)
            where = f"{args.positives[0]} + {args.negatives[0]}"
            train_fasttext(data.texts, data.labels, args.output, cfg, kind="quality",
                           positive_label=QUALITY_POSITIVE, where=where)
        else:
            data = read_labelled(args.input, args.text_column, args.label_column)
            train_fasttext(data.texts, data.labels, args.output, cfg, kind=args.label_column, where=args.input[0])
        return 0
    if args.stage == "train-scorer":
        from kiln.curation.scorer import ScorerTrainConfig, train_scorer_from_files

        cfg = ScorerTrainConfig()
        _set(cfg, task=args.task, tokenizer=args.tokenizer, model_dir=args.model_dir, epochs=args.epochs,
             batch_size=args.batch_size, lr=args.lr, max_length=args.max_length)
        train_scorer_from_files(args.input, args.text_column, args.label_column, cfg, args.output)
        return 0
    if args.stage == "train-tokenizer":
        from kiln.curation.tokenize import iter_texts, train_tokenizer

        train_tokenizer(iter_texts(args.input, args.text_column, args.max_chars), args.output,
                        vocab_size=args.vocab_size)
        return 0
    raise ConfigError(f"unknown command {args.stage}")


def train_command(args) -> int:
    from kiln.training import recipe as training_recipe
    from kiln.training.train import train as run_training

    recipe = training_recipe.load(args.recipe)
    if args.output:
        recipe.run.output = args.output
    if args.shards:
        recipe.run.shards = args.shards
    run_training(recipe, resume=not args.no_resume)
    return 0


def curate(args) -> int:
    if args.stage == "sample":
        from kiln.curation.sample import build_labels, build_sample

        summary = build_sample(args.out, seed=args.seed)
        print(f"wrote {args.out}: {summary}")
        if args.labels:
            print(f"wrote {args.labels}: {build_labels(args.labels, seed=args.seed + 1)}")
        return 0
    if args.stage.startswith("train-"):
        return train(args)
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
        if args.command == "train":
            return train_command(args)
        if args.command == "mix":
            from kiln.mixing.cli import run as mix_command

            return mix_command(args)
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
