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

Consecutive per-document stages are fused (kiln.curation.fused): one read and one
write for the group, every stage still with its own stats.json and dropped/, only the
group's last stage with docs/. `fuse = false` or `keep_intermediate = true` runs one
pass per stage; `--until STAGE` ends the run (and its group) at STAGE, which writes docs/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from kiln.config import ConfigError, from_dict, load_toml
from kiln.curation import fused, paths
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
    fuse: bool = True  # run consecutive per-document stages in one Spark pass (kiln.curation.fused); false = one pass per stage
    fuse_groups: list[list[str]] = field(default_factory=list)  # explicit groups to fuse (else every run of fusable stages)
    keep_intermediate: bool = False  # write every stage's docs/ (no fusing): for inspecting intermediate tables


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
    groups: list[list[int]] = field(default_factory=list)  # stage indices that share one pass


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
    stages = [build_stage(name, configs[name]) for name in names]
    if not (stage_dirs and cfg.fuse and not cfg.keep_intermediate):
        grouping = [[i] for i in range(len(stages))]
    elif cfg.fuse_groups:
        grouping = fused.explicit_groups(stages, cfg.fuse_groups, "[pipeline]")
    else:
        grouping = fused.groups(stages)
    return Plan(stages=stages, out_dirs=out_dirs, files=files, groups=grouping)


def _reusable(spark, stages: list[Stage], dirs: list[str], fingerprints: list[str], log) -> list | None:
    """The results of a group finished earlier with these settings: every stage's
    stats.json matches and the last stage's docs/ is there (a group is reused whole)."""
    results = []
    for k, (stage, out_dir, fp) in enumerate(zip(stages, dirs, fingerprints)):
        last = k == len(stages) - 1
        done = completed_stage(spark, out_dir, fp) if last else _stats_match(out_dir, fp)
        if done is not None and not stage.outputs_intact():
            log(f"[{stage.name}] finished output in {out_dir} has lost its side outputs: recomputing")
            done = None
        if done is None:
            return None
        results.append(done)
    return results


def _stats_match(out_dir: str, fingerprint: str):
    from kiln.curation.stage import STATS_FILE, StageResult

    path = paths.join(out_dir, STATS_FILE)
    if not paths.exists(path):
        return None
    stats = StageStats.from_json(paths.read_text(path))
    return StageResult(kept=None, stats=stats) if stats.extra.get("fingerprint") == fingerprint else None


def run(spark, recipe: CurationRecipe, stage_dirs: bool = True, log=None, planned: Plan | None = None
        ) -> list[StageStats]:
    """Run the recipe's stages; `stage_dirs=False` writes a single stage straight to `output`."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    cfg = recipe.pipeline
    planned = planned or plan(recipe, stage_dirs)
    fingerprint = _fingerprint(*planned.files, json.dumps(recipe.read.__dict__, sort_keys=True))
    fingerprints = []
    for stage in planned.stages:
        fingerprint = _fingerprint(fingerprint, stage.fingerprint())
        fingerprints.append(fingerprint)
    all_stats: list[StageStats] = []
    df = None
    previous: list = []
    reusing = cfg.resume
    for group in planned.groups or [[i] for i in range(len(planned.stages))]:
        stages = [planned.stages[i] for i in group]
        dirs = [planned.out_dirs[i] for i in group]
        fps = [fingerprints[i] for i in group]
        done = _reusable(spark, stages, dirs, fps, log) if reusing else None
        if done is not None:
            for stage, out_dir in zip(stages, dirs):
                log(f"[{stage.name}] reusing finished output in {out_dir}")
            results = done
        else:
            reusing = False  # everything after a recomputed stage is recomputed too
            if df is None:
                df = read_raw(spark, cfg.input, recipe.read) if stages[0].reads_raw and group[0] == 0 \
                    else read_documents(spark, cfg.input)
            if len(stages) == 1:
                results = [run_stage(spark, stages[0], df, dirs[0], cfg.write_dropped, fps[0], log, cfg.overwrite)]
            else:
                results = fused.run_group(spark, stages, df, dirs, cfg.write_dropped, fps, log, cfg.overwrite)
        all_stats += [r.stats for r in results]
        for r in previous:
            r.unpersist()
        previous = results
        df = results[-1].kept
    for r in previous:
        r.unpersist()
    funnel = format_funnel(all_stats)
    print(funnel, flush=True)
    if stage_dirs:
        paths.write_text(paths.join(cfg.output, "funnel.json"),
                         json.dumps([json.loads(s.to_json()) for s in all_stats], indent=2))
    return all_stats
