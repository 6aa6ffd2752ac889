"""The probe file: `[probe]`, `[[candidate]]` and `[[eval]]` tables, every key checked.

    [probe]
    output = "out/probe/demo"
    base = "out/train/base/01_core/final"   # or base_recipe = "recipes/probe_base.toml" (+ base_stage, base_step)
    shards = "out/demo/12_tokenize/shards"
    default = { general = 0.6, multilingual = 0.3, math = 0.1 }   # or default_mixture = "mix.toml"
    ratio = 0.3
    tokens = 100_000
    primary = "eval:web"

    [[candidate]]
    name = "math"
    domain = "math"            # or shards = "DIR", or documents = "PATH" (+ text_column = "text")

    [[eval]]
    name = "web"
    text = "evals/web.jsonl"   # or choices = "mc.jsonl"

Relative paths are relative to the probe file. `[parallel]` and `[kernels]` tables, as
in a training recipe, apply to every arm.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from kiln.config import ConfigError, from_dict, load_toml
from kiln.formats.mixture import Mixture, load_mixture
from kiln.kernels import KernelsConfig
from kiln.training.parallelize import ParallelConfig

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # candidate and eval names: they name directories and columns


@dataclass
class ProbeConfig:
    output: str = ""  # results.csv, verdict.json and the plot (and base/ and candidates/: exports and tokenized data)
    base: str = ""  # the model annealed: an exported stage (NN_<stage>/final) or a checkpoint (checkpoints/step-N)
    base_recipe: str = ""  # or a training recipe run first (a rerun reuses it); its base_stage's export is the base
    base_stage: str = ""  # base_recipe's stage whose end is the base ("" = the last stage)
    base_step: int = 0  # with base_recipe: that stage's checkpoint at this step instead of its export (0 = export)
    lr: float = 0.0  # the LR each anneal starts from, going linearly to 0; 0 = the base's own LR where it stopped
    shards: str = ""  # the token shards of the default mixture (and of domain candidates)
    default: dict = field(default_factory=dict)  # the default mixture inline: {general = 0.7, code = 0.3}
    default_mixture: str = ""  # or a contract-4 mixture file
    ratio: float = 0.3  # share of each candidate arm's sequences from the candidate (Llama 3: 0.3; OLMo 2 microanneal: 0.5)
    tokens: int = 100_000  # tokens per anneal (every arm, control included)
    seq_len: int = 128  # tokens per sequence
    batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 0  # sequences per forward on one rank (0 = batch_size / ranks)
    seeds: int = 3  # paired seeds: every arm runs once per seed
    seed: int = 0  # the first seed; the seeds are seed, seed + 1, ...
    primary: str = ""  # the metric candidates are ranked on: "eval:NAME" or "val:DOMAIN" ("" = the first eval set's)
    max_epochs: float = 1.0  # a candidate may be read this many times over in one arm at most
    val_fraction: float = 0.01  # held-out share of each domain's documents (the val: metrics); must match across probes to reuse arms
    eval_batches: int = 32  # held-out batches per domain for the val: metrics (0 = every held-out window)
    eval_batch_size: int = 8  # sequences per forward when evaluating
    checkpoint_every: int = 0  # steps between an arm's checkpoints (0 = half-way and at the end)
    arms: str = ""  # directory of the arms' runs ("" = arms/ beside OUTPUT); probes sharing it reuse each other's arms
    tokenizer: str = ""  # tokenizer directory ("" = the base's own tokenizer.json)


@dataclass
class CandidateConfig:
    name: str = ""  # the arm's name in results.csv and verdict.json
    domain: str = ""  # a domain of [probe] shards
    shards: str = ""  # or a token shards directory (kiln curate tokenize) of the base's tokenizer
    documents: list[str] = field(default_factory=list)  # or documents: JSONL / Parquet files or a kiln stage directory
    text_column: str = "text"  # the documents' text column (JSONL / Parquet files)

    def source(self) -> str:
        return "domain" if self.domain else "shards" if self.shards else "documents"


@dataclass
class EvalConfig:
    name: str = ""  # metrics are eval:NAME (text) or eval:NAME:accuracy and eval:NAME:p_correct (choices)
    text: str = ""  # JSONL or Parquet of texts: bits per byte over them
    choices: str = ""  # or multiple-choice JSONL: {"context": ..., "choices": [...], "answer": index}
    text_column: str = "text"  # the texts' column
    separator: str = " "  # put between a context and each choice
    max_items: int = 0  # read at most this many texts / questions (0 = all)


@dataclass
class Probe:
    probe: ProbeConfig
    candidates: list[CandidateConfig]
    evals: list[EvalConfig]
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    path: str = ""

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.probe.seed, self.probe.seed + self.probe.seeds))

    def default_mixture(self) -> Mixture:
        p = self.probe
        if p.default:
            return Mixture.from_dict({"mixture": p.default}, path=f"{self.path}: [probe] default")
        return load_mixture(p.default_mixture)


def parse(data: dict, where: str = "probe", base_dir: str = "") -> Probe:
    known = {"probe", "candidate", "eval", "parallel", "kernels"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown section [{unknown[0]}] (known: {', '.join(sorted(known))})")
    for key in ("candidate", "eval"):
        if not isinstance(data.get(key, []), list):
            raise ConfigError(f"{where}: [{key}] must be an array of tables: write [[{key}]]")
    candidates_raw = data.get("candidate", [])
    for c in candidates_raw:  # one path or several
        if isinstance(c, dict) and isinstance(c.get("documents"), str):
            c["documents"] = [c["documents"]]
    probe = Probe(
        probe=from_dict(ProbeConfig, data.get("probe", {}), f"{where}: [probe]"),
        candidates=[from_dict(CandidateConfig, c, f"{where}: [[candidate]] #{i + 1}") for i, c in enumerate(candidates_raw)],
        evals=[from_dict(EvalConfig, e, f"{where}: [[eval]] #{i + 1}") for i, e in enumerate(data.get("eval", []))],
        parallel=from_dict(ParallelConfig, data.get("parallel", {}), f"{where}: [parallel]"),
        kernels=from_dict(KernelsConfig, data.get("kernels", {}), f"{where}: [kernels]"),
        path=where,
    )
    _resolve_paths(probe, base_dir)
    check(probe)
    return probe


def load(path: str) -> Probe:
    return parse(load_toml(path), where=str(path), base_dir=os.path.dirname(os.path.abspath(path)))


def _resolve_paths(probe: Probe, base_dir: str) -> None:
    """Paths in the file are relative to it (as a recipe's mixture file is)."""
    def at(path: str) -> str:
        return path if not path or not base_dir or os.path.isabs(path) or os.path.exists(path) \
            else os.path.join(base_dir, path)

    p = probe.probe
    for key in ("base", "base_recipe", "shards", "default_mixture", "tokenizer"):
        setattr(p, key, at(getattr(p, key)))
    for c in probe.candidates:
        c.shards = at(c.shards)
        c.documents = [at(d) for d in c.documents]
    for e in probe.evals:
        e.text, e.choices = at(e.text), at(e.choices)


def check(probe: Probe) -> None:
    """The file's own consistency, before anything is read: each key's range, one source
    per candidate and eval set, unique names. (What the files hold is checked next, by
    the runner's plan, still before any training.)"""
    p, where = probe.probe, f"{probe.path}: [probe]"
    for key in ("output", "shards"):
        if not getattr(p, key):
            raise ConfigError(f"{where} {key} is not set")
    if bool(p.base) == bool(p.base_recipe):
        raise ConfigError(f"{where}: give either base (a model export or checkpoint) or base_recipe (a training "
                          f"recipe run first), not {'both' if p.base else 'neither'}")
    if (p.base_stage or p.base_step) and not p.base_recipe:
        raise ConfigError(f"{where}: base_stage and base_step choose within base_recipe; with base, point it at the "
                          "stage's final/ or the checkpoints/step-N directory itself")
    if bool(p.default) == bool(p.default_mixture):
        raise ConfigError(f"{where}: give either default (inline weights) or default_mixture (a file), not "
                          f"{'both' if p.default else 'neither'}")
    if not 0 < p.ratio < 1:
        raise ConfigError(f"{where} ratio: {p.ratio} is not in (0, 1): the share of a candidate arm's data that is "
                          "the candidate (0.3 as Llama 3; 0.5 as OLMo 2's microanneal)")
    for key in ("tokens", "seq_len", "batch_size", "seeds", "eval_batch_size"):
        if getattr(p, key) < 1:
            raise ConfigError(f"{where} {key}: must be at least 1, got {getattr(p, key)}")
    if p.max_epochs <= 0:
        raise ConfigError(f"{where} max_epochs: must be > 0, got {p.max_epochs}")
    if not probe.candidates:
        raise ConfigError(f"{probe.path}: no [[candidate]] tables: a probe compares at least one candidate with "
                          "the control")
    names = {"control"}
    for i, c in enumerate(probe.candidates):
        at = f"{probe.path}: [[candidate]] {c.name or '#' + str(i + 1)}"
        _check_name(c.name, names, at)
        given = [k for k in ("domain", "shards", "documents") if getattr(c, k)]
        if len(given) != 1:
            raise ConfigError(f"{at}: give exactly one of domain, shards or documents (got "
                              f"{', '.join(given) or 'none'})")
    eval_names: set[str] = set()
    for i, e in enumerate(probe.evals):
        at = f"{probe.path}: [[eval]] {e.name or '#' + str(i + 1)}"
        _check_name(e.name, eval_names, at)
        if bool(e.text) == bool(e.choices):
            raise ConfigError(f"{at}: give either text (texts: bits per byte) or choices (multiple choice), not "
                              f"{'both' if e.text else 'neither'}")
    if p.primary and not re.match(r"^(eval|val):.+", p.primary):
        raise ConfigError(f"{where} primary: {p.primary!r} is not eval:NAME[:accuracy|:p_correct] or val:DOMAIN")


def _check_name(name: str, taken: set[str], where: str) -> None:
    if not NAME.match(name or ""):
        raise ConfigError(f"{where}: name {name!r} must be letters, digits, '_', '.' or '-' (it names files and "
                          "columns)")
    if name in taken:
        raise ConfigError(f"{where}: name {name!r} is taken" + (" (by the control arm)" if name == "control" else ""))
    taken.add(name)
