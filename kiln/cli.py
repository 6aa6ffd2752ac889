"""The `kiln` command: one subcommand per part, each defined in that part's own cli.py.

    kiln curate STAGE|pipeline|train-*|sample ...   curation on Spark        (kiln/curation/cli.py)
    kiln mix design|run|fit|optimize|report ...      the mixture optimizer    (kiln/mixing/cli.py)
    kiln train RECIPE                                staged pretraining       (kiln/training/cli.py)
    kiln probe run PROBE.toml | report OUT           annealing probes         (kiln/probe/cli.py)
    kiln average MODEL MODEL ... --out DIR           model averaging          (kiln/training/average_cli.py)
    kiln generate --model DIR --prompts P --out OUT  sampling completions     (kiln/training/generate_cli.py)
    kiln plan RECIPE_OR_DIR [--scale paper]          cost without training    (kiln/training/plan_cli.py)
    kiln recipe run recipes/<system> --scale tiny    a system end to end      (kiln/recipe_cli.py)

`kiln PART --help` explains each; `torchrun -m kiln.training RECIPE` trains with FSDP2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from kiln.config import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# Each part's CLI module and its one-line help. Only the part a command names is imported:
# `kiln train` must not need Spark, nor `kiln curate` torch's distributed stack.
PARTS = {
    "curate": ("kiln.curation.cli", "curation stages on Spark"),
    "mix": ("kiln.mixing.cli", "mixture optimizer: design proxies, fit a mixing law, optimize under caps"),
    "train": ("kiln.training.cli", "staged pretraining from a TOML recipe (FSDP2 under torchrun)"),
    "probe": ("kiln.probe.cli", "annealing probes: does a dataset help? (paired seeds, intervals, a verdict)"),
    "average": ("kiln.training.average_cli", "average exported models (uniform or weighted): Llama 3's model averaging"),
    "generate": ("kiln.training.generate_cli", "sample completions with the chat template (batched, sharded, resumable)"),
    "plan": ("kiln.training.plan_cli", "a recipe's parameters, tokens, FLOPs, memory per GPU and GPU-hours"),
    "recipe": ("kiln.recipe_cli", "run a published pipeline (recipes/<system>/): curate, mix, pretrain, post"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the named part's full subcommands; the others are listed by name."""
    named = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(
        prog="kiln", description="Pretraining data for LLMs: curation on Spark (kiln curate), the mixture "
                                  "optimizer (kiln mix), staged training (kiln train) and annealing probes (kiln probe).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, summary) in PARTS.items():
        if name == named:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return importlib.import_module(PARTS[args.command][0]).run(args)
    except ConfigError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        message = _task_error(e)
        if message is None:
            raise
        print(f"kiln: error: {message}", file=sys.stderr)
        return 1


def _task_error(e: Exception) -> str | None:
    """The Python error behind a failed Spark task, without the JVM stack."""
    text = str(e)
    if "ConfigError:" in text:
        return text.split("ConfigError:", 1)[1].strip().splitlines()[0]
    return None


if __name__ == "__main__":
    sys.exit(main())
