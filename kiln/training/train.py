"""Staged pretraining: one linear loop per stage, its state written down.

Each stage of a recipe starts from the previous stage's exported weights (a fresh
optimizer, its own mixture, sequence length, batch size and LR schedule), trains for
its token budget, checkpoints as it goes, optionally averages its last checkpoints,
and exports `NN_<stage>/final/`, a Hugging Face model directory. A relaunch skips
finished stages and resumes an unfinished one from its newest complete checkpoint,
reproducing the uninterrupted run's losses.

Post-training stages (kind sft / reward / dpo, kiln.training.post) run in the same loop
with their own data, model and loss (`TrainingStage.forward`).

    kiln train recipes/tiny_train.toml
    torchrun --standalone --nproc_per_node=2 -m kiln.training recipes/tiny_train.toml

Read top to bottom: where a run writes (`stage_paths`), the run's options and state,
`train` (every stage), `train_stage` (one stage's loop), then the loop's steps in the
order they run: set up, resume, one training step, progress, validation, checkpoint,
average and export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass

import torch

from kiln.config import ConfigError
from kiln.formats.checkpoint import (CHECKPOINTS_DIR, FINAL_DIR, METRICS_FILE, RESOLVED_RECIPE, STAGE_SUMMARY,
                                    read_stage_summary)
from kiln.formats.mixture import Mixture, load_mixture
from kiln.training import checkpoint
from kiln.training.data import TOKENIZER_FILE, DataConfig, MixtureSampler, TokenSource
from kiln.training.distributed import World, all_reduce_mean, barrier, init_distributed
from kiln.training.metrics import (MetricsLogger, Throughput, eta, flops_per_token, peak_flops, peak_memory_gb,
                                  truncate_metrics)
from kiln.training.model import (CausalLM, ModelConfig, attention_width, build_model, num_params, resolve, save_hf,
                                 set_rope_theta)
from kiln.training.parallelize import autocast, parallelize
from kiln.training.recipe import POLICY_KINDS, Recipe, StageConfig, batch_size_at, lr_at, round_of
from kiln.training.validate import Validator

# --------------------------------------------------------------------------- where a run writes


@dataclass(frozen=True)
class StagePaths:
    """Where one stage of a run writes. The one place these names are made: `kiln mix
    run` finds its proxies' metrics and finished stages through it."""

    root: str  # <run.output>/NN_<stage name>

    @property
    def checkpoints(self) -> str:
        """step-NNNNNNNN/ directories (kiln.training.checkpoint)."""
        return os.path.join(self.root, CHECKPOINTS_DIR)

    @property
    def final(self) -> str:
        """The exported Hugging Face model directory: the next stage starts from it."""
        return os.path.join(self.root, FINAL_DIR)

    @property
    def done(self) -> str:
        """The stage's summary, written after its export: a stage is finished when this exists."""
        return os.path.join(self.final, STAGE_SUMMARY)

    @property
    def metrics(self) -> str:
        """One JSON record per step (train/..., perf/..., val/... keys)."""
        return os.path.join(self.root, METRICS_FILE)

    @property
    def resolved_recipe(self) -> str:
        return os.path.join(self.root, RESOLVED_RECIPE)

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.root, "tensorboard")


def stage_paths(recipe: Recipe, i: int) -> StagePaths:
    """The paths of stage `i` (0-based) of `recipe`: `<output>/01_core/`, `02_long/`, ..."""
    return StagePaths(os.path.join(recipe.run.output, f"{i + 1:02d}_{recipe.stages[i].name}"))


# --------------------------------------------------------------------------- options and state


@dataclass
class RunOptions:
    resume: bool = True  # continue an unfinished stage from its newest complete checkpoint
    stop_after_steps: int = 0  # end the run after this many optimizer steps (all stages), as a kill would; 0 = never


@dataclass
class Run:
    """What every stage of one run shares."""

    recipe: Recipe
    options: RunOptions
    world: World
    source: TokenSource | None  # the token shards, opened once (None: a post-training-only recipe)
    model_cfg: ModelConfig  # the recipe's [model] with its preset and vocabulary resolved
    tokenizer: str  # the [run] tokenizer's directory, checked against the shards ("" = none)
    log: MetricsLogger  # rank 0's progress lines
    steps_taken: int = 0  # optimizer steps taken by this process, over all stages

    def stopped(self) -> bool:
        return 0 < self.options.stop_after_steps <= self.steps_taken


@dataclass
class StageState:
    """The loop's state. A checkpoint saves step and tokens with the model, optimizer,
    sampler and RNG; resuming from it reproduces the uninterrupted run."""

    step: int = 0  # optimizer steps taken in this stage
    tokens: int = 0  # training tokens seen in this stage (the LR schedule and batch ramp follow them)
    last_saved: int = 0  # step of the newest checkpoint
    last_loss: float | None = None  # train loss of the latest step (the summary's final_loss)
    started: float = dataclasses.field(default_factory=time.time)  # for the ETA


@dataclass
class TrainingStage:
    """One stage, set up: its config and paths, and the objects its loop drives."""

    cfg: StageConfig
    paths: StagePaths
    mixture: Mixture | None  # pretraining stages' mixture
    micro: int  # sequences per forward on one rank (pairs, for reward and dpo stages)
    model: CausalLM
    optimizer: torch.optim.Optimizer
    sampler: MixtureSampler
    validator: Validator  # or a post-training stage's held-out measure (kiln.training.post.stages)
    resolved: dict  # the resolved config, saved beside the stage and in every checkpoint
    state: StageState
    metrics: MetricsLogger  # metrics.jsonl (and TensorBoard)
    meter: Throughput
    forward: object = None  # (model, batch) -> (loss, metrics): how this kind's model takes a batch

    @property
    def name(self) -> str:
        return self.cfg.name


# --------------------------------------------------------------------------- the run


def train(recipe: Recipe, options: RunOptions | None = None) -> list[dict]:
    """Run every stage; returns one summary per finished stage (those finished by an
    earlier launch included). A run ended by `options.stop_after_steps` returns the
    summaries of the stages it finished."""
    run = start_run(recipe, options or RunOptions())
    summaries, policy = [], recipe.run.init
    round_policies: dict[int, str] = {}  # round k -> the policy it ended with (0: before the first)
    for i, stage_cfg in enumerate(recipe.stages):
        paths = stage_paths(recipe, i)
        policy = round_start(run, i, policy, round_policies)
        start = starting_point(recipe, i, policy)
        if os.path.exists(paths.done):
            run.log.print(f"[{stage_cfg.name}] finished earlier: {paths.final}")
            summary = read_stage_summary(paths.final)
        elif stage_cfg.kind == "rejection_sampling":
            summary = rejection_sampling_stage(run, i, start)
        else:
            summary = train_stage(run, i, start)
            if summary is None:  # stopped (stop_after_steps)
                break
        summaries.append(summary)
        if stage_cfg.kind in POLICY_KINDS:  # a reward model or a sampling stage is not the next policy
            policy = paths.final
        k = round_of(stage_cfg.name, recipe.rounds)
        if k and stage_cfg.name == f"{recipe.rounds.stages[-1]}_r{k}":
            round_policies[k] = policy  # the policy round k ended with
    else:
        if recipe.rounds is not None:
            rounds_summary(run, round_policies)
    run.log.close()
    return summaries


def model_ref(recipe: Recipe, i: int, ref: str) -> str:
    """A model reference of stage `i`: an earlier stage's name means its export; anything
    else is a directory."""
    names = [s.name for s in recipe.stages[:i]]
    return stage_paths(recipe, names.index(ref)).final if ref in names else ref


def file_ref(recipe: Recipe, i: int, value: str) -> str:
    """A file reference of stage `i`: "@<stage>/<file>" is a file an earlier stage wrote."""
    if not value.startswith("@"):
        return value
    name, rest = value[1:].split("/", 1)
    names = [s.name for s in recipe.stages[:i]]
    return os.path.join(stage_paths(recipe, names.index(name)).root, rest)


def stage_with_refs(recipe: Recipe, i: int) -> StageConfig:
    """Stage `i`'s config with its references resolved: "@<stage>/<file>" paths to
    files, stage names in teacher, reward and committee to exports."""
    s = recipe.stages[i]
    return dataclasses.replace(s, data=file_ref(recipe, i, s.data), val_data=file_ref(recipe, i, s.val_data),
                               prompts=file_ref(recipe, i, s.prompts),
                               teacher=model_ref(recipe, i, s.teacher) if s.teacher else "",
                               reward=[model_ref(recipe, i, r) for r in s.reward],
                               committee=[model_ref(recipe, i, c) for c in s.committee])


def starting_point(recipe: Recipe, i: int, previous: str) -> str:
    """What stage `i` starts from: its `from` (an earlier stage's export, or a model
    directory), else `previous` (the policy: the last policy stage's export, or [run]
    init for the first); "" (new weights) for a `fresh` stage."""
    if recipe.stages[i].fresh:
        return ""
    name = recipe.stages[i].start_from
    return model_ref(recipe, i, name) if name else previous


def round_start(run: Run, i: int, policy: str, round_policies: dict[int, str]) -> str:
    """At the first stage of round k of a [rounds] block: record the policy round k - 1
    ended with and, with `average_last` K > 1, start round k from the uniform average of
    the last K rounds' policies (written once to <output>/rounds/average_r<k>/)."""
    recipe = run.recipe
    rounds = recipe.rounds
    k = round_of(recipe.stages[i].name, rounds)
    if not k or recipe.stages[i].name != f"{rounds.stages[0]}_r{k}":
        return policy
    round_policies[k - 1] = policy
    if k < 2 or rounds.average_last < 2:
        return policy
    dirs = [round_policies[j] for j in range(max(1, k - rounds.average_last), k)]
    if len(dirs) < 2:
        return policy
    from kiln.training.average import SUMMARY_FILE, average_models

    out = os.path.join(recipe.run.output, "rounds", f"average_r{k}")
    if run.world.main and not os.path.exists(os.path.join(out, SUMMARY_FILE)):
        shutil.rmtree(out, ignore_errors=True)
        run.log.print(f"[rounds] round {k} starts from the average of " + ", ".join(dirs))
        average_models(dirs, out, log=run.log.print)
    barrier(run.world)
    return out


def rejection_sampling_stage(run: Run, i: int, policy: str) -> dict:
    """A rejection_sampling stage (kiln.training.post.rejection): no training; its
    outputs are files later stages read ("@<stage>/sft.jsonl", "@<stage>/pairs.jsonl")."""
    from kiln.training.post import rejection

    recipe, cfg = run.recipe, stage_with_refs(run.recipe, i)
    where = f"{recipe.path}: [[stage]] {cfg.name}"
    if not policy:
        raise ConfigError(f"{where}: rejection sampling samples a policy: set [run] init, its from, or put a stage "
                          "before it")
    paths = stage_paths(recipe, i)
    stats = rejection.run(cfg, policy, cfg.committee, cfg.reward, run.tokenizer, paths.root,
                          recipe.run.seed + 1000 * i, run.world, run.log.print, where)
    summary = {"stage": cfg.name, "kind": cfg.kind, "policy": policy, "final": None,
               **{k: stats.get(k) for k in ("drawn", "kept", "pairs", "samples_per_kept", "reward_gain",
                                            "heldout_reward")}}
    if run.world.main:
        os.makedirs(paths.final, exist_ok=True)
        with open(paths.done, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    barrier(run.world)
    return summary


def rounds_summary(run: Run, round_policies: dict[int, str]) -> None:
    """<output>/rounds.json and a table: per round, what its rejection sampling cost
    (samples per kept example) and bought (reward gain of the kept set; the held-out
    reward of the policy before the round and after it)."""
    from kiln.training.post import rejection

    recipe, rounds = run.recipe, run.recipe.rounds
    rs = [i for i, s in enumerate(recipe.stages) if s.kind == "rejection_sampling" and round_of(s.name, rounds)]
    if not rs:
        return
    path = os.path.join(recipe.run.output, "rounds.json")
    if os.path.exists(path):
        return
    rows = []
    for i in rs:
        with open(os.path.join(stage_paths(recipe, i).root, rejection.STATS_FILE), encoding="utf-8") as f:
            stats = json.load(f)
        rows.append({"round": round_of(recipe.stages[i].name, rounds), "stage": recipe.stages[i].name,
                     **{k: stats.get(k) for k in ("drawn", "kept", "pairs", "samples_per_kept", "reward_gain")},
                     "reward_kept": stats["reward_kept"].get("mean"), "reward_all": stats["reward_all"].get("mean"),
                     "heldout_before": stats.get("heldout_reward")})
    for row, after in zip(rows, rows[1:]):
        row["heldout_after"] = after["heldout_before"]
    last = rs[-1]
    cfg, root = stage_with_refs(recipe, last), stage_paths(recipe, last).root
    eval_file = os.path.join(root, "prompts_eval.jsonl")
    if os.path.getsize(eval_file):
        run.log.print(f"[rounds] held-out reward of the final policy {round_policies[rounds.count]}")
        rows[-1]["heldout_after"] = rejection.evaluate_policy(
            cfg, round_policies[rounds.count], cfg.reward, run.tokenizer,
            eval_file, os.path.join(recipe.run.output, "rounds", "heldout_final.jsonl"),
            recipe.run.seed + 1000 * last, run.world, run.log.print, f"{recipe.path}: [rounds]")
    if run.world.main:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"rounds": rows}, f, indent=2)
        run.log.print("[rounds] round  drawn  kept  per-kept  gain    held-out before -> after")
        for r in rows:
            run.log.print(f"[rounds] {r['round']:>5}  {r['drawn']:>5}  {r['kept']:>4}  {r['samples_per_kept'] or 0:>8.1f}"
                          f"  {r['reward_gain'] or 0:+.3f}  {r.get('heldout_before') or 0:+.3f} -> "
                          f"{r.get('heldout_after') or 0:+.3f}")


def start_run(recipe: Recipe, options: RunOptions) -> Run:
    check_model_refs(recipe)
    world = init_distributed()
    torch.manual_seed(recipe.run.seed)
    source = TokenSource(recipe.run.shards, recipe.run.val_fraction, extra=recipe.run.extra_shards) \
        if recipe.run.shards else None
    vocab = source.vocab_size if source else tokenizer_vocab(recipe)
    model_cfg = resolve(recipe.model, vocab_size=vocab, where=f"{recipe.path}: [model]")
    if source:
        source.check_vocab(model_cfg.vocab_size)
    tokenizer = tokenizer_dir(recipe, source)
    log = MetricsLogger(None, world.main)
    log.print(f"kiln train {recipe.path}: {len(recipe.stages)} stage(s), {world.size} process(es) on {world.device}")
    log.print("resolved model: " + json.dumps(dataclasses.asdict(model_cfg)))
    return Run(recipe, options, world, source, model_cfg, tokenizer, log)


def check_model_refs(recipe: Recipe) -> None:
    """Every model a stage names that is not an earlier stage of the recipe (`[run] init`,
    `from`, `teacher`, `reward`, `committee`) is a model directory now, before the first
    stage spends hours: a teacher that is not built yet is an error naming the key."""
    def check(at: str, ref: str, earlier: list[str]) -> None:
        if ref and ref not in earlier and not os.path.isfile(os.path.join(ref, "config.json")):
            what = "does not exist" if not os.path.exists(ref) else "holds no config.json"
            raise ConfigError(f"{recipe.path}: {at}: {ref} {what}; it is neither an earlier stage of this recipe "
                              f"nor a model directory (build it first, or name the stage that makes it)")

    check("[run] init", recipe.run.init, [])
    for i, s in enumerate(recipe.stages):
        earlier = [t.name for t in recipe.stages[:i]]
        at = f"[[stage]] {s.name}"
        check(f"{at} from", s.start_from, earlier)
        check(f"{at} teacher", s.teacher, earlier)
        for key in ("reward", "committee"):
            for ref in getattr(s, key):
                check(f"{at} {key}", ref, earlier)


def tokenizer_vocab(recipe: Recipe) -> int:
    """The [run] tokenizer's vocabulary (with its special tokens): a recipe without shards."""
    from tokenizers import Tokenizer

    path = recipe.run.tokenizer
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ConfigError(f"{recipe.path}: [run] tokenizer {path}: no {TOKENIZER_FILE} there")
    return Tokenizer.from_file(file).get_vocab_size(with_added_tokens=True)


def tokenizer_dir(recipe: Recipe, source: TokenSource | None) -> str:
    """The directory of the `[run] tokenizer` (given as the directory, or as its
    tokenizer.json), once its tokenizer.json is the one the shards were written with:
    validation decodes with it and the export copies it beside the model."""
    path, where = recipe.run.tokenizer, recipe.path
    if not path:
        return ""
    if os.path.isdir(path):
        directory, file = path, os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(file):
            raise ConfigError(f"{where}: [run] tokenizer {path}: no {TOKENIZER_FILE} there")
    elif os.path.isfile(path) and os.path.basename(path) == TOKENIZER_FILE:
        directory, file = os.path.dirname(path), path
    else:
        raise ConfigError(f"{where}: [run] tokenizer {path}: not a directory holding {TOKENIZER_FILE}, nor such a "
                          "file")
    if source is not None:
        source.check_tokenizer(file, where)
    return directory


def train_stage(run: Run, i: int, previous: str) -> dict | None:
    """Train stage `i` from `previous` (the last stage's export; "" = fresh weights) to
    its token budget and export it; returns its summary, or None if the run was stopped."""
    stage = setup_stage(run, i, previous)
    stage.model.train()
    while stage.state.tokens < stage.cfg.tokens:
        if run.stopped():
            stage.metrics.close()
            return None
        record = train_step(run, stage)
        done = stage.state.tokens >= stage.cfg.tokens
        if stage.state.step % run.recipe.run.log_every == 0 or done:
            record.update(progress(run, stage, record))
        if stage.state.step % stage.cfg.eval_every == 0 or done:
            record.update(validate(run, stage))
        stage.metrics.log(stage.state.step, record)
        if stage.state.step % stage.cfg.checkpoint_every == 0 or done:
            save_checkpoint(run, stage)
    if stage.state.last_saved != stage.state.step:
        save_checkpoint(run, stage)
    stage.metrics.close()
    return finish_stage(run, stage)


# --------------------------------------------------------------------------- setting a stage up


def setup_stage(run: Run, i: int, previous: str) -> TrainingStage:
    """Mixture, model, optimizer, sampler and validator of stage `i`, resumed from its
    newest checkpoint when there is one (and `options.resume`)."""
    recipe, world, cfg = run.recipe, run.world, run.recipe.stages[i]
    if cfg.kind == "distill":
        return setup_distill_stage(run, i, previous)
    if cfg.kind != "pretrain":
        return setup_post_stage(run, i, previous)
    mixture = stage_mixture(recipe, cfg)
    run.source.check_mixture(mixture)
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world.size)
    check_batching(cfg, micro, world, f"{recipe.path}: [[stage]] {cfg.name}")
    model = stage_model(run, cfg, previous)
    attach_ema(model, cfg)
    optimizer = optimizer_for(model, recipe, lr_at(cfg, 0), world.device)
    data_cfg = DataConfig(shards_dir=recipe.run.shards, seq_len=cfg.seq_len, batch_size=micro,
                          seed=recipe.run.seed + 1000 * i, val_fraction=recipe.run.val_fraction,
                          doc_masking=cfg.doc_masking)
    blend = Mixture.from_dict({"mixture": cfg.blend}, path=f"{recipe.path}: [[stage]] {cfg.name} blend") if cfg.blend else None
    sampler = MixtureSampler(run.source, mixture, data_cfg, world.rank, world.size, blend, cfg.blend_ratio)
    validator = Validator(run.source, cfg, micro, world, run.tokenizer)
    paths = stage_paths(recipe, i)
    resolved = resolved_config(run, cfg, model, mixture)
    state, metrics, meter = start_bookkeeping(run, cfg, paths, model, optimizer, sampler, resolved)
    run.log.print(f"[{cfg.name}] {num_params(model.hf) / 1e6:.2f}M non-embedding parameters, {cfg.tokens:,} tokens, "
                  f"seq_len {cfg.seq_len}, mixture {mixture.weights}"
                  + (f" blended {cfg.blend_ratio:.0%} with {cfg.blend}" if cfg.blend else "")
                  + f", {model.kernels.backend} kernels")
    return TrainingStage(cfg, paths, mixture, micro, model, optimizer, sampler, validator, resolved, state, metrics,
                         meter, forward=lm_forward)


class EMA(torch.nn.Module):
    """Polyak averages of a model's trainable parameters, ema = decay x ema + (1 - decay) x
    param after each optimizer step. Buffers of the trained module, so checkpoints save
    and resume them with the model; under FSDP2 each rank averages its own shards."""

    def __init__(self, hf: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        for i, p in enumerate(self._params(hf)):
            self.register_buffer(f"p{i}", p.detach().clone())

    @staticmethod
    def _params(hf: torch.nn.Module) -> list[torch.Tensor]:
        return [p for p in hf.parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, hf: torch.nn.Module) -> None:
        for avg, p in zip(self.buffers(), self._params(hf)):
            avg.lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, hf: torch.nn.Module) -> None:
        for avg, p in zip(self.buffers(), self._params(hf)):
            p.copy_(avg)


def attach_ema(model: torch.nn.Module, stage: StageConfig) -> None:
    """With `average = "ema"`, the average starts from the stage's starting weights (after
    parallelize, so it averages what the optimizer updates)."""
    if stage.average == "ema":
        model.ema = EMA(model.hf, stage.ema_decay)


def start_bookkeeping(run: Run, cfg: StageConfig, paths: StagePaths, model, optimizer, sampler, resolved: dict
                      ) -> tuple[StageState, MetricsLogger, Throughput]:
    """The stage's loop state (resumed from its newest checkpoint when there is one and
    `options.resume`), its resolved config written beside it, its metrics log and its
    throughput meter: the same for every kind of stage."""
    world = run.world
    state = StageState()
    if run.options.resume:
        state = resume(run, cfg, paths, model, optimizer, sampler) or state
    if world.main:
        os.makedirs(paths.root, exist_ok=True)
        with open(paths.resolved_recipe, "w", encoding="utf-8") as f:
            json.dump(resolved, f, indent=2)
        truncate_metrics(paths.metrics, state.step)  # the steps after the checkpoint are logged again
    metrics = MetricsLogger(paths.metrics, world.main, paths.tensorboard if run.recipe.run.tensorboard else "")
    meter = Throughput(flops_per_token(num_params(model.hf), run.model_cfg.num_layers, attention_width(run.model_cfg),
                                       cfg.seq_len), peak_flops(world.device), world.size)
    return state, metrics, meter


def lm_forward(model, b) -> tuple[torch.Tensor, dict]:
    return model(b.input_ids, b.labels, b.position_ids, b.segment_ids), {}


def setup_post_stage(run: Run, i: int, previous: str) -> TrainingStage:
    """A post-training stage (kiln.training.post.stages): its data, the model of its kind
    from the export it starts from, and the same optimizer, checkpoints and resume as
    pretraining. A stage given `epochs` gets the token budget of that many passes."""
    from kiln.training.post import stages as post
    from kiln.training.post.data import ChatTokenizer

    recipe, world, cfg = run.recipe, run.world, stage_with_refs(run.recipe, i)
    where = f"{recipe.path}: [[stage]] {cfg.name}"
    if not previous:
        raise ConfigError(f"{where}: a {cfg.kind} stage starts from a model: set [run] init, its from, or put a "
                          "stage before it")
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world.size)
    check_batching(cfg, micro, world, where)
    tok = ChatTokenizer(run.tokenizer)
    hf = post.load_start(cfg.kind, previous, tok.vocab_size)
    if hf.config.vocab_size != run.model_cfg.vocab_size:
        raise ConfigError(f"{previous}: its vocabulary has {hf.config.vocab_size} tokens, the run's "
                          f"{run.model_cfg.vocab_size} (the tokenizer's {tok.vocab_size}, rounded up to 64)")
    paths = stage_paths(recipe, i)

    def place(model):
        return parallelize(model.to(world.device), recipe.parallel, world, recipe.kernels)

    ps = post.setup(cfg.kind, cfg, hf, tok, world, micro, recipe.run.seed + 1000 * i, paths.root, run.log.print, place)
    if cfg.epochs:
        steps = post.steps_for(cfg, ps.items)
        cfg = dataclasses.replace(cfg, tokens=steps * cfg.batch_size * cfg.seq_len)
    attach_ema(ps.model, cfg)
    optimizer = optimizer_for(ps.model, recipe, lr_at(cfg, 0), world.device)
    resolved = resolved_config(run, cfg, ps.model, None)
    state, metrics, meter = start_bookkeeping(run, cfg, paths, ps.model, optimizer, ps.sampler, resolved)
    run.log.print(f"[{cfg.name}] {cfg.kind} from {previous}: {ps.items} training items, "
                  f"{cfg.tokens // (cfg.batch_size * cfg.seq_len)} steps of {cfg.batch_size}, lr {cfg.lr:g}, "
                  f"{ps.model.kernels.backend} kernels")
    return TrainingStage(cfg, paths, None, micro, ps.model, optimizer, ps.sampler, ps.validator, resolved, state,
                         metrics, meter, forward=ps.forward)


def setup_distill_stage(run: Run, i: int, previous: str) -> TrainingStage:
    """A distill stage (kiln.training.post.distill): a student (the previous export, or
    fresh weights of the recipe's [model]) trained on the teacher's distributions over
    token shards or SFT rows, with the loop, checkpoints and resume of pretraining."""
    from kiln.training.post import distill

    recipe, world, cfg = run.recipe, run.world, stage_with_refs(run.recipe, i)
    where = f"{recipe.path}: [[stage]] {cfg.name}"
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world.size)
    check_batching(cfg, micro, world, where)
    paths = stage_paths(recipe, i)
    student = stage_hf(run, cfg, previous).to(world.device)
    cfg, model, sampler, validator, forward = distill.setup(run, cfg, i, micro, student, cfg.teacher, paths.root,
                                                            where)
    model = parallelize(model.to(world.device), recipe.parallel, world, recipe.kernels)
    attach_ema(model, cfg)
    optimizer = optimizer_for(model, recipe, lr_at(cfg, 0), world.device)
    resolved = resolved_config(run, cfg, model, None)
    state, metrics, meter = start_bookkeeping(run, cfg, paths, model, optimizer, sampler, resolved)
    run.log.print(f"[{cfg.name}] distill ({cfg.loss}) from teacher {cfg.teacher} into "
                  f"{num_params(model.hf) / 1e6:.2f}M non-embedding parameters"
                  + (f" (from {previous})" if previous else " (fresh)")
                  + f", {cfg.tokens:,} tokens, {model.kernels.backend} kernels")
    return TrainingStage(cfg, paths, None, micro, model, optimizer, sampler, validator, resolved, state, metrics,
                         meter, forward=forward)


def stage_mixture(recipe: Recipe, stage: StageConfig) -> Mixture:
    where = f"{recipe.path}: [[stage]] {stage.name}"
    if stage.weights:
        return Mixture.from_dict({"mixture": stage.weights}, path=where)
    path = stage.mixture
    if not os.path.isabs(path) and recipe.path and not os.path.exists(path):
        path = os.path.join(os.path.dirname(recipe.path), path)
    return load_mixture(path)


def check_batching(stage: StageConfig, micro: int, world: World, where: str) -> None:
    sizes = [stage.batch_size] + [b for _t, b in stage.batch_ramp]
    for size in sizes:
        if size % (micro * world.size):
            raise ConfigError(f"{where}: batch size {size} is not a multiple of micro_batch_size {micro} x "
                              f"{world.size} rank(s)")


def stage_model(run: Run, stage: StageConfig, previous: str) -> CausalLM:
    """The previous stage's export, `[run] init` for the first stage, or fresh weights,
    with this stage's RoPE base and context, on the device, with the recipe's kernels and
    parallelism applied."""
    model = CausalLM(stage_hf(run, stage, previous)).to(run.world.device)
    return parallelize(model, run.recipe.parallel, run.world, run.recipe.kernels)


def stage_hf(run: Run, stage: StageConfig, previous: str):
    """The Hugging Face model a pretraining-like stage starts from (see stage_model).
    Exports are read from safetensors only, never unpickled: weights from elsewhere
    enter a run this way, not as a checkpoint directory (DCP's index is a pickle,
    trusted input)."""
    from transformers import AutoModelForCausalLM

    if previous:
        try:
            hf = AutoModelForCausalLM.from_pretrained(previous, dtype=torch.float32, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{previous}: not a Hugging Face model directory with safetensors weights "
                              f"({str(e).splitlines()[0][:200]})") from e
        if hf.config.vocab_size != run.model_cfg.vocab_size:
            raise ConfigError(f"{previous}: its vocabulary has {hf.config.vocab_size} tokens, the run's "
                              f"{run.model_cfg.vocab_size} (the shards')")
    else:
        hf = build_model(run.model_cfg, seed=run.recipe.run.seed)
    if stage.rope_theta:
        set_rope_theta(hf, stage.rope_theta)
    if stage.seq_len > hf.config.max_position_embeddings:
        hf.config.max_position_embeddings = stage.seq_len
    return hf


def optimizer_for(model: torch.nn.Module, recipe: Recipe, lr: float, device: torch.device) -> torch.optim.Optimizer:
    # Decay matrices only: norms' gains (and biases, which Llama has none of) stay undecayed.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    opt = recipe.optimizer
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=tuple(opt.betas), eps=opt.eps, fused=device.type == "cuda")


def resolved_config(run: Run, stage: StageConfig, model: CausalLM, mixture: Mixture | None) -> dict:
    """Everything that decides the stage's numbers, as applied (preset and vocabulary
    resolved, kernels resolved for the device): written beside the stage and saved in
    every checkpoint."""
    recipe = run.recipe
    return {"model": dataclasses.asdict(run.model_cfg), "stage": dataclasses.asdict(stage),
            "parallel": dataclasses.asdict(recipe.parallel), "kernels": dataclasses.asdict(model.kernels),
            "optimizer": dataclasses.asdict(recipe.optimizer), "run": dataclasses.asdict(recipe.run),
            "mixture": mixture.weights if mixture else None}


def resume(run: Run, stage: StageConfig, paths: StagePaths, model, optimizer, sampler) -> StageState | None:
    """Restore the newest complete checkpoint of the stage, if any; returns its loop state."""
    path = checkpoint.latest(paths.checkpoints, run.log.print)
    if not path:
        return None
    meta = checkpoint.load(path, model, optimizer, run.world, expected_model=dataclasses.asdict(run.model_cfg))
    sampler.load_state_dict(meta["sampler"])
    state = StageState(step=meta["step"], tokens=meta["tokens"], last_saved=meta["step"])
    run.log.print(f"[{stage.name}] resumed from {path} (step {state.step}, {state.tokens:,} tokens)")
    return state


# --------------------------------------------------------------------------- the loop's steps


def train_step(run: Run, stage: TrainingStage) -> dict:
    """One optimizer step of `batch_size` sequences, accumulated over micro-batches;
    returns the step's metrics record."""
    world, state = run.world, stage.state
    batch_size = batch_size_at(stage.cfg, state.tokens)
    accum = batch_size // (stage.micro * world.size)
    lr = lr_at(stage.cfg, state.tokens)
    for group in stage.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=world.device)
    extra: dict[str, float] = {}
    for _ in range(accum):
        b = _to(stage.sampler.next_batch(stage.micro), world.device)
        with autocast(run.recipe.parallel, world):
            loss, metrics = stage.forward(stage.model, b)
        (loss / accum).backward()
        loss_sum += loss.detach().float()
        for k, v in metrics.items():  # per-pair values (rewards, log-probs) are logged as their batch mean
            value = float(v.float().mean()) if torch.is_tensor(v) else float(v)
            extra[k] = extra.get(k, 0.0) + value / accum
    grad_norm = clip_grad_norm(stage.model, run.recipe.optimizer.grad_clip)
    stage.optimizer.step()
    if stage.cfg.average == "ema":
        stage.model.ema.update(stage.model.hf)
    stage.optimizer.zero_grad(set_to_none=True)
    step_tokens = batch_size * stage.cfg.seq_len
    state.step += 1
    state.tokens += step_tokens
    state.last_loss = all_reduce_mean(float(loss_sum) / accum, world)
    stage.meter.add(step_tokens)
    run.steps_taken += 1
    return {"train/loss": state.last_loss, "train/lr": lr, "train/grad_norm": grad_norm,
            "train/tokens": state.tokens, "train/batch_size": batch_size,
            **{f"train/{k}": all_reduce_mean(v, world) for k, v in extra.items()}}


def _to(batch, device):
    """A pretraining or SFT Batch, or a preference batch (a dict of tensors), on `device`."""
    return {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)


def clip_grad_norm(model, max_norm: float) -> float:
    """The global gradient norm, after clipping to `max_norm` (0 = measure only)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor of the global norm
        norm = norm.full_tensor()
    return float(norm)


def progress(run: Run, stage: TrainingStage, record: dict) -> dict:
    """Throughput, memory and sampler metrics since the last report, and rank 0's progress line."""
    state = stage.state
    out = stage.meter.report()
    out["perf/peak_memory_gb"] = peak_memory_gb(run.world.device)
    out.update(stage.sampler.metrics())
    run.log.print(f"[{stage.name}] step {state.step} tokens {state.tokens:,}/{stage.cfg.tokens:,} "
                  f"loss {record['train/loss']:.4f} lr {record['train/lr']:.2e} "
                  f"gnorm {record['train/grad_norm']:.3f} {out['perf/tokens_per_s']:,.0f} tok/s"
                  + (f" mfu {out['perf/mfu']:.1%}" if "perf/mfu" in out else "")
                  + (f" acc {record['train/accuracy']:.2f}" if "train/accuracy" in record else "")
                  + (f" reward {record['train/reward']:.3f} kl {record['train/kl']:.3f}" if "train/reward" in record
                     else "")
                  + (f" kl {record['train/kl']:.4f}" if "train/kl" in record and "train/reward" not in record
                     else "")
                  + f" eta {eta(time.time() - state.started, state.tokens, stage.cfg.tokens)}")
    return out


def validate(run: Run, stage: TrainingStage) -> dict:
    val = stage.validator.run(stage.model, run.recipe.parallel)
    if val:
        run.log.print(f"[{stage.name}] validation " + " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in val.items()))
    return val


def save_checkpoint(run: Run, stage: TrainingStage) -> str:
    state = stage.state
    meta = {"tokens": state.tokens, "sampler": stage.sampler.state_dict(), "config": stage.resolved}
    path = checkpoint.save(stage.paths.checkpoints, state.step, stage.model, stage.optimizer, meta, run.world,
                           keep=stage.cfg.keep_checkpoints)
    state.last_saved = state.step
    return path


# --------------------------------------------------------------------------- the stage's end


def finish_stage(run: Run, stage: TrainingStage) -> dict:
    """Average the last checkpoints when the stage asks (annealing), export `final/`,
    and return the stage's summary (also written as `final/kiln_stage.json`)."""
    cfg, state = stage.cfg, stage.state
    averaged = cfg.average_last if cfg.average_last > 1 else 0
    if cfg.average == "ema":
        stage.model.ema.copy_to(stage.model.hf)
        averaged = "ema"
        run.log.print(f"[{stage.name}] exporting the exponential moving average of the weights (decay {cfg.ema_decay})")
    elif averaged:
        paths = checkpoint.complete_checkpoints(stage.paths.checkpoints, run.log.print)[-averaged:]
        checkpoint.average(paths, stage.model, run.world)
        run.log.print(f"[{stage.name}] averaged the last {len(paths)} checkpoints: "
                      + ", ".join(os.path.basename(p) for p in paths))
    summary = {"stage": cfg.name, "steps": state.step, "tokens": state.tokens, "final_loss": state.last_loss,
               "averaged": averaged, "final": stage.paths.final}
    if averaged:  # the averaged weights are not the last step's: validate what is exported
        summary.update(stage.validator.run(stage.model, run.recipe.parallel))
    export(stage.model, stage.paths, run.tokenizer, run.world, summary)
    run.log.print(f"[{stage.name}] exported {stage.paths.final}")
    return summary


def export(model, paths: StagePaths, tokenizer_dir: str, world: World, summary: dict) -> None:
    """The stage's weights as a Hugging Face directory, gathered to rank 0 under FSDP,
    then the summary that marks the stage finished."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.main:
        hf = model.hf
        if world.distributed and world.size > 1:
            hf = type(model.hf)._from_config(model.hf.config, dtype=torch.float32)
            hf.load_state_dict({k.removeprefix("hf."): v for k, v in full.items() if k.startswith("hf.")})
        save_hf(hf, paths.final, tokenizer_dir)
        with open(paths.done, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    barrier(world)
