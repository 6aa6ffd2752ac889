"""`kiln probe run PROBE.toml`: plan, then anneal every arm over every seed, then judge.

The plan settles everything before any training, so a bad input fails in seconds with
its file and reason: the shards and the default mixture, the eval sets (every line), the
base's tokenizer against the shards', every candidate (documents are tokenized here,
shards checked for the base's tokenizer) and whether it holds the tokens an arm needs.

Then, per seed, a control arm (the default mixture alone) and one arm per candidate
(`ratio` of the sequences from the candidate, the rest the default mixture), each a
one-stage recipe of the ordinary trainer: from the base's weights, the LR from the
base's value linearly to 0, no warmup, checkpoints and resume as any run. The same
seed gives every arm of it the same default-mix stream (the sampler's blend draws
apart from it), so the differences are paired. Each arm lives in
`ARMS/s<seed>-<key>/`, the key a hash of everything that decides its numbers (base
weights and LR, shards, default mixture, candidate data, ratio, tokens, batch, seed,
optimizer, precision): a relaunch, or another probe sharing ARMS, skips what is done
and resumes what was cut short. After training, the arm's export is evaluated once
(`eval.json` beside it, keyed by the eval sets' contents).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field

from kiln.config import ConfigError
from kiln.formats.hashing import content_sha256
from kiln.formats.mixture import Mixture
from kiln.formats.probe import CONTROL, RESULTS_FILE, VERDICT_FILE, write_results, write_verdict
from kiln.probe import base as bases
from kiln.probe import candidates as cands
from kiln.probe import evals
from kiln.probe.config import Probe
from kiln.probe.report import PLOT_FILE, format_table, plot
from kiln.probe.verdict import judge

ARM_FORMAT = "kiln-probe-arm-v1"
ARM_INFO, EVAL_FILE = "arm.json", "eval.json"
ARM_STAGE = "anneal"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class ProbeOptions:
    stop_after_steps: int = 0  # end the first arm this launch trains after this many steps, as a kill would; 0 = never
    log: object = _log


@dataclass
class Plan:
    """What the probe will do, every input checked."""

    probe: Probe
    default: Mixture
    source: object  # TokenSource of the probe's shards (the val: metrics read its held-out documents)
    sets: list  # loaded eval sets
    metrics: list[str]
    primary: str
    tokenizer_dir: str
    candidates: list[cands.Candidate]
    epochs: dict[str, float]  # candidate -> epochs of it an arm reads
    base: bases.Base | None  # None until a base_recipe has run
    shards_key: str = ""
    notes: list[str] = field(default_factory=list)


def plan(probe: Probe, log=_log) -> Plan:
    from kiln.training.data import TOKENIZER_FILE, TokenSource

    p = probe.probe
    source = TokenSource(p.shards, p.val_fraction)
    default = probe.default_mixture()
    source.check_mixture(default)
    sets = [evals.load(e) for e in probe.evals]
    for s in sets:
        if isinstance(s, evals.TextSet) and s.skipped_empty:
            log(f"[probe] eval {s.name}: {s.skipped_empty} empty text(s) of {s.path} left out")
    metrics = []
    for domain in source.domains:
        try:
            next(iter(source.val_batches(domain, p.seq_len, p.eval_batch_size, max_batches=1)))
            metrics.append(f"val:{domain}")
        except ConfigError as e:
            log(f"[probe] no val:{domain} metric: {e}")
    for s in sets:
        metrics.extend(s.metrics())
    primary = _primary(probe, sets, default, metrics)
    if p.base_recipe:
        tokenizer_dir = bases.recipe_tokenizer(p.base_recipe, p.tokenizer)
        base = None
    else:
        kind = bases.describe_base(p.base)
        tokenizer_dir = bases.tokenizer_of(p.base, kind, p.tokenizer)
        base = None  # resolved after the candidates: a checkpoint base is exported, which is slower than checks
    source.check_tokenizer(os.path.join(tokenizer_dir, TOKENIZER_FILE), f"{probe.path}: the base's tokenizer")
    prepared = [cands.prepare(c, source.domains, tokenizer_dir, source.tokenizer_hash, p.output, log)
                for c in probe.candidates]
    needed = math.ceil(p.ratio * p.tokens * (p.seq_len + 1) / p.seq_len)
    epochs = {}
    for c in prepared:
        view = TokenSource(p.shards, p.val_fraction, extra=c.extra) if c.extra else source
        epochs[c.name] = cands.check_tokens(c.name, view.domain(c.domain).train.tokens, needed, p.max_epochs)
    if p.base:
        base = bases.resolve(p.base, p.output, p.lr, p.tokenizer, log)
        _check_base(base, source, p.base)
    return Plan(probe, default, source, sets, metrics, primary, tokenizer_dir, prepared, epochs, base,
                shards_key=cands.shards_digest(p.shards))


def _primary(probe: Probe, sets: list, default: Mixture, metrics: list[str]) -> str:
    p = probe.probe
    primary = p.primary
    if not primary:
        if sets:
            primary = sets[0].metrics()[-1]  # a text set's bits per byte, a choice set's p_correct
        else:
            primary = f"val:{max(default.active().items(), key=lambda kv: kv[1])[0]}"
    elif primary.startswith("eval:") and primary not in metrics and f"{primary}:p_correct" in metrics:
        primary = f"{primary}:p_correct"
    if primary not in metrics:
        raise ConfigError(f"{probe.path}: [probe] primary {primary!r} is not measured (metrics: {', '.join(metrics)})")
    return primary


def _check_base(base: bases.Base, source, where: str) -> None:
    if base.model.vocab_size < source.vocab_size:
        raise ConfigError(f"{where}: the base's vocabulary has {base.model.vocab_size} tokens, the shards' tokenizer "
                          f"{source.vocab_size}")


# --------------------------------------------------------------------------- the arms


@dataclass
class Arm:
    name: str  # "control" or the candidate's name
    seed: int
    candidate: cands.Candidate | None
    dir: str
    key: str


def arms(planned: Plan) -> list[Arm]:
    """Every arm, seed by seed: the control, then each candidate."""
    p = planned.probe.probe
    root = p.arms or default_arms(p.output)
    out = []
    for seed in planned.probe.seed_list:
        for c in [None, *planned.candidates]:
            key = arm_key(planned, c, seed)
            out.append(Arm(c.name if c else CONTROL, seed, c, os.path.join(root, f"s{seed}-{key}"), key))
    return out


def default_arms(output: str) -> str:
    """`arms/` beside the probe's output: probes whose outputs share a parent directory
    (out/probe/a, out/probe/b) share their arms, so nothing they have in common trains twice."""
    return os.path.join(os.path.dirname(os.path.abspath(output)), "arms")


def arm_key(planned: Plan, c: cands.Candidate | None, seed: int) -> str:
    p, base, probe = planned.probe.probe, planned.base, planned.probe
    spec = {"format": ARM_FORMAT, "base": base.digest, "lr": base.lr, "shards": planned.shards_key,
            "default": planned.default.active(), "candidate": c.key if c else None,
            "ratio": p.ratio if c else None, "tokens": p.tokens, "seq_len": p.seq_len, "batch_size": p.batch_size,
            "micro_batch_size": p.micro_batch_size, "seed": seed, "val_fraction": p.val_fraction,
            "checkpoint_every": p.checkpoint_every, "optimizer": dataclasses.asdict(base.optimizer),
            "parallel": dataclasses.asdict(probe.parallel), "kernels": dataclasses.asdict(probe.kernels)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def arm_recipe(planned: Plan, arm: Arm):
    """The arm as a one-stage training recipe: the anneal."""
    from kiln.training.recipe import Recipe, RunConfig, StageConfig

    p, base = planned.probe.probe, planned.base
    steps = max(1, p.tokens // (p.batch_size * p.seq_len))
    c = arm.candidate
    stage = StageConfig(name=ARM_STAGE, weights=planned.default.active(), blend={c.domain: 1.0} if c else {},
                        blend_ratio=p.ratio if c else 0.0, tokens=p.tokens, seq_len=p.seq_len,
                        batch_size=p.batch_size, micro_batch_size=p.micro_batch_size, lr=base.lr, schedule="linear",
                        warmup=0.0, checkpoint_every=p.checkpoint_every or max(1, steps // 2), keep_checkpoints=1,
                        eval_every=steps + 1, eval_batches=1)
    run = RunConfig(output=arm.dir, shards=p.shards, tokenizer=base.tokenizer_dir, init=base.model_dir,
                    extra_shards=dict(c.extra) if c else {}, seed=arm.seed, val_fraction=p.val_fraction,
                    log_every=max(1, steps // 4))
    return Recipe(run=run, model=dataclasses.replace(base.model), parallel=planned.probe.parallel,
                  optimizer=base.optimizer, kernels=planned.probe.kernels, stages=[stage],
                  path=f"probe arm {arm.name} seed {arm.seed}")


def evals_key(planned: Plan) -> str:
    p = planned.probe.probe
    spec = {"evals": [dataclasses.asdict(e) for e in planned.probe.evals],
            "files": [content_sha256(e.text or e.choices) if os.path.isfile(e.text or e.choices) else e.text or e.choices
                      for e in planned.probe.evals],
            "seq_len": p.seq_len, "eval_batches": p.eval_batches, "eval_batch_size": p.eval_batch_size,
            "val_fraction": p.val_fraction, "shards": planned.shards_key}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the run


def run(probe: Probe, options: ProbeOptions | None = None) -> dict | None:
    """Plan, train and evaluate every arm, judge; returns verdict.json's content, or
    None when `options.stop_after_steps` stopped an arm (a relaunch resumes it)."""
    from kiln.training.distributed import barrier, init_distributed
    from kiln.training.train import RunOptions, stage_paths, train

    options = options or ProbeOptions()
    world = init_distributed()
    log = options.log if world.main else (lambda m: None)
    p = probe.probe
    planned = _first_on_rank0(world, lambda: plan(probe, log))
    stop = options.stop_after_steps
    if planned.base is None:
        path = bases.train_base_recipe(p.base_recipe, p.base_stage, p.base_step, log, RunOptions(stop_after_steps=stop))
        if path is None:
            log("[probe] stopped while training the base; a relaunch resumes it")
            return None
        base = _first_on_rank0(world, lambda: bases.resolve(path, p.output, p.lr, p.tokenizer, log))
        _check_base(base, planned.source, p.base_recipe)
        planned.base = base
    base = planned.base
    log(f"[probe] base {base.described}; anneals start at lr {base.lr:.3g} ({base.lr_source}), linearly to 0")
    todo = arms(planned)
    log(f"[probe] {len(todo)} arms: {len(planned.candidates)} candidate(s) and the control x {p.seeds} seed(s), "
        f"{p.tokens:,} tokens each, ratio {p.ratio}; primary metric {planned.primary}")
    rows: list[dict] = []
    ekey = evals_key(planned)
    for n, arm in enumerate(todo, 1):
        recipe = arm_recipe(planned, arm)
        finished = os.path.exists(stage_paths(recipe, 0).done)
        log(f"[probe] arm {n}/{len(todo)}: {arm.name} seed {arm.seed} -> {arm.dir}"
            + (" (finished earlier)" if finished else ""))
        if world.main:
            _write_arm_info(planned, arm)
        if not finished:
            summaries = train(recipe, RunOptions(stop_after_steps=stop))
            if not summaries:
                log(f"[probe] stopped during arm {arm.name} seed {arm.seed}; a relaunch resumes it")
                return None
            stop = 0  # the stop stands for one kill, in the first arm this launch trains
        final = stage_paths(recipe, 0).final
        metrics = _first_on_rank0(world, lambda a=arm, f=final: _evaluate(planned, a, f, ekey, world))
        rows.append({"arm": arm.name, "seed": arm.seed, **{m: metrics.get(m) for m in planned.metrics}})
        if world.main:
            write_results(os.path.join(p.output, RESULTS_FILE), rows)
    verdict = judge(rows, planned.metrics, planned.primary)
    verdict.update({"base": base.described, "lr": base.lr, "ratio": p.ratio, "tokens": p.tokens,
                    "seeds": planned.probe.seed_list,
                    "candidates_data": {c.name: c.described for c in planned.candidates},
                    "arms": {f"{a.name}/s{a.seed}": a.dir for a in todo}})
    if world.main:
        write_verdict(os.path.join(p.output, VERDICT_FILE), verdict)
        print(format_table(verdict), flush=True)
        plot(verdict, os.path.join(p.output, PLOT_FILE))
        log(f"[probe] wrote {os.path.join(p.output, RESULTS_FILE)}, {VERDICT_FILE} and {PLOT_FILE}")
    barrier(world)
    return verdict


def _first_on_rank0(world, fn):
    """Rank 0 does `fn` first (it may tokenize, export or evaluate, and caches what it
    does); the other ranks then do it too, finding the cache."""
    from kiln.training.distributed import barrier

    out = fn() if world.main else None
    barrier(world)
    return out if world.main else fn()


def _write_arm_info(planned: Plan, arm: Arm) -> None:
    os.makedirs(arm.dir, exist_ok=True)
    info = {"format": ARM_FORMAT, "arm": arm.name, "seed": arm.seed, "key": arm.key,
            "base": planned.base.described, "lr": planned.base.lr,
            "candidate": arm.candidate.described if arm.candidate else None,
            "ratio": planned.probe.probe.ratio if arm.candidate else None}
    with open(os.path.join(arm.dir, ARM_INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


def _evaluate(planned: Plan, arm: Arm, model_dir: str, key: str, world) -> dict:
    path = os.path.join(arm.dir, EVAL_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved["metrics"]
    p = planned.probe.probe
    metrics = evals.evaluate(model_dir, planned.sets, planned.source, p.seq_len, p.eval_batches, p.eval_batch_size,
                             world.device)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"key": key, "metrics": metrics}, f, indent=2)
    os.replace(tmp, path)
    return metrics
