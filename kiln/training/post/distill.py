"""Distillation stages (kind = "distill"): a student trained on a teacher's next-token
distributions, on pretraining shards (Gemma 2's 2B and 9B) or SFT rows (Apple AFM's 3B).

    loss = "kl"        KL(P_teacher || P_student) per token (Gemma 2), temperature-scaled
    loss = "top1_mix"  -[alpha log P_S(teacher's top-1) + (1 - alpha) log P_S(label)] (AFM: alpha 0.9);
                       alpha = 0 is training on the labels alone, the same student, data and
                       measures: the baseline a distillation run is judged against
    loss = "jsd"       generalized Jensen-Shannon with beta (Liger-Kernel's convention)

The loss is `kiln.kernels.linear_distill_loss`: chunked, it never holds both models' full
logits (Liger's fused linear JSD on CUDA where it computes the same thing).

Teacher and student must read one tokenizer (the same tokenizer.json bytes) and each
vocabulary must cover it. Vocabularies that differ only in padding rows (kiln pads to a
multiple of 64; Qwen2.5's 151,936 vs 152,064 is the same case) are allowed: the loss runs
on the first min(V_student, V_teacher) rows, which hold every token the tokenizer can
produce, so the dropped rows are never targets. Anything else is an error before
training: distilling across tokenizers silently trains on the wrong tokens (the
failure TRL's and torchtune's users report).

With `teacher_cache = true` the teacher's top-k logits of every sequence the stage will
read (its training batches, computed by replaying its sampler, and its held-out batches)
are computed once into NN_<stage>/teacher/ (safetensors shards, keyed by each row's
tokens), and the teacher leaves memory before the student trains. A relaunch reuses a
cache whose key (teacher weights, stage settings, ranks) matches.

Held-out measures: val/distill/kl (KL from the teacher per token, the number to compare
students by), val/distill/nll (the labels') and val/distill/agreement (top-1 match).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch

from kiln.config import ConfigError
from kiln.formats.hashing import content_sha256
from kiln.kernels import linear_distill_loss
from kiln.training.distributed import World, all_reduce_mean, barrier
from kiln.training.model import CausalLM, final_softcap, packed_attention_mask
from kiln.training.parallelize import ParallelConfig, autocast

CACHE_DIR, CACHE_INDEX, SHARD_ROWS = "teacher", "index.json", 256


def load_teacher(path: str, tokenizer_dir: str, student_vocab: int, tokenizer_vocab: int, device, where: str, log):
    """The teacher, frozen and on `device`, after the tokenizer and vocabulary checks."""
    from transformers import AutoModelForCausalLM

    from kiln.training.post.rejection import check_same_tokenizer

    check_same_tokenizer(path, content_sha256(os.path.join(tokenizer_dir, "tokenizer.json")), tokenizer_dir, where,
                         "teacher")
    try:
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: teacher {path} is not a causal LM directory with safetensors weights "
                          f"({str(e).splitlines()[0][:200]})") from e
    vt = teacher.config.vocab_size
    if vt < tokenizer_vocab:
        raise ConfigError(f"{where}: teacher {path} has a vocabulary of {vt} tokens, fewer than the tokenizer's "
                          f"{tokenizer_vocab}: it is not this tokenizer's model")
    if vt != student_vocab:
        log(f"{where}: teacher vocabulary {vt}, student {student_vocab}: both cover the tokenizer's {tokenizer_vocab} "
            f"tokens, so the loss uses the first {min(vt, student_vocab)} rows (the padding rows beyond are never "
            "targets)")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


class DistillLM(CausalLM):
    """The student; the teacher rides along unregistered (not a submodule: the optimizer,
    FSDP2 and checkpoints see only the student). forward returns (loss, metrics)."""

    def __init__(self, hf_model, teacher, cfg):
        super().__init__(hf_model)
        self.__dict__["teacher"] = teacher  # None when the stage reads the teacher cache
        self.loss_kind, self.alpha, self.beta = cfg.loss, cfg.alpha, cfg.beta
        self.temperature, self.top_k = cfg.temperature, cfg.top_k

    def forward(self, input_ids, labels, position_ids=None, segment_ids=None, teacher_topk=None):
        mask = packed_attention_mask(self.hf.config, segment_ids) if segment_ids is not None else None
        hidden = self.hf.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        t_hidden = t_weight = None
        t_softcap = 0.0  # a cache holds the teacher's logits already capped (TeacherCache.build)
        if teacher_topk is None:
            t_mask = packed_attention_mask(self.teacher.config, segment_ids) if segment_ids is not None else None
            with torch.no_grad():
                t_hidden = self.teacher.model(input_ids=input_ids, attention_mask=t_mask, position_ids=position_ids,
                                              use_cache=False).last_hidden_state.flatten(0, 1)
            t_weight = self.teacher.lm_head.weight
            t_softcap = final_softcap(self.teacher)
        else:
            teacher_topk = tuple(t.flatten(0, 1) for t in teacher_topk)
        return linear_distill_loss(hidden.flatten(0, 1), self.hf.lm_head.weight, labels.flatten(),
                                   teacher_hidden=t_hidden, teacher_weight=t_weight, teacher_topk=teacher_topk,
                                   loss=self.loss_kind, alpha=self.alpha, beta=self.beta,
                                   temperature=self.temperature, top_k=self.top_k,
                                   chunk_size=self.kernels.ce_chunk_size, backend=self.kernels.backend,
                                   student_softcap=final_softcap(self.hf), teacher_softcap=t_softcap)


def row_key(input_ids: torch.Tensor, segment_ids: torch.Tensor | None, j: int) -> str:
    h = hashlib.sha1(input_ids[j].cpu().numpy().tobytes())
    if segment_ids is not None:
        h.update(segment_ids[j].cpu().numpy().tobytes())
    return h.hexdigest()


class TeacherCache:
    """The teacher's top-k logits of every row the stage reads, by row key."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, rows: dict[str, int]):
        self.values, self.indices, self.rows = values, indices, rows

    def lookup(self, b) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            at = [self.rows[row_key(b.input_ids, b.segment_ids, j)] for j in range(b.input_ids.shape[0])]
        except KeyError as e:
            raise RuntimeError("a batch the teacher cache does not hold: the stage's data or settings changed "
                               "since it was built (delete NN_<stage>/teacher/)") from e
        device = b.input_ids.device
        return self.values[at].to(device), self.indices[at].to(device)

    @classmethod
    def build(cls, teacher, batches, k: int, vocab: int, root: str, key: str, world: World,
              parallel: ParallelConfig, log, name: str) -> TeacherCache:
        """Compute (or read back, when its key matches) this rank's cache of `batches`."""
        from safetensors.torch import load_file

        from kiln.kernels import teacher_topk_logits

        directory = os.path.join(root, CACHE_DIR, f"rank{world.rank}")
        index_path = os.path.join(directory, CACHE_INDEX)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            if index.get("key") == key:
                shards = [load_file(os.path.join(directory, s)) for s in index["shards"]]
                log(f"[{name}] teacher top-{k} logits read from {directory}")
                return cls(torch.cat([s["values"] for s in shards]), torch.cat([s["indices"] for s in shards]),
                           index["rows"])
        if teacher is None:
            raise ConfigError(f"[{name}] no teacher cache at {directory} and no teacher")
        os.makedirs(directory, exist_ok=True)
        rows: dict[str, int] = {}
        values, indices, shards, pending = [], [], [], 0
        with torch.no_grad():
            for b in batches:
                b = b.to(world.device)
                new = [j for j in range(b.input_ids.shape[0])
                       if row_key(b.input_ids, b.segment_ids, j) not in rows]
                if not new:
                    continue
                mask = packed_attention_mask(teacher.config, b.segment_ids[new]) if b.segment_ids is not None \
                    else None
                with autocast(parallel, world):
                    hidden = teacher.model(input_ids=b.input_ids[new], attention_mask=mask,
                                           position_ids=None if b.position_ids is None else b.position_ids[new],
                                           use_cache=False).last_hidden_state
                # the common rows only: a larger teacher vocabulary's padding rows are never targets
                v, ix = teacher_topk_logits(hidden, teacher.lm_head.weight[:vocab], k, softcap=final_softcap(teacher))
                for j in new:
                    rows[row_key(b.input_ids, b.segment_ids, j)] = len(rows)
                values.append(v.cpu())
                indices.append(ix.cpu())
                pending += len(new)
                if pending >= SHARD_ROWS:
                    shards.append(_write_shard(directory, len(shards), values[-pending:], indices[-pending:]))
                    pending = 0
        if pending:
            shards.append(_write_shard(directory, len(shards), values[-pending:], indices[-pending:]))
        all_values, all_indices = torch.cat(values), torch.cat(indices)
        with open(f"{index_path}.tmp", "w", encoding="utf-8") as f:
            json.dump({"key": key, "k": k, "shards": shards, "rows": rows}, f)
        os.replace(f"{index_path}.tmp", index_path)
        log(f"[{name}] teacher top-{k} logits of {len(rows)} sequences cached in {directory}")
        return cls(all_values, all_indices, rows)


def _write_shard(directory: str, n: int, values: list, indices: list) -> str:
    from safetensors.torch import save_file

    name = f"shard-{n:05d}.safetensors"
    save_file({"values": torch.cat(values).contiguous(), "indices": torch.cat(indices).contiguous()},
              os.path.join(directory, name))
    return name


def cache_key(teacher_dir: str, cfg, seed: int, world: World) -> str:
    from kiln.training.average import weight_files

    h = hashlib.sha256()
    for path in weight_files(teacher_dir):
        h.update(content_sha256(path).encode())
    h.update(json.dumps([dataclasses.asdict(cfg), seed, world.size, world.rank], sort_keys=True,
                        default=str).encode())
    return h.hexdigest()


class DistillValidator:
    """KL from the teacher, the labels' NLL and top-1 agreement on fixed held-out
    batches (per token, over the tokens with a label), plus the base validator's
    measures computed by the student alone."""

    def __init__(self, batches: list, cache: TeacherCache | None, world: World):
        self.batches, self.cache, self.world = batches, cache, world

    @torch.no_grad()
    def run(self, model, parallel: ParallelConfig) -> dict:
        if not self.batches:
            return {}
        model.eval()
        sums, count = {"kl": 0.0, "nll": 0.0, "teacher_agreement": 0.0}, 0
        for b in self.batches:
            b = b.to(self.world.device)
            n = int((b.labels != -100).sum())
            topk = self.cache.lookup(b) if self.cache is not None else None
            with autocast(parallel, self.world):
                _loss, metrics = model(b.input_ids, b.labels, b.position_ids, b.segment_ids, topk)
            for key in sums:
                sums[key] += float(metrics[key]) * n
            count += n
        model.train()
        names = {"kl": "kl", "nll": "nll", "teacher_agreement": "agreement"}
        return {f"val/distill/{names[k]}": all_reduce_mean(v / max(count, 1), self.world) for k, v in sums.items()}


def train_batches(sampler_factory, cfg, micro: int, world: World):
    """Every micro-batch a stage's sampler will give this rank, in order (a fresh
    sampler replayed over the stage's steps): what the teacher cache must hold."""
    from kiln.training.recipe import batch_size_at

    sampler, tokens = sampler_factory(), 0
    while tokens < cfg.tokens:
        size = batch_size_at(cfg, tokens)
        for _ in range(size // (micro * world.size)):
            yield sampler.next_batch(micro)
        tokens += size * cfg.seq_len


def setup(run, cfg, i: int, micro: int, student, teacher_dir: str, root: str, where: str):
    """The pieces of a distill stage: (cfg with its token budget, model, sampler,
    validator, forward). `student` is the hf model it trains, on the device."""
    from kiln.training.post.data import ChatTokenizer, SFTSampler, read_sft, split

    world, recipe = run.world, run.recipe
    tok = ChatTokenizer(run.tokenizer)
    seed = recipe.run.seed + 1000 * i
    if cfg.data:
        examples, report = read_sft(cfg.data, tok, cfg.seq_len, cfg.overflow)
        run.log.print(f"[{cfg.name}] data {report.describe()}")
        train_idx, val_idx = split(len(examples), cfg.holdout, seed)

        def new_sampler():
            return SFTSampler([examples[j] for j in train_idx], cfg.seq_len, seed, tok.pad_id, cfg.packing,
                              world.rank, world.size)

        held = SFTSampler([examples[j] for j in val_idx], cfg.seq_len, 0, tok.pad_id, True) if len(val_idx) else None
        val_batches = [held.batch_of(list(range(s, min(s + micro, held.n)))) for s in range(0, held.n, micro)] \
            if held else []
        sampler = new_sampler()
        items = len(sampler.sequences)
    else:
        from kiln.training.data import DataConfig, MixtureSampler
        from kiln.training.train import stage_mixture

        mixture = stage_mixture(recipe, cfg)
        data_cfg = DataConfig(shards_dir=recipe.run.shards, seq_len=cfg.seq_len, batch_size=micro, seed=seed,
                              val_fraction=recipe.run.val_fraction, doc_masking=cfg.doc_masking)

        def new_sampler():
            return MixtureSampler(run.source, mixture, data_cfg, world.rank, world.size)

        val_batches = [b for d in mixture.weights if mixture.weights[d] > 0
                       for b in run.source.val_batches(d, cfg.seq_len, micro, max_batches=cfg.eval_batches,
                                                       rank=world.rank, world_size=world.size,
                                                       doc_masking=cfg.doc_masking)]
        sampler, items = new_sampler(), 0
    if cfg.epochs:
        from kiln.training.post.stages import steps_for

        cfg = dataclasses.replace(cfg, tokens=steps_for(cfg, items) * cfg.batch_size * cfg.seq_len)
    teacher = load_teacher(teacher_dir, run.tokenizer, student.config.vocab_size, tok.vocab_size, world.device,
                           where, run.log.print)
    cache = None
    if cfg.teacher_cache:
        key = cache_key(teacher_dir, cfg, recipe.run.seed, world)
        batches = list(train_batches(new_sampler, cfg, micro, world)) + val_batches
        cache = TeacherCache.build(teacher, batches, cfg.top_k, student.config.vocab_size, root, key, world,
                                   recipe.parallel, run.log.print, cfg.name)
        del teacher  # the student trains without the teacher resident
        teacher = None
        barrier(world)
    model = DistillLM(student, teacher, cfg)

    def forward(m, b):
        return m(b.input_ids, b.labels, b.position_ids, b.segment_ids, cache.lookup(b) if cache else None)

    return cfg, model, sampler, DistillValidator(val_batches, cache, world), forward
