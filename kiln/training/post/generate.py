"""Sampling completions from a causal LM in its chat format: `kiln generate`, and the
sampler that rejection sampling and RLOO draw from.

Prompts (JSONL or Parquet), one per row, each with an optional `id`:

    {"id": "q1", "prompt": "What does bisect do?"}                        one user message
    {"id": "q2", "prompt": [{"role": "system", ...}, {"role": "user", ...}]}   the conversation so far (TRL)
    {"id": "q3", "messages": [..., {"role": "user", ...}, {"role": "assistant", ...}]}

A `messages` row is cut before its trailing assistant turn (an SFT file gives its
prompts); a `prompt` list must not end with one. A row without `id` is named by its
0-based row number in the file. Each prompt is rendered in the chat format with the
assistant header appended (kiln.formats.chat, `generation_prompt=True`). Rows are
dropped by reason: `not_json`, `bad_messages`, `empty` (no content to answer),
`prompt_too_long` (prompt + max_new_tokens over the model's context) and
`duplicate_id` (an id an earlier kept row has).

Output, one JSON line per prompt, in the prompts' order:

    {"id": "q1", "prompt": [messages], "model": DIR, "seed": S,
     "completions": [{"text": "...", "tokens": 17, "truncated": false}, ...]}

`text` is the decoded response without <|eot_id|>, `tokens` the number of generated
tokens (without <|eot_id|> and padding), `truncated` whether no <|eot_id|> came within
max_new_tokens.

Sampling is batched (`batch_size` rows of prompt x sample per `generate` call, left
padded, KV cache; on CUDA bf16 with the static cache, on CPU fp32 with the dynamic
one). The randomness of a row is its own: the Gumbel-max trick (argmax of z/T plus
Gumbel noise is a draw from softmax(z/T), restricted to the top-p set) with noise from
one generator per row, seeded by (seed, salt, prompt id, sample index). A prompt's
samples therefore do not depend on the prompts batched with it, on the batch size or on
a resume, up to the floating-point effect of left padding on the logits.

Under torchrun rank r samples prompts r, r + size, ... into OUT.parts/rank-R.jsonl (a
line per prompt, flushed as it finishes); after a barrier rank 0 merges the parts into
OUT in prompt order (written under a temporary name and renamed). A relaunch skips
every prompt any part file holds (a last line cut by a kill is discarded) and refuses
parts written with other settings (OUT.parts/settings.json); the parts are kept, so a
finished run relaunched only merges again. OUT.parts/stats.json holds the run's stats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kiln.config import ConfigError
from kiln.formats.chat import EOT, render
from kiln.training.post.data import ChatTokenizer, DataReport, _messages, read_rows

PARTS_FORMAT = "kiln-generate-v1"
LOG_EVERY_S = 10.0  # progress lines at most this often (plus the first and the last batch)


@dataclass
class SamplingConfig:
    samples: int = 4  # completions per prompt (K)
    temperature: float = 1.0  # softmax temperature; 0 = greedy decoding (every sample the same)
    top_p: float = 1.0  # nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p
    max_new_tokens: int = 256  # tokens generated per completion at most (without <|eot_id|> it is truncated)
    seed: int = 0  # with the prompt's id and the sample's index, seeds each completion's noise
    batch_size: int = 32  # rows (prompt x sample) per generate call; changes speed and memory, not the samples

    def check(self, where: str = "sampling") -> None:
        if self.samples < 1:
            raise ConfigError(f"{where}: samples must be at least 1, got {self.samples}")
        if not self.temperature >= 0:
            raise ConfigError(f"{where}: temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}: top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{where}: max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"{where}: batch_size must be at least 1, got {self.batch_size}")


@dataclass
class Prompt:
    id: str  # the row's "id" (str() of it) if present, else its 0-based row number as a string
    messages: list[dict]  # the conversation so far
    ids: list[int]  # rendered with the assistant header appended (generation prompt)


@dataclass
class Completion:
    text: str  # decoded response, without <|eot_id|>
    ids: list[int]  # generated token ids, without <|eot_id|> and padding
    truncated: bool  # True when no <|eot_id|> came within max_new_tokens


# --------------------------------------------------------------------------- prompts


def read_prompts(path: str, tok: ChatTokenizer, context: int, max_new_tokens: int) -> tuple[list[Prompt], DataReport]:
    """The usable prompts of a file, in its order, and what was dropped by reason."""
    report = DataReport(path)
    prompts, seen = [], set()
    for row in read_rows(path, report):
        number = report.rows - 1  # read_rows counted this row
        if "prompt" in row:
            messages = _messages(row["prompt"], "user")
            if messages and messages[-1]["role"] == "assistant":
                messages = None  # a reply to continue, not a prompt to answer
        elif "messages" in row:
            messages = _messages(row["messages"], "user")
            if messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
        else:
            messages = None
        if messages is None:
            report.drop("bad_messages")
            continue
        if not any(m["content"].strip() for m in messages):
            report.drop("empty")
            continue
        ids = prompt_ids(tok, messages)
        if len(ids) + max_new_tokens > context:
            report.drop("prompt_too_long")
            continue
        pid = str(row["id"]) if row.get("id") is not None else str(number)
        if pid in seen:
            report.drop("duplicate_id")
            continue
        seen.add(pid)
        report.kept += 1
        prompts.append(Prompt(pid, messages, ids))
    report.check()
    if not prompts:
        raise ConfigError(f"{report.describe()}: no usable prompt")
    return prompts, report


def prompt_ids(tok: ChatTokenizer, messages: list[dict]) -> list[int]:
    """The conversation's tokens followed by the assistant header the model answers after."""
    return list(tok.tok.encode(render(messages, generation_prompt=True).text, add_special_tokens=False).ids)


# --------------------------------------------------------------------------- the model


def load_causal_lm(path: str, device, dtype=torch.float32):
    """A Hugging Face causal LM directory (safetensors only), on `device`, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a Hugging Face model directory ({str(e).splitlines()[0][:200]})") from e
    if any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        raise ConfigError(f"{path}: a reward model (sequence classifier); sampling needs a causal LM export")
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: no causal LM with safetensors weights ({str(e).splitlines()[0][:200]})") from e
    return hf.to(device).eval()


# --------------------------------------------------------------------------- sampling


def row_seed(seed: int, salt: str, prompt_id: str, index: int) -> int:
    """The seed of one completion's noise: a hash of what identifies it, nothing of its batch."""
    key = json.dumps([seed, salt, prompt_id, index]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1  # 63 bits


class GumbelNoise:
    """A logits processor (transformers calls it with input_ids and the (B, V) scores)
    adding standard Gumbel noise -log(-log U) to each row's scores, U uniform from that
    row's own generator: the argmax of the result is a draw from softmax(scores) (the
    Gumbel-max trick), and a filtered (-inf) token is never drawn. Each call advances
    every row's generator by one vocabulary's worth of uniforms, so row j's t-th token
    uses its generator's t-th draw, whatever else is in the batch."""

    def __init__(self, seeds: list[int], device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.shape[-1]
        u = torch.stack([torch.rand(V, generator=g, device=scores.device) for g in self.generators])  # (B, V)
        # U = 0 would give +inf noise: the smallest normal float keeps it finite (and its odds nil).
        u = u.clamp_(min=torch.finfo(u.dtype).tiny)
        return scores.float() - torch.log(-torch.log(u))


def sampling_processors(cfg: SamplingConfig, seeds: list[int], device) -> list:
    """Temperature, top-p, then per-row Gumbel noise; none for greedy decoding (temperature 0)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    if cfg.temperature == 0:
        return []
    out = []
    if cfg.temperature != 1.0:
        out.append(TemperatureLogitsWarper(float(cfg.temperature)))
    if cfg.top_p < 1.0:
        out.append(TopPLogitsWarper(cfg.top_p))
    out.append(GumbelNoise(seeds, device))
    return out


@contextlib.contextmanager
def _plain_generation_config(hf):
    """transformers fills every generation setting left unset from the model's own
    generation_config.json (a repetition penalty, a suppressed token, a minimum length
    would each change what is drawn): the defaults stand in for it during the call."""
    from transformers import GenerationConfig

    saved = hf.generation_config
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved


def static_cache(hf) -> bool:
    """The static KV cache (and transformers' compiled decoding step) on CUDA, for models
    whose forward compiles as one graph; the dynamic cache elsewhere."""
    return hf.device.type == "cuda" and bool(getattr(hf, "_can_compile_fullgraph", False))


def synced_ranks(hf) -> bool:
    """Whether FSDP shards `hf` over several ranks: then every rank must run as many
    forwards as the slowest (transformers' synced_gpus), however soon its own rows end,
    or the others wait forever in an all-gather. transformers detects only its own
    FSDP wrapping, not `fully_shard` applied by kiln.training.parallelize."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in hf.modules())


def _generate(hf, tok: ChatTokenizer, rows: list[tuple[Prompt, int]], cfg: SamplingConfig, salt: str, eot: int,
              cache_len: int) -> list[Completion]:
    """One left-padded batch of rows (prompt, sample index) through `hf.generate`."""
    from transformers import GenerationConfig, LogitsProcessorList

    width = max(len(p.ids) for p, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, (p, _) in enumerate(rows):
        ids[j, width - len(p.ids):] = torch.tensor(p.ids)
        mask[j, width - len(p.ids):] = 1
    seeds = [row_seed(cfg.seed, salt, p.id, k) for p, k in rows]
    static = static_cache(hf)
    # Greedy decoding of the processed scores: with the Gumbel processor last, the argmax is
    # the sample, so transformers adds no warper of its own and draws no noise of its own.
    gen = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_id,
                           eos_token_id=eot, cache_implementation="static" if static else None,
                           max_cache_len=cache_len if static else None)
    with _plain_generation_config(hf):
        out = hf.generate(input_ids=ids.to(hf.device), attention_mask=mask.to(hf.device), generation_config=gen,
                          logits_processor=LogitsProcessorList(sampling_processors(cfg, seeds, hf.device)),
                          synced_gpus=synced_ranks(hf))
    completions = []
    for row in out[:, width:].tolist():
        truncated = eot not in row
        new = row if truncated else row[:row.index(eot)]
        completions.append(Completion(tok.tok.decode(new, skip_special_tokens=False), new, truncated))
    return completions


def sample(hf, tok: ChatTokenizer, prompts: list[Prompt], cfg: SamplingConfig, salt: str = "",
           log=None) -> Iterator[tuple[Prompt, list[Completion]]]:
    """Each prompt with its `cfg.samples` completions, in prompt order, as batches finish.
    `salt` separates models sampling the same prompts (a committee's members) so they do
    not share noise. `log`, when given, receives progress lines with an ETA. A model
    sharded by FSDP over ranks needs every rank to call with as many batches (prompts x
    samples / batch_size, rounded up); each batch runs until every rank's rows end."""
    from kiln.training.metrics import eta

    cfg.check()
    if not prompts:
        return
    eot = tok.tok.token_to_id(EOT)
    rows = [(i, k) for i in range(len(prompts)) for k in range(cfg.samples)]
    # One static cache size for every batch, so the compiled decoding step is reused.
    cache_len = max(len(p.ids) for p in prompts) + cfg.max_new_tokens
    results: dict[int, list] = {}
    done = tokens = 0
    t0 = last_log = time.perf_counter()
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows[start:start + cfg.batch_size]
        # Inference mode around the call only: a `with` around the loop would stay entered
        # across the yields, in the caller's code (a policy-gradient step, say).
        with torch.inference_mode():
            completions = _generate(hf, tok, [(prompts[i], k) for i, k in batch], cfg, salt, eot, cache_len)
        for (i, k), c in zip(batch, completions):
            results.setdefault(i, [None] * cfg.samples)[k] = c
            tokens += len(c.ids)
        finished = done
        while done < len(prompts) and done in results and all(c is not None for c in results[done]):
            yield prompts[done], results.pop(done)
            done += 1
        now = time.perf_counter()
        if log and done > finished and (finished == 0 or done == len(prompts) or now - last_log >= LOG_EVERY_S):
            last_log, seconds = now, now - t0
            log(f"{done}/{len(prompts)} prompts, {tokens:,} tokens, {tokens / seconds:,.1f} tokens/s, "
                f"eta {eta(seconds, done, len(prompts))}")


# --------------------------------------------------------------------------- kiln generate


def generate_file(model: str, prompts: str, out: str, cfg: SamplingConfig, log=print) -> dict:
    """Sample `cfg.samples` completions for every prompt of the file `prompts` from the
    model directory `model` into `out` (sharded over torchrun's ranks, resumable); the
    run's stats, also written to OUT.parts/stats.json."""
    from kiln.training.distributed import all_reduce_mean, barrier, init_distributed

    cfg.check()
    if not os.path.exists(prompts):
        raise ConfigError(f"{prompts}: prompts file not found")
    if not os.path.isdir(model):
        raise ConfigError(f"{model}: model directory not found")
    t0 = time.perf_counter()
    world = init_distributed()
    tok = ChatTokenizer(model)
    cuda = world.device.type == "cuda"
    hf = load_causal_lm(model, world.device, torch.bfloat16 if cuda else torch.float32)
    if hf.config.vocab_size < tok.vocab_size:
        raise ConfigError(f"{model}: its vocabulary has {hf.config.vocab_size} tokens, its tokenizer.json "
                          f"{tok.vocab_size}: the model and the tokenizer do not belong together")
    items, report = read_prompts(prompts, tok, hf.config.max_position_embeddings, cfg.max_new_tokens)
    say = log if world.main else (lambda message: None)
    say(f"[generate] prompts {report.describe()}")

    parts = f"{out}.parts"
    settings = {"format": PARTS_FORMAT, "model": os.path.abspath(model), "prompts": os.path.abspath(prompts),
                "prompts_sha256": _sha256(prompts),
                "sampling": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "batch_size"}}
    _check_settings(parts, settings)
    finished = set(_finished_rows(parts))
    barrier(world)  # every rank has read the parts before any rank writes one
    if world.main:
        os.makedirs(parts, exist_ok=True)
        if not os.path.exists(os.path.join(parts, "settings.json")):
            _write_json(os.path.join(parts, "settings.json"), settings)
    barrier(world)
    mine = [p for p in items[world.rank::world.size] if p.id not in finished]
    resumed = sum(p.id in finished for p in items)
    if resumed:
        say(f"[generate] resuming: {resumed} of {len(items)} prompts already sampled in {parts}")
    own = os.path.join(parts, f"rank-{world.rank}.jsonl")
    _drop_cut_line(own)
    tag = f"[generate] rank {world.rank}/{world.size}: " if world.size > 1 else "[generate] "
    t_gen, tokens = time.perf_counter(), 0
    with open(own, "a", encoding="utf-8") as f:
        for prompt, completions in sample(hf, tok, mine, cfg, log=lambda m: say(tag + m)):
            f.write(json.dumps({"id": prompt.id, "prompt": prompt.messages, "model": model, "seed": cfg.seed,
                                "completions": [{"text": c.text, "tokens": len(c.ids), "truncated": c.truncated}
                                                for c in completions]}) + "\n")
            f.flush()
            tokens += sum(len(c.ids) for c in completions)
    seconds = time.perf_counter() - t_gen
    # Totals over the ranks (float64 sums: exact for any count that fits a run).
    run_prompts = round(all_reduce_mean(float(len(mine)), world) * world.size)
    run_tokens = round(all_reduce_mean(float(tokens), world) * world.size)
    seconds = all_reduce_mean(seconds, world)
    barrier(world)
    stats = {}
    if world.main:
        merged = _merge(parts, items, out)
        stats = {"model": model, "prompts": report.to_dict(), "out": out, "ranks": world.size,
                 "sampling": dataclasses.asdict(cfg), "prompts_sampled": len(merged),
                 "resumed_prompts": resumed, "this_run_prompts": run_prompts,
                 "samples": sum(len(r["completions"]) for r in merged),
                 "truncated": sum(c["truncated"] for r in merged for c in r["completions"]),
                 "generated_tokens": sum(c["tokens"] for r in merged for c in r["completions"]),
                 "this_run_tokens": run_tokens, "tokens_per_s": run_tokens / seconds if seconds > 0 else 0.0,
                 "generate_s": seconds, "wall_s": time.perf_counter() - t0}
        _write_json(os.path.join(parts, "stats.json"), stats)
        say(f"[generate] {out}: {stats['prompts_sampled']} prompts, {stats['samples']} samples "
            f"({stats['truncated']} truncated), {stats['generated_tokens']:,} tokens; this run "
            f"{run_tokens:,} tokens at {stats['tokens_per_s']:,.1f} tokens/s, {stats['wall_s']:.1f} s")
    barrier(world)
    if not world.main:
        with open(os.path.join(parts, "stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
    return stats


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    if os.path.isdir(path):  # a Parquet dataset directory: its files in name order
        files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
    else:
        files = [path]
    for name in files:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _write_json(path: str, value: dict) -> None:
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
    os.replace(f"{path}.tmp", path)


def _check_settings(parts: str, settings: dict) -> None:
    path = os.path.join(parts, "settings.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        before = json.load(f)
    if before != settings:
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        raise ConfigError(f"{parts}: parts of an earlier run with other settings ({', '.join(changed)} changed): "
                          "rerun with the same ones to resume, or delete the directory to start over")


def _part_lines(path: str) -> tuple[list[str], int]:
    """A part file's complete lines and the byte length they span: a line without its
    newline (a write cut by a kill), and anything after a line that is not JSON, is not."""
    lines, good = [], 0
    if not os.path.exists(path):
        return lines, good
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                json.loads(raw)
            except ValueError:
                break
            lines.append(raw.decode("utf-8").rstrip("\n"))
            good += len(raw)
    return lines, good


def _finished_rows(parts: str) -> dict[str, str]:
    """id -> output line of every prompt any rank's part file holds (the first, if two)."""
    rows: dict[str, str] = {}
    if not os.path.isdir(parts):
        return rows
    for name in sorted(os.listdir(parts)):
        if name.startswith("rank-") and name.endswith(".jsonl"):
            for line in _part_lines(os.path.join(parts, name))[0]:
                rows.setdefault(str(json.loads(line)["id"]), line)
    return rows


def _drop_cut_line(path: str) -> None:
    """Truncate a part file to its complete lines before appending to it."""
    if os.path.exists(path):
        good = _part_lines(path)[1]
        if good < os.path.getsize(path):
            with open(path, "r+b") as f:
                f.truncate(good)


def _merge(parts: str, items: list[Prompt], out: str) -> list[dict]:
    """OUT: every prompt's line from the parts, in prompt order; returns the rows."""
    rows = _finished_rows(parts)
    missing = [p.id for p in items if p.id not in rows]
    if missing:
        raise RuntimeError(f"{parts}: no samples for {len(missing)} prompts (first {missing[0]!r}) after every rank "
                           "finished")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(f"{out}.tmp", "w", encoding="utf-8") as f:
        f.writelines(rows[p.id] + "\n" for p in items)
    os.replace(f"{out}.tmp", out)
    return [json.loads(rows[p.id]) for p in items]
