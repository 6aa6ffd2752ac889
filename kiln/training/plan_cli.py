"""`kiln plan RECIPE_OR_DIR`: a training recipe's cost, resolved without training.

    kiln plan recipes/llama3/pretrain.toml --scale paper          the Llama 3.1 405B pretraining plan
    kiln plan recipes/llama3 --scale paper --json                 pretrain + post, as JSON on stdout
    kiln plan recipes/gemma2/pretrain.toml --gpu H200 --gpus 512 --mfu 0.45
    kiln plan recipes/tiny_train.toml                             any recipe (the vocabulary from its tokenizer)
"""

from __future__ import annotations

import argparse
import textwrap

DESCRIPTION = ("Per stage of a training recipe (or a system directory's pretrain.toml and post.toml): parameters, "
               "tokens, FLOPs (6N plus causal attention), memory per GPU under FSDP2 (weights, gradients and AdamW "
               "states sharded; activations with and without checkpointing) and GPU-hours at an MFU on a named GPU, "
               "with the totals and the report's published figures where the recipe's [plan] gives them. Nothing "
               "is trained and no data is read.")


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="a recipe's parameters, tokens, FLOPs, memory per GPU and GPU-hours",
                       description=textwrap.fill(DESCRIPTION, 100), epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", metavar="RECIPE_OR_DIR", help="a training recipe TOML, or a recipes/<system>/ directory")
    p.add_argument("--scale", default="paper",
                   help="\"paper\" (the recipe as written, the default) or one of its [scale.<name>] overlays")
    p.add_argument("--gpu", help="GPU to size for (default: the recipe's [plan] gpu, else H100)")
    p.add_argument("--gpus", type=int, help="FSDP2 ranks (default: [plan] gpus)")
    p.add_argument("--mfu", type=float, help="model FLOPs utilisation for GPU-hours (default: [plan] mfu, else 0.4)")
    p.add_argument("--json", action="store_true",
                   help='write {"stages": [...], "total": {...}, "published": {...}} to stdout instead of the table')


def run(args) -> int:
    from kiln.training.plan import plan_recipes, render, system_recipes, to_json

    plan = plan_recipes(system_recipes(args.recipe), args.scale, args.gpu, args.gpus, args.mfu)
    print(to_json(plan) if args.json else render(plan))
    return 0
