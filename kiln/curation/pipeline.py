"""Chaining stages in one Spark application, from a TOML recipe or from the CLI.

    [pipeline]
    input = ["data/sample.warc.gz"]
    output = "out/demo"
    stages = ["extract", "langid", "filter"]
    write_dropped = true

    [read]                      # ReadConfig: how raw pages are read (the extract stage's input)
    [extract] [langid] ...      # one table per stage of kiln.curation.registry, its config's fields
    [filter.gopher_quality] ... # see kiln.curation.filters
    [tokenize]                  # shards default to NN_tokenize/shards

Each stage writes `OUT/NN_<stage>/{docs,dropped,stats.json}`; the run ends with the
funnel printed and saved as `OUT/funnel.json`. A relaunch reuses every stage whose
stats.json records the same input and settings (a fingerprint chained through the
stages) and recomputes from the first one that differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from kiln.config import ConfigError, from_dict, load_toml
from kiln.curation import paths
from kiln.curation.readers import ReadConfig, read_raw
from kiln.curation.registry import STAGES
from kiln.curation.stage import Stage, check_output, completed_stage, run_stage
from kiln.formats import schema
from kiln.formats.stats import StageStats, format_funnel

DEFAULT_STAGES = ["extract", "langid", "filter"]


@dataclass
class PipelineConfig:
    input: list[str] = field(default_factory=list)  # input files, directories or globs
    output: str = ""  # output directory; one subdirectory per stage
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))  # stages to run, in order
    write_dropped: bool = False  # also write dropped documents, with their reason, to NN_stage/dropped/
    resume: bool = True  # reuse finished stages whose input and settings match
    overwrite: bool = False  # write into output directories that hold something else (their kiln outputs are replaced)


@dataclass
class CurationRecipe:
    pipeline: PipelineConfig
    read: ReadConfig
    stages: dict[str, Any]  # every registered stage's section -> its config (defaults where the recipe is silent)


SECTIONS = ("pipeline", "read", *STAGES)


def parse_recipe(data: dict, where: str = "recipe") -> CurationRecipe:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section [{unknown[0]}] (known: {', '.join(SECTIONS)})")
    recipe = CurationRecipe(
        pipeline=from_dict(PipelineConfig, data.get("pipeline", {}), f"{where}: [pipeline]"),
        read=from_dict(ReadConfig, data.get("read", {}), f"{where}: [read]"),
        stages={name: from_dict(cfg, data.get(name, {}), f"{where}: [{name}]") for name, (cfg, _) in STAGES.items()},
    )
    bad = [s for s in recipe.pipeline.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"{where}: [pipeline] stages: unknown stage {bad[0]!r} (known: {', '.join(STAGES)})")
    return recipe


def load_recipe(path: str) -> CurationRecipe:
    return parse_recipe(load_toml(path), where=str(path))


def build_stage(name: str, cfg: Any) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r} (known: {', '.join(STAGES)})")
    return STAGES[name][1](cfg)


def read_documents(spark, inputs: list[str]):
    """A kiln document table: stage output directories (their docs/) or Parquet files."""
    df = spark.read.parquet(*paths.document_files(inputs))
    missing = schema.missing_columns(df.columns, [schema.ID, schema.TEXT])
    if missing:
        raise ConfigError(f"{inputs[0]}: not a kiln document table: missing column {missing[0]!r}")
    return df


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass
class Plan:
    """What a run will do, settled before Spark starts: the stages built from their
    configs, where each writes, and the input files."""

    stages: list[Stage]
    out_dirs: list[str]
    files: list[str]


def plan(recipe: CurationRecipe, stage_dirs: bool = True) -> Plan:
    """Check the recipe against the filesystem without starting Spark: inputs exist,
    input and output do not contain each other, every stage's output directory is its
    own (or --overwrite), and every stage can be built (models and word lists found)."""
    cfg = recipe.pipeline
    if not cfg.input:
        raise ConfigError("no input: set [pipeline] input or pass --input")
    if not cfg.output:
        raise ConfigError("no output: set [pipeline] output or pass --output")
    files = paths.expand_inputs(cfg.input)
    for given in [*cfg.input, *files]:
        if paths.contains(given, cfg.output) or paths.contains(cfg.output, given):
            raise ConfigError(f"input {given} and output {cfg.output} contain one another: a stage would "
                              "overwrite what it reads; choose an output outside the input")
    names = cfg.stages
    out_dirs = [paths.join(cfg.output, f"{i + 1:02d}_{name}") if stage_dirs else cfg.output
                for i, name in enumerate(names)]
    for name, out_dir in zip(names, out_dirs):
        check_output(out_dir, name, cfg.overwrite)
    configs = dict(recipe.stages)
    if "tokenize" in names and not configs["tokenize"].shards_dir:
        configs["tokenize"] = dataclasses.replace(
            configs["tokenize"], shards_dir=paths.join(out_dirs[names.index("tokenize")], "shards"))
    return Plan(stages=[build_stage(name, configs[name]) for name in names], out_dirs=out_dirs, files=files)


def run(spark, recipe: CurationRecipe, stage_dirs: bool = True, log=None, planned: Plan | None = None
        ) -> list[StageStats]:
    """Run the recipe's stages; `stage_dirs=False` writes a single stage straight to `output`."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    cfg = recipe.pipeline
    planned = planned or plan(recipe, stage_dirs)
    fingerprint = _fingerprint(*planned.files, json.dumps(recipe.read.__dict__, sort_keys=True))
    all_stats: list[StageStats] = []
    df = None
    previous = None
    reusing = cfg.resume
    for i, (stage, out_dir) in enumerate(zip(planned.stages, planned.out_dirs)):
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
                df = read_raw(spark, cfg.input, recipe.read) if stage.reads_raw and i == 0 else read_documents(spark, cfg.input)
            result = run_stage(spark, stage, df, out_dir, cfg.write_dropped, fingerprint, log, cfg.overwrite)
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
