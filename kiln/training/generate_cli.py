"""`kiln generate --model DIR --prompts P.jsonl --out OUT.jsonl [sampling options]`: sample completions.

    kiln generate --model out/run/02_sft/final --prompts prompts.jsonl --out samples.jsonl
    kiln generate --model M --prompts P.jsonl --out S.jsonl --samples 8 --temperature 0.7 --top-p 0.9
    kiln generate --model M --prompts P.jsonl --out S.jsonl --temperature 0 --samples 1      greedy
    torchrun --nproc_per_node=8 -m kiln.cli generate --model M --prompts P.jsonl --out S.jsonl   8 GPUs
"""

from __future__ import annotations

import argparse
import textwrap

DESCRIPTION = ("Sample K completions per prompt from a causal LM export in kiln's chat format (Llama 3's), "
               "batched through transformers' generate with a KV cache (CUDA: bf16 and the static cache; CPU: fp32). "
               "Prompts are JSONL or Parquet rows with `prompt` (a string: one user message; or a message list, "
               "TRL's format) or `messages` (a trailing assistant turn is removed), and an optional `id` (default: "
               "the row number); unusable rows are dropped and counted by reason. The output has one JSON line per "
               "prompt, in the prompts' order: {id, prompt, model, seed, completions: [{text, tokens, truncated}]}. "
               "Each completion's randomness comes from (seed, prompt id, sample index) alone, so it does not depend "
               "on batching, ranks or resuming. Under torchrun each rank samples its share of the prompts into "
               "OUT.parts/rank-R.jsonl and rank 0 merges them into OUT; a relaunch skips prompts already sampled "
               "(the same settings are required). The model's tokenizer.json is read from the model directory.")


def add_parser(sub) -> None:
    from kiln.config import add_config_options
    from kiln.training.post.generate import SamplingConfig

    p = sub.add_parser("generate", help="sample completions with the chat template (batched, sharded, resumable)",
                       description=textwrap.fill(DESCRIPTION, 100), epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # keeps the examples' columns
    p.add_argument("--model", required=True, metavar="DIR",
                   help="causal LM export (config.json, safetensors weights, tokenizer.json), e.g. a stage's final/")
    p.add_argument("--prompts", required=True, metavar="FILE", help="prompts: JSONL or Parquet rows (see above)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="output JSONL; OUT.parts/ holds the per-rank parts, the settings and stats.json")
    add_config_options(p, SamplingConfig, "sampling")


def run(args) -> int:
    import json
    import os

    from kiln.config import config_overrides, from_dict
    from kiln.training.post.generate import SamplingConfig, generate_file

    cfg = from_dict(SamplingConfig, config_overrides(args).get("sampling", {}), "kiln generate")
    stats = generate_file(args.model, args.prompts, args.out, cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the same stats
        print(json.dumps(stats, indent=2))
    return 0
