"""`kiln curate ...`: the curation stages on Spark, the classifiers' and tokenizer's
training, and the demo data.

    kiln curate extract  --input X.warc.gz --output OUT      HTML -> main-content text
    kiln curate langid   --input OUT --output OUT2 --keep-languages en de
    kiln curate filter   --input OUT2 --output OUT3 --disable token_kl
    kiln curate dedup-url | dedup-exact | dedup-minhash | dedup-lines  --input ... --output ...
    kiln curate quality  --input OUT7 --output OUT8 --model-path quality.bin --min-score 0.5
    kiln curate scorer   --input OUT8 --output OUT9 --model-dir scorer/
    kiln curate domain   --input OUT9 --output OUT10 --model-path domain.bin
    kiln curate decontam --input OUT10 --output OUT11 --eval-sets E.jsonl
    kiln curate tokenize --input OUT11 --output OUT12 --tokenizer tok/
    kiln curate pipeline recipes/demo.toml                   several stages in one Spark application

    kiln curate train-quality --positives P.jsonl --negatives N.jsonl --output quality.bin
    kiln curate train-domain  --input labels.jsonl --output domain.bin
    kiln curate train-scorer  --input scores.jsonl --label-column score --tokenizer tok/ --output scorer/
    kiln curate train-tokenizer --input OUT7 --vocab-size 8192 --output tok/
    kiln curate sample   --out data/sample.warc.gz [--labels data/labels]   the bundled demo data

A stage's options are its recipe section's fields (`kiln curate STAGE --help`);
`--recipe R.toml` takes them from a recipe and `--set SECTION.KEY=VALUE` sets any key,
nested filter tables included. Each stage is also
`spark-submit kiln/curation/jobs/<stage>.py ...` with the same options: a local run
starts `local[*]` Spark itself, spark-submit brings its own master.
"""

from __future__ import annotations

import argparse

from kiln.config import (ConfigError, add_config_options, apply_scale, config_overrides, load_toml, merge,
                         parse_set)
from kiln.curation.classify import FastTextTrainConfig
from kiln.curation.readers import ReadConfig
from kiln.curation.registry import STAGES
from kiln.curation.scorer.model import ScorerTrainConfig
from kiln.curation.tokenizer import TokenizerTrainConfig

# Sections of the train-* commands' options (they are not recipe sections).
FASTTEXT, SCORER_TRAIN, TOKENIZER_TRAIN = "fasttext", "scorer_train", "tokenizer_train"


def add_parser(sub) -> None:
    curate = sub.add_parser("curate", help="curation stages on Spark",
                            description="Curation stages on Spark. Every stage writes docs/ and stats.json.",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=__doc__.split("\n\n", 1)[1])
    commands = curate.add_subparsers(dest="stage", required=True)
    for name, (config, stage) in STAGES.items():
        summary, _, details = (stage.__doc__ or name).strip().partition("\n\n")
        summary = " ".join(summary.split())
        p = commands.add_parser(name.replace("_", "-"), help=summary,
                                description=f"{summary}\n\n{_dedent(details)}".strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        _stage_options(p)
        if stage.reads_raw:
            add_config_options(p.add_argument_group("[read] options"), ReadConfig, "read")
        add_config_options(p.add_argument_group(f"[{name}] options"), config, name)

    p = commands.add_parser("pipeline", help="run a recipe's stages in one Spark application",
                            description="Run the stages of a TOML recipe (see recipes/demo.toml) and print the funnel.")
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--input", nargs="+", metavar="PATH", help="override [pipeline] input")
    p.add_argument("--output", metavar="DIR", help="override [pipeline] output")
    p.add_argument("--force", action="store_true", help="recompute every stage even if a finished output matches")
    p.add_argument("--until", metavar="STAGE",
                   help="stop after this stage (e.g. dedup_lines, to train a tokenizer on its output; a later "
                        "full run reuses the finished stages)")
    p.add_argument("--write-dropped", action="store_true", help="override [pipeline] write_dropped")
    p.add_argument("--no-fuse", action="store_true",
                   help="one Spark pass per stage (default: consecutive per-document stages share one pass)")
    p.add_argument("--keep-intermediate", action="store_true",
                   help="write every stage's docs/ (implies --no-fuse)")
    p.add_argument("--scale", default="paper",
                   help="the recipe at one of its scales: \"paper\" (as written, the default) or a [scale.<name>] "
                        "overlay such as \"tiny\" (recipes/<system>/curate.toml)")
    _overwrite_option(p)
    _set_option(p)
    p.add_argument("--master", help="Spark master for a local run (default local[*,4]: every core, 4 tries "
                                    "per task; local[N] never retries a failed task)")

    p = commands.add_parser("train-quality", help="train the fastText quality classifier (positives vs negatives)",
                            description="Train a fastText classifier of positive (e.g. pages referenced by "
                                        "Wikipedia) vs negative (random crawl) documents. Prints validation "
                                        "precision/recall; writes MODEL.bin and MODEL.bin.json.")
    p.add_argument("--positives", nargs="+", required=True, metavar="PATH", help="JSONL/Parquet files of good documents")
    p.add_argument("--negatives", nargs="+", required=True, metavar="PATH", help="JSONL/Parquet files of other documents")
    _trainer_options(p, "MODEL.bin", FastTextTrainConfig, FASTTEXT, label=None)

    p = commands.add_parser("train-domain", help="train a fastText multi-class classifier (domains or topics)",
                            description="Train a fastText classifier on labelled documents (a text and a label "
                                        "column), e.g. general/math/code, or topics for downsampling.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="JSONL/Parquet labelled documents")
    _trainer_options(p, "MODEL.bin", FastTextTrainConfig, FASTTEXT, label="column with the class")

    p = commands.add_parser("train-scorer", help="train a small transformers classifier/regressor on labelled docs",
                            description="Train a sequence regressor (quality scores a larger model gave) or "
                                        "classifier with transformers, from scratch (a tiny config and a local "
                                        "tokenizer) or from a local checkpoint. CPU works; a GPU is used if present.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="JSONL/Parquet labelled documents")
    _trainer_options(p, "DIR", ScorerTrainConfig, SCORER_TRAIN, label="column with the score or class")

    p = commands.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with tokenizers",
                            description="Byte-level BPE with EOS <|endoftext|> and the chat-format special tokens "
                                        "post-training needs; reads a bounded sample of documents on the driver.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="kiln stage directories, Parquet or JSONL files")
    _trainer_options(p, "DIR", TokenizerTrainConfig, TOKENIZER_TRAIN, label=None)

    p = commands.add_parser("sample", help="build the demo WARC from text on this machine",
                            description="Deterministically build the sample WARC used by `make demo`.")
    p.add_argument("--out", default="data/sample.warc.gz", help="output WARC path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", metavar="DIR", help="also write the demo's labelled sets and evaluation sets here")


def _trainer_options(p: argparse.ArgumentParser, output: str, config: type, section: str, label: str | None) -> None:
    """What every train-* command takes besides its inputs: the columns, the output and
    the trainer's config fields."""
    p.add_argument("--text-column", default="text", help="column with the document text")
    if label:
        p.add_argument("--label-column", default="label", help=label)
    p.add_argument("--output", required=True, metavar=output)
    add_config_options(p, config, section)


def _dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text)


def _stage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="input files, directories or globs (local paths or fsspec URLs)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="output directory: docs/ (Parquet), stats.json, dropped/ with --write-dropped")
    p.add_argument("--recipe", metavar="TOML", help="take this stage's settings from a recipe's sections")
    p.add_argument("--write-dropped", action="store_true",
                   help="also write dropped documents with their drop_reason to OUT/dropped/")
    _overwrite_option(p)
    _set_option(p)
    p.add_argument("--master", help="Spark master for a local run (default local[*,4]: every core, 4 tries per "
                                    "task; ignored under spark-submit)")


def _overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="write into an output directory that holds something else: another stage's output or "
                        "files kiln did not write (its docs/, dropped/ and stats.json are replaced)")


def _set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="set_values",
                   help="set any recipe key, e.g. langid.min_score=0.5 or filter.gopher_quality.min_doc_words=50 "
                        "(repeatable; the value is read as TOML)")


def recipe_for(args):
    """The recipe a command runs: the recipe file (or defaults), then --set, then the options."""
    from kiln.curation.pipeline import parse_recipe

    recipe_file = getattr(args, "recipe", None)
    data = apply_scale(load_toml(recipe_file), getattr(args, "scale", None), recipe_file) if recipe_file else {}
    data = merge(data, parse_set(args.set_values))
    data = merge(data, config_overrides(args))
    pipeline = dict(data.get("pipeline", {}))
    if args.input:
        pipeline["input"] = args.input
    if args.output:
        pipeline["output"] = args.output
    if args.write_dropped:
        pipeline["write_dropped"] = True
    if args.overwrite:
        pipeline["overwrite"] = True
    if args.stage == "pipeline":
        pipeline["resume"] = not args.force
        if args.no_fuse:
            pipeline["fuse"] = False
        if args.keep_intermediate:
            pipeline["keep_intermediate"] = True
    else:
        pipeline["stages"], pipeline["resume"] = [args.stage.replace("-", "_")], False
    recipe = parse_recipe({**data, "pipeline": pipeline}, where=recipe_file or "options")
    if args.stage == "pipeline" and args.until:
        stages = recipe.pipeline.stages
        if args.until not in stages:
            raise ConfigError(f"--until {args.until}: not a stage of this recipe ({', '.join(stages)})")
        recipe.pipeline.stages = stages[: stages.index(args.until) + 1]
    return recipe


def _train_config(cls, args, section: str):
    from kiln.config import from_dict

    return from_dict(cls, config_overrides(args).get(section, {}), f"kiln curate {args.stage}")


def train_model(args) -> int:
    """The train-* commands: driver-side, no Spark."""
    from kiln.curation.labelled import read_labelled

    if args.stage in ("train-quality", "train-domain"):
        from kiln.curation.classify import QUALITY_NEGATIVE, QUALITY_POSITIVE, train_fasttext

        cfg = _train_config(FastTextTrainConfig, args, FASTTEXT)
        if args.stage == "train-quality":
            data = read_labelled(args.positives, args.text_column, label=QUALITY_POSITIVE)
            data.extend(read_labelled(args.negatives, args.text_column, label=QUALITY_NEGATIVE))
            train_fasttext(data.texts, data.labels, args.output, cfg, kind="quality",
                           positive_label=QUALITY_POSITIVE, where=f"{args.positives[0]} + {args.negatives[0]}")
        else:
            data = read_labelled(args.input, args.text_column, args.label_column)
            train_fasttext(data.texts, data.labels, args.output, cfg, kind=args.label_column, where=args.input[0])
    elif args.stage == "train-scorer":
        from kiln.curation.scorer.model import train_scorer_from_files

        cfg = _train_config(ScorerTrainConfig, args, SCORER_TRAIN)
        train_scorer_from_files(args.input, args.text_column, args.label_column, cfg, args.output)
    elif args.stage == "train-tokenizer":
        from kiln.curation.tokenizer import iter_texts, train_tokenizer

        cfg = _train_config(TokenizerTrainConfig, args, TOKENIZER_TRAIN)
        train_tokenizer(iter_texts(args.input, args.text_column, cfg.max_chars), args.output,
                        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency)
    else:
        raise ConfigError(f"unknown command {args.stage}")
    return 0


def run(args) -> int:
    if args.stage == "sample":
        from kiln.demo import build_labels, build_sample

        print(f"wrote {args.out}: {build_sample(args.out, seed=args.seed)}")
        if args.labels:
            print(f"wrote {args.labels}: {build_labels(args.labels, seed=args.seed + 1)}")
        return 0
    if args.stage.startswith("train-"):
        return train_model(args)
    from kiln.curation import pipeline
    from kiln.curation.cluster import check_executors
    from kiln.curation.spark import get_spark

    recipe = recipe_for(args)
    stage_dirs = args.stage == "pipeline"
    planned = pipeline.plan(recipe, stage_dirs)  # inputs, outputs and models checked before Spark starts
    spark = get_spark(f"kiln-{args.stage}", args.master)
    check_executors(spark)  # a cluster's executors import kiln, or a ConfigError says how to ship it
    pipeline.run(spark, recipe, stage_dirs, planned=planned)
    return 0
