"""Chaining stages in one Spark application, from a TOML recipe or from the CLI.

    [pipeline]
    input = ["data/sample.warc.gz"]
    output = "out/demo"
    stages = ["extract", "langid", "filter"]
    write_dropped = true

    [read]      # ReadConfig     [extract]  # ExtractConfig
    [langid]    # LangIdConfig   [filter.gopher_quality] ...  # see kiln.curation.filters
    [dedup_url] # UrlDedupConfig [dedup_exact] # ExactDedupConfig
    [dedup_minhash] # MinHashConfig  [dedup_lines] # LineDedupConfig
    [quality]   # QualityConfig  [scorer] # ScorerConfig  [domain] # DomainConfig
    [decontam]  # DecontamConfig [tokenize] # TokenizeConfig (shards default to NN_tokenize/shards)

Each stage writes `OUT/NN_<stage>/{docs,dropped,stats.json}`; the run ends with the
funnel printed and saved as `OUT/funnel.json`. A relaunch reuses every stage whose
stats.json records the same input and settings (a fingerprint chained through the
stages) and recomputes from the first one that differs.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field

from kiln.config import ConfigError, from_dict, load_toml
from kiln.curation import paths, schema
from kiln.curation.classify import DomainConfig, DomainStage, QualityConfig, QualityStage
from kiln.curation.decontam import DecontamConfig, DecontamStage
from kiln.curation.dedup import (ExactDedupConfig, ExactDedupStage, LineDedupConfig, LineDedupStage,
                                 MinHashConfig, MinHashDedupStage, UrlDedupConfig, UrlDedupStage)
from kiln.curation.extract import ExtractConfig, ExtractStage
from kiln.curation.filters import FilterStage, filter_specs
from kiln.curation.langid import LangIdConfig, LangIdStage
from kiln.curation.readers import ReadConfig, read_raw
from kiln.curation.scorer import ScorerConfig, ScorerStage
from kiln.curation.stage import Stage, completed_stage, run_stage
from kiln.curation.stats import StageStats, format_funnel
from kiln.curation.tokenize import TokenizeConfig, TokenizeStage

STAGE_NAMES = ["extract", "langid", "filter", "dedup_url", "dedup_exact", "dedup_minhash", "dedup_lines",
               "quality", "scorer", "domain", "decontam", "tokenize"]
DEFAULT_STAGES = ["extract", "langid", "filter"]


@dataclass
class PipelineConfig:
    input: list[str] = field(default_factory=list)  # input files, directories or globs
    output: str = ""  # output directory; one subdirectory per stage
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))  # stages to run, in order
    write_dropped: bool = False  # also write dropped documents, with their reason, to NN_stage/dropped/
    resume: bool = True  # reuse finished stages whose input and settings match


@dataclass
class Recipe:
    pipeline: PipelineConfig
    read: ReadConfig
    extract: ExtractConfig
    langid: LangIdConfig
    filter: dict  # raw [filter] table, checked by filter_specs()
    dedup_url: UrlDedupConfig
    dedup_exact: ExactDedupConfig
    dedup_lines: LineDedupConfig
    dedup_minhash: MinHashConfig
    quality: QualityConfig
    scorer: ScorerConfig
    domain: DomainConfig
    decontam: DecontamConfig
    tokenize: TokenizeConfig


SECTIONS = ("pipeline", "read", "extract", "langid", "filter", "dedup_url", "dedup_exact", "dedup_minhash",
            "dedup_lines", "quality", "scorer", "domain", "decontam", "tokenize")
CONFIGS = {"read": ReadConfig, "extract": ExtractConfig, "langid": LangIdConfig, "dedup_url": UrlDedupConfig,
           "dedup_exact": ExactDedupConfig, "dedup_lines": LineDedupConfig, "dedup_minhash": MinHashConfig,
           "quality": QualityConfig, "scorer": ScorerConfig, "domain": DomainConfig,
           "decontam": DecontamConfig, "tokenize": TokenizeConfig}


def parse_recipe(data: dict, where: str = "recipe") -> Recipe:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section [{unknown[0]}] (known: {', '.join(SECTIONS)})")
    recipe = Recipe(
        pipeline=from_dict(PipelineConfig, data.get("pipeline", {}), f"{where}: [pipeline]"),
        filter=data.get("filter", {}),
        **{name: from_dict(cls, data.get(name, {}), f"{where}: [{name}]") for name, cls in CONFIGS.items()},
    )
    bad = [s for s in recipe.pipeline.stages if s not in STAGE_NAMES]
    if bad:
        raise ConfigError(f"{where}: [pipeline] stages: unknown stage {bad[0]!r} (known: {', '.join(STAGE_NAMES)})")
    try:
        filter_specs(recipe.filter)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    return recipe


def load_recipe(path: str) -> Recipe:
    return parse_recipe(load_toml(path), where=str(path))


# Stages built from their own recipe section (extract and filter need more).
STAGE_CLASSES = {"langid": LangIdStage, "dedup_url": UrlDedupStage, "dedup_exact": ExactDedupStage,
                 "dedup_lines": LineDedupStage, "dedup_minhash": MinHashDedupStage, "quality": QualityStage,
                 "scorer": ScorerStage, "domain": DomainStage, "decontam": DecontamStage,
                 "tokenize": TokenizeStage}


def build_stage(name: str, recipe: Recipe) -> Stage:
    if name == "extract":
        recipe.read.max_html_bytes = recipe.extract.max_html_bytes
        return ExtractStage(recipe.extract)
    if name == "filter":
        return FilterStage(filter_specs(recipe.filter))
    if name in STAGE_CLASSES:
        return STAGE_CLASSES[name](getattr(recipe, name))
    raise ConfigError(f"unknown stage {name!r}")


def read_documents(spark, inputs: list[str]):
    """A kiln document table: stage output directories (their docs/) or Parquet files."""
    df = spark.read.parquet(*paths.document_files(inputs))
    missing = schema.missing_columns(df.columns, [schema.ID, schema.TEXT])
    if missing:
        raise ConfigError(f"{inputs[0]}: not a kiln document table: missing column {missing[0]!r}")
    return df


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def run(spark, recipe: Recipe, stage_dirs: bool = True, log=None) -> list[StageStats]:
    """Run the recipe's stages; `stage_dirs=False` writes a single stage straight to `output`."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    cfg = recipe.pipeline
    if not cfg.input:
        raise ConfigError("no input: set [pipeline] input or pass --input")
    if not cfg.output:
        raise ConfigError("no output: set [pipeline] output or pass --output")
    if "tokenize" in cfg.stages and not recipe.tokenize.shards_dir:
        i = cfg.stages.index("tokenize")
        recipe.tokenize.shards_dir = paths.join(cfg.output, f"{i + 1:02d}_tokenize/shards" if stage_dirs else "shards")
    stages = [build_stage(name, recipe) for name in cfg.stages]  # fails before any Spark work
    first_is_extract = cfg.stages[0] == "extract"
    files = paths.expand_inputs(cfg.input)
    fingerprint = _fingerprint(*files, json.dumps(recipe.read.__dict__, sort_keys=True))
    all_stats: list[StageStats] = []
    df = None
    previous = None
    reusing = cfg.resume
    for i, stage in enumerate(stages):
        out_dir = paths.join(cfg.output, f"{i + 1:02d}_{stage.name}") if stage_dirs else cfg.output
        fingerprint = _fingerprint(fingerprint, stage.fingerprint())
        done = completed_stage(spark, out_dir, fingerprint) if reusing else None
        if done is not None and not stage.outputs_intact():
            log(f"[{stage.name}] finished output in {out_dir} has lost its side outputs: recomputing")
            done = None
        if done is not None:
            log(f"[{stage.name}] reusing finished output in {out_dir}")
            result = done
        else:
            reusing = False  # everything after a recomputed stage is recomputed too
            if df is None:
                df = read_raw(spark, cfg.input, recipe.read) if first_is_extract and i == 0 else read_documents(spark, cfg.input)
            result = run_stage(spark, stage, df, out_dir, cfg.write_dropped, fingerprint, log)
        all_stats.append(result.stats)
        if previous is not None:
            previous.unpersist()
        previous = result
        df = result.kept
    if previous is not None:
        previous.unpersist()
    funnel = format_funnel(all_stats)
    print(funnel, flush=True)
    if stage_dirs:
        paths.write_text(paths.join(cfg.output, "funnel.json"),
                         json.dumps([json.loads(s.to_json()) for s in all_stats], indent=2))
    return all_stats
