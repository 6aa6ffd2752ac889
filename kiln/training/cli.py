"""`kiln train ...`: staged pretraining from a TOML recipe.

    kiln train recipes/tiny_train.toml                                  one process (CPU or one GPU)
    kiln train recipes/tiny_train.toml --output out/run2 --no-resume    override [run] output, start afresh
    torchrun --standalone --nproc_per_node=2 -m kiln.training recipes/tiny_train.toml    FSDP2
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = ("Train the stages of a recipe: pretraining (core, long context, annealing) on token shards, and "
               "post-training (kind = sft, reward, dpo) on chat and preference data. Each stage starts from the "
               "previous one's weights (or its `from`), checkpoints with torch.distributed.checkpoint and exports a "
               "Hugging Face model directory. Single process, or "
               "`torchrun --nproc_per_node=N -m kiln.training RECIPE`.")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="staged pretraining from a TOML recipe (FSDP2 under torchrun)",
                       description=DESCRIPTION)
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="training recipe TOML (see recipes/tiny_train.toml and recipes/tiny_post.toml)")
    p.add_argument("--output", help="override [run] output")
    p.add_argument("--shards", help="override [run] shards")
    p.add_argument("--init", help="override [run] init (the model directory the first stage starts from)")
    p.add_argument("--scale", default="paper",
                   help="the recipe at one of its scales: \"paper\" (as written, the default) or a [scale.<name>] "
                        "overlay such as \"tiny\" (recipes/<system>/)")
    p.add_argument("--no-resume", action="store_true",
                   help="start unfinished stages from scratch instead of their newest complete checkpoint")


def run(args) -> int:
    from kiln.training import recipe as recipes
    from kiln.training.train import RunOptions, train

    recipe = recipes.load(args.recipe, args.scale)
    if args.output:
        recipe.run.output = args.output
    if args.shards:
        recipe.run.shards = args.shards
    if args.init:
        recipe.run.init = args.init
    train(recipe, RunOptions(resume=not args.no_resume))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m kiln.training RECIPE [options]`, what torchrun starts on every rank: the
    `kiln train` command on its own, with `kiln`'s exit codes (2 for a bad recipe)."""
    from kiln.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m kiln.training", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
